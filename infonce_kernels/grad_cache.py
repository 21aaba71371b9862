"""Gradient caching: a contrastive step over a batch far larger than the encoder's activations fit.

A contrastive loss couples every row of the batch, so the batch cannot be split into independent
micro-batches; but the loss only sees the embeddings z = f(x), which are small (N x d). With
L(z_1, ..., z_N) the loss and theta the encoder's parameters, the chain rule splits the gradient
over chunks C_1, ..., C_K of the rows:

    dL/dtheta = sum_k  sum_{i in C_k} (dL/dz_i)^T  dz_i/dtheta

so :func:`cached_step` computes it in two passes over the chunks (Gao et al.'s "gradient cache"):

1. embed every chunk without a graph (``torch.no_grad``): only the N x d embeddings are kept;
2. compute the loss once on the whole batch of embeddings (leaf tensors) and back-propagate it to
   g = dL/dz (this also fills the gradient of any parameter of the loss, e.g. a learnable
   temperature, and runs the collectives of a distributed loss exactly once);
3. re-run each chunk with a graph and back-propagate its slice of g into the parameters
   (``torch.autograd.backward(z_k, g_k)``), freeing the chunk's graph before the next.

The parameter gradients are those of one backward over the whole batch, and the peak activation
memory is that of one chunk, at the cost of one extra forward pass. Each chunk's random state
(the CPU generator and the generators of the CUDA devices involved) is recorded before pass 1 and
replayed in pass 3, so dropout and on-device augmentation inside the encoder draw the same numbers
in both passes; afterwards the generators are where pass 1 left them.

BatchNorm (see docs/grad_cache.md): a BatchNorm layer in training mode normalises each chunk by
the chunk's own statistics, so the function differentiated is the encoder with per-chunk
statistics ("ghost" batch norm), not the full-batch one. ``batchnorm="chunk"`` (default) makes
this consistent: both passes use per-chunk statistics, and the running statistics are updated once
per chunk (in pass 1 only; pass 3 leaves them alone). ``batchnorm="eval"`` runs every BatchNorm
layer in eval mode (the running statistics, not updated) in both passes, which makes the step equal
to a full-batch step of the same eval-mode network.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["cached_step", "CachedStepOutput", "BATCHNORM_MODES"]

BATCHNORM_MODES = ("chunk", "eval")

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


class CachedStepOutput(NamedTuple):
    """What :func:`cached_step` returns.

    loss: the loss (0-d, detached) -- the value of ``loss_fn`` on the whole batch.
    embeddings: one detached (N, ...) tensor per encoder, the pass-1 embeddings (for logging,
        a memory bank, metrics).
    """

    loss: torch.Tensor
    embeddings: Tuple[torch.Tensor, ...]


def _as_tuple(x: Inputs, name: str) -> Tuple[torch.Tensor, ...]:
    xs = (x,) if torch.is_tensor(x) else tuple(x)
    if not xs or not all(torch.is_tensor(t) for t in xs):
        raise TypeError(f"{name}: expected a tensor or a sequence of tensors, got {type(x).__name__}")
    n = xs[0].shape[0] if xs[0].dim() else None
    if n is None or any(t.dim() == 0 or t.shape[0] != n for t in xs):
        raise ValueError(f"{name}: every input tensor needs the same batch size in dimension 0, "
                         f"got shapes {[tuple(t.shape) for t in xs]}")
    return xs


def _ddp_module(encoder) -> Optional[nn.parallel.DistributedDataParallel]:
    """The DistributedDataParallel wrapper of ``encoder`` (also under torch.compile), or None."""
    m = getattr(encoder, "_orig_mod", encoder)
    return m if isinstance(m, nn.parallel.DistributedDataParallel) else None


def _batchnorms(encoders) -> List[nn.modules.batchnorm._BatchNorm]:
    seen, out = set(), []
    for e in encoders:
        if isinstance(e, nn.Module):
            for m in e.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in seen:
                    seen.add(id(m))
                    out.append(m)
    return out


@contextlib.contextmanager
def _patched(mods, **attrs):
    """Set attributes on modules for the block, then restore them."""
    saved = [{k: getattr(m, k) for k in attrs} for m in mods]
    try:
        for m in mods:
            for k, v in attrs.items():
                setattr(m, k, v)
        yield
    finally:
        for m, s in zip(mods, saved):
            for k, v in s.items():
                setattr(m, k, v)


def _cuda_devices(encoders, inputs) -> List[int]:
    devs = {t.device.index for xs in inputs for t in xs if t.device.type == "cuda"}
    for e in encoders:
        if isinstance(e, nn.Module):
            devs |= {p.device.index for p in e.parameters() if p.device.type == "cuda"}
    if devs and None in devs:
        devs.discard(None)
        devs.add(torch.cuda.current_device())
    return sorted(devs)


def _rng_state(devices: List[int]):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state, devices: List[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)


def cached_step(encoders: Union[Callable, Sequence[Callable]], inputs, loss_fn: Callable[..., torch.Tensor],
                chunk_size: int, *, batchnorm: str = "chunk") -> CachedStepOutput:
    """Forward and backward of ``loss_fn(encoder(inputs))`` over a large batch, ``chunk_size`` rows
    of activations at a time; accumulates into ``.grad`` the same parameter gradients as one
    full-batch ``loss.backward()`` (call ``optimizer.zero_grad()`` before and ``optimizer.step()``
    after, as usual).

    Args:
        encoders: one encoder (an ``nn.Module`` or any callable), or a sequence of them (e.g. the
            image and the text tower of CLIP; the same module may appear twice, e.g. for the two
            views of SimCLR). A ``DistributedDataParallel`` encoder (also under ``torch.compile``)
            synchronises its gradients once, on its last chunk: every other chunk runs under
            ``no_sync()``.
        inputs: for one encoder, its input: a tensor (N, ...) or a tuple of tensors with the same
            N, passed as positional arguments; for a sequence of encoders, a sequence with one such
            input per encoder (the N may differ between encoders).
        loss_fn: ``loss_fn(z_1, ..., z_E) -> 0-d tensor``, one embedding (N_e, d) per encoder, in
            the order of ``encoders``. Any callable: every loss of the package (with a
            ``LearnableTemperature`` or any parameter it closes over, whose gradient it receives
            once, and with ``gather_distributed=True``, whose collectives run once).
        chunk_size: rows per chunk (the last chunk may be smaller); the peak activation memory is
            that of one chunk. A chunk size >= N gives one chunk (an exact step with one extra
            forward pass).
        batchnorm: ``"chunk"`` (default): BatchNorm layers in training mode normalise by per-chunk
            statistics in both passes, running statistics updated once per chunk; ``"eval"``:
            every BatchNorm layer runs in eval mode in both passes (running statistics, not
            updated). See the module docstring and docs/grad_cache.md.

    Returns:
        :class:`CachedStepOutput` ``(loss, embeddings)``, both detached.

    Runs under the caller's ``torch.autocast`` (both encoder passes and the loss); the encoders
    must be deterministic given their random state (as they are on the CPU; on CUDA use
    deterministic algorithms for bit-equal recomputation).
    """
    single = callable(encoders) and not isinstance(encoders, (list, tuple))
    encs = [encoders] if single else list(encoders)
    if not encs or not all(callable(e) for e in encs):
        raise TypeError("encoders: expected a callable encoder or a non-empty sequence of them")
    if single:
        per_encoder = [_as_tuple(inputs, "inputs")]
    else:
        if torch.is_tensor(inputs) or not isinstance(inputs, (list, tuple)) or len(inputs) != len(encs):
            raise ValueError(f"inputs: expected a sequence of {len(encs)} inputs, one per encoder")
        per_encoder = [_as_tuple(x, f"inputs[{i}]") for i, x in enumerate(inputs)]
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be an integer >= 1, got {chunk_size!r}")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm: expected one of {BATCHNORM_MODES}, got {batchnorm!r}")
    if not callable(loss_fn):
        raise TypeError("loss_fn: expected a callable over the embeddings")

    chunks = [list(zip(*(t.split(chunk_size) for t in xs))) for xs in per_encoder]
    devices = _cuda_devices(encs, per_encoder)
    bns = _batchnorms(encs)
    training_bns = [m for m in bns if m.training]
    # "eval": every BatchNorm in eval mode for both passes; "chunk": pass 3 must not update the
    # running statistics again (track_running_stats=False in training mode: batch statistics,
    # no buffer update)
    bn_both = _patched(training_bns, training=False) if batchnorm == "eval" else contextlib.nullcontext()

    # the last chunk on which each DDP module runs (it synchronises there, after every other chunk)
    last_use = {}
    for e, cs in enumerate(chunks):
        ddp = _ddp_module(encs[e])
        if ddp is not None and cs:
            last_use[id(ddp)] = (e, len(cs) - 1)

    with bn_both:
        # ---- pass 1: embeddings without a graph, the random state before each chunk
        states, embeddings = [], []
        with torch.no_grad():
            for e, cs in enumerate(chunks):
                st, outs = [], []
                for args in cs:
                    st.append(_rng_state(devices))
                    z = encs[e](*args)
                    if not torch.is_tensor(z):
                        raise TypeError(f"encoders[{e}] returned {type(z).__name__}; expected a tensor of embeddings")
                    outs.append(z)
                states.append(st)
                embeddings.append(torch.cat(outs))
                del outs

        # ---- pass 2: the loss and its gradient with respect to the embeddings, once
        leaves = [z.detach().requires_grad_(True) for z in embeddings]
        loss = loss_fn(*leaves)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise ValueError(f"loss_fn: must return a 0-d tensor, got "
                             f"{tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__}")
        if not loss.requires_grad:
            raise ValueError("loss_fn: the loss does not depend on the embeddings (no gradient to cache)")
        loss.backward()

        # ---- pass 3: each chunk again with a graph, back-propagating its slice of the cached gradient
        no_update = _patched(training_bns, track_running_stats=False) if batchnorm == "chunk" else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices), no_update:
            for e, cs in enumerate(chunks):
                grad = leaves[e].grad
                if grad is None:  # the loss ignores this encoder: no gradient, as in a full backward
                    continue
                ddp = _ddp_module(encs[e])
                for k, (args, g) in enumerate(zip(cs, grad.split(chunk_size))):
                    sync = ddp is None or last_use[id(ddp)] == (e, k)
                    _set_rng_state(states[e][k], devices)
                    with contextlib.nullcontext() if sync else ddp.no_sync():
                        z = encs[e](*args)
                        torch.autograd.backward(z, g)
    return CachedStepOutput(loss.detach(), tuple(embeddings))
