"""The backend registry: every implementation of the op, where it runs and whether it can.

Every backend implements the same three functions (the contract), on contiguous tensors that the
public entry points have already checked:

    forward(q, k, scale, spec) -> lse                                           (M,)
    backward(grad, q, k, scale, spec, lse) -> (dq, dk, dscale)
    backward_paired(grad, q, k, scale, spec, lse, key_grad, key_lse, key_spec, row_offset)
        -> (dq, dscale)

q (M, d), k (N, d) of one dtype (``k is q`` when ``spec.symmetric``), ``scale`` a 0-d tensor of
the accumulation dtype, ``spec`` an :class:`~infonce_kernels.ops.exclusion.Exclusion`, ``lse``
and ``grad`` (M,) of the accumulation dtype. When ``spec.symmetric`` dq is the whole gradient on
z and dk is empty. ``backward_paired`` is the gradient on q when the keys are rows of a
log-sum-exp too (``key_grad``/``key_lse`` (N,), ``key_spec`` from ``spec.keys_as_rows``).

A backend may add (the CLIP op ``infonce_kernels::_lse_pair`` uses it when present, else two
``forward`` calls without exclusions):

    forward_pair(a, b, scale) -> (lse(a, b, scale), lse(b, a, scale))          (M,), (N,)

both directions of a paired batch without exclusions, from one pass over the score tiles
(triton), and, for its backward (the op uses them when ``uses_backward_pair`` says so, else two
``backward_paired`` calls):

    uses_backward_pair(device, dtype, d) -> bool
    backward_pair(a, b, scale, r, t, g_r, g_t) -> (da, db, dscale)

the gradients of ``sum(g_r * r) + sum(g_t * t)`` in one call by G blocks and GEMMs
(``ops/pair_gemm.py``) for d beyond one output chunk of the backend's paired kernel: triton for
16-bit / tf32 inputs (``triton/_pair_gemm.py``), cuda for fp16 / bf16 with d > 128 (the G kernel
csrc/cuda/pair_gblock_mma.cuh; fp32 / fp64 and d <= 128 keep two paired backwards).

The pairwise sigmoid (SigLIP) op adds two functions (``infonce_kernels.ops.sigmoid``; docs/design.md,
The pairwise sigmoid op). x (M, d) and y (N, d) of one dtype, ``scale`` t and ``bias`` b 0-d
tensors of the accumulation dtype, ``labels`` ``()`` or ``(row_labels (M,), col_labels (N,))``
int64, ``offset`` an int; l_ij = t <x_i, y_j> + b, z_ij = +1 on positive pairs (equal labels, else
i + offset == j) and -1 otherwise:

    sigmoid_forward(x, y, scale, bias, labels, offset, with_grad)
        -> (rows,)                                   rows_i = sum_j softplus(-z_ij l_ij), (M,)
        -> (rows, dx, dy, dscale, dbias) with_grad:  the gradients for a unit upstream gradient
                                                     on every row, from the same sweep
    sigmoid_backward(grad, x, y, scale, bias, labels, offset) -> (dx, dy, dscale, dbias)
        with G_ij = grad_i (sigmoid(l_ij) - [z_ij = 1]): dx = t G y, dy = t G^T x,
        dscale = sum_ij G_ij <x_i, y_j>, dbias = sum_ij G_ij

rows, grad, dscale and dbias are in the accumulation dtype, dx and dy in the input dtype; no
M x N tensor exists outside the reference backend. A backend without these two functions cannot
run the sigmoid op (:func:`sigmoid_unavailable_reason`).

============  ===========  =====================================================================
name          device       implementation
============  ===========  =====================================================================
reference     any          plain PyTorch, materialises the M x N logits (oracle, baseline)
cpu           CPU          C++ (csrc/cpu): BLAS tiles, online LSE, at::parallel_for
triton        CUDA         Triton kernels (infonce_kernels/triton); CPU under TRITON_INTERPRET=1
cuda          CUDA         CUDA C++ tensor-core kernels (csrc/cuda), when built with CUDA
============  ===========  =====================================================================
"""

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .._extension import EXTENSION_ERROR

__all__ = ["Backend", "REGISTRY", "BACKENDS", "unavailable_reason", "available_backends", "resolve_backend",
           "implementation", "sigmoid_unavailable_reason"]


@dataclass(frozen=True)
class Backend:
    """One implementation of the op.

    Attributes:
        name: what ``backend=`` selects.
        devices: device types it runs on (None: any).
        auto_for: device types on which ``backend="auto"`` tries it (in registry order).
        probe: ``probe(device) -> None`` when it can run on ``device`` (of one of ``devices``),
            else a sentence saying why not.
        load: returns the implementation (a module or object with the contract's functions).
    """

    name: str
    devices: Optional[Tuple[str, ...]]
    auto_for: Tuple[str, ...]
    probe: Callable[[torch.device], Optional[str]]
    load: Callable[[], object]


def _reference():
    from .. import reference

    return reference


def _cpp():
    from . import _cpp

    return _cpp


def _triton():
    from .. import triton

    return triton


def _cuda_probe(device):
    if EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    if not _cpp().has_cuda_kernels():
        return "infonce_kernels._C was built without its CUDA kernels (CPU-only torch or no nvcc at build time)"
    return None


def _triton_probe(device):
    ok, reason = _triton().available(device)
    return None if ok else reason


REGISTRY = {
    backend.name: backend
    for backend in (
        Backend("reference", None, (), lambda device: None, _reference),
        Backend("cpu", ("cpu",), ("cpu",), lambda device: EXTENSION_ERROR, _cpp),
        Backend("triton", ("cuda", "cpu"), ("cuda",), _triton_probe, _triton),
        Backend("cuda", ("cuda",), ("cuda",), _cuda_probe, _cpp),
    )
}

BACKENDS = tuple(REGISTRY)


def unavailable_reason(name: str, device) -> Optional[str]:
    """None when backend ``name`` can run on ``device``, else a sentence saying why not."""
    if name not in REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    backend, device = REGISTRY[name], torch.device(device)
    if backend.devices is not None and device.type not in backend.devices:
        kinds = " or ".join(d.upper() for d in backend.devices)
        return f"the {name} backend runs on {kinds} tensors, these are on {device}"
    return backend.probe(device)


def available_backends(device="cpu"):
    """Names of the backends that can run on ``device``."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


_warned_fallback = set()


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run: an explicit name, else $INFONCE_BACKEND, else the fastest for ``device``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` (saying why) for a backend that
    cannot run here. Under ``torch.compile`` it runs once at trace time and its answer is a
    constant of the graph (the availability checks call into Triton's C++ and CUDA's runtime,
    which the compiler cannot trace).
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("INFONCE_BACKEND", "auto") or "auto"
    if backend == "auto":
        preferred = [b.name for b in REGISTRY.values() if device.type in b.auto_for]
        for name in preferred:
            if unavailable_reason(name, device) is None:
                return name
        if device.type not in _warned_fallback:
            _warned_fallback.add(device.type)
            reasons = "; ".join(f"{n}: {unavailable_reason(n, device)}" for n in preferred) or "none registered"
            warnings.warn(f"infonce_kernels: no fused backend for {device.type} tensors ({reasons}); "
                          "using the materialising reference backend", RuntimeWarning, stacklevel=3)
        return "reference"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    return backend


def implementation(name: str):
    """The implementation of a resolved backend name."""
    return REGISTRY[name].load()


def sigmoid_unavailable_reason(name: str, device) -> Optional[str]:
    """None when backend ``name`` can run the pairwise sigmoid op on ``device``, else why not."""
    reason = unavailable_reason(name, device)
    if reason is None and not hasattr(implementation(name), "sigmoid_forward"):
        reason = f"the {name} backend does not implement the pairwise sigmoid op (sigmoid_forward/sigmoid_backward)"
    if reason is None and name == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "infonce_kernels::_sigmoid_fwd", "CUDA"):
        reason = "infonce_kernels._C was built without the CUDA kernels of the pairwise sigmoid op"
    return reason
