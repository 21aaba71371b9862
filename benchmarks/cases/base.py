"""What a benchmark case is: one loss, its inputs, and the providers that compute it.

A *case* (one file per loss in this package) says how to build the inputs of one size and lists
its *providers*, the implementations timed against each other:

- ``ours:<backend>``: the package's loss with each backend that can run on the device
  (``infonce_kernels.available_backends(device)``; the Triton interpreter on CPU is left out,
  it measures the interpreter). ``ours:reference`` materialises the logits in fp32.
- ``materialised:fp32`` / ``materialised:bf16``: the loss as plain PyTorch code writes it (the
  full logits matrix, ``F.cross_entropy``), computed in fp32 (TF32 allowed on CUDA) and with
  bf16 logits: the fair baselines of a mixed-precision training step.
- peers: other libraries' losses, listed when they import.

Shapes: ``rows`` is the number of anchors of the similarity matrix (2B for two-view losses, B for
paired ones, see ``Case.rows_label``), ``dim`` the feature size d.
"""

import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

import infonce_kernels as ik

# Shapes of the in-process pytest-benchmark suite (the CLI sweeps its own --rows/--dims):
# name -> (rows, d). "small" fits every peer, including O(N^3)-memory ones.
PYTEST_SHAPES = {"small": (256, 64), "mid": (512, 128), "large": (2048, 128)}


@dataclass(frozen=True)
class Inputs:
    """``leaves``: the tensors a step differentiates (passed to the provider's function in this
    order); ``aux``: what the loss also takes (labels, logit scale), built once per case."""

    leaves: tuple
    aux: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Provider:
    """One implementation of a case's loss.

    ``build(aux)`` returns ``fn(*leaves) -> scalar loss``. ``needs``: modules that must import for
    it to run; ``devices``: device types it runs on; ``tf32``: fp32 matmuls may use TF32 on CUDA
    (the benchmark worker sets it for the case's process); ``max_rows``: the largest size the
    in-process pytest suite gives it (the CLI records OOM instead).
    """

    name: str
    build: Callable[[dict], Callable]
    needs: tuple = ()
    devices: tuple = ("cpu", "cuda")
    tf32: bool = False
    max_rows: int | None = None

    def available(self, device):
        return torch.device(device).type in self.devices and all(map(_imports, self.needs))


@dataclass(frozen=True)
class Case:
    """One loss of the suite.

    ``make_inputs(rows, dim, dtype, device, requires_grad, generator) -> Inputs``;
    ``fused(aux, backend) -> fn(*leaves)``: the package's loss on one backend;
    ``baselines``: the materialising baselines and peers; ``settings``: the loss's fixed
    arguments in words (for the report).
    """

    kind: str
    rows_label: str
    settings: str
    make_inputs: Callable[..., Inputs]
    fused: Callable[[dict, str], Callable]
    baselines: tuple = ()

    def providers(self, device):
        """The providers that can run on ``device``: the package's backends first."""
        return self._ours(device) + [p for p in self.baselines if p.available(device)]

    def provider(self, name, device):
        """The provider ``name`` if it can run on ``device``, else None (imports only its modules)."""
        candidates = self._ours(device) if name.startswith("ours:") else self.baselines
        return next((p for p in candidates if p.name == name and p.available(device)), None)

    def _ours(self, device):
        """``ours:<backend>`` for each backend available on ``device``."""
        device = torch.device(device)
        return [Provider(f"ours:{b}", functools.partial(_fused_on, self.fused, b))
                for b in ik.available_backends(device) if not (b == "triton" and device.type == "cpu")]


def _fused_on(fused, backend, aux):
    return fused(aux, backend)


@functools.lru_cache(maxsize=None)
def _imports(module):
    """Whether ``module`` imports here (a package may be installed but broken, e.g. one whose
    torchvision does not match torch)."""
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - any failure means the peer cannot run here
        return False


def randn(generator, shape, dtype, device, requires_grad):
    """A leaf of standard-normal entries, drawn on the CPU so every device gets the same values."""
    x = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def materialised(loss):
    """The two materialising baselines of ``loss(*leaves, aux)`` (plain PyTorch): its inputs cast
    to fp32 (TF32 allowed on CUDA) and to bf16, so the logits are computed in that precision."""
    def in_dtype(dtype, aux):
        return lambda *leaves: loss(*(x.to(dtype) for x in leaves), aux)

    return (Provider("materialised:fp32", functools.partial(in_dtype, torch.float32), tf32=True),
            Provider("materialised:bf16", functools.partial(in_dtype, torch.bfloat16)))
