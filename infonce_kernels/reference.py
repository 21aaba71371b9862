"""The ``reference`` backend: plain PyTorch that materialises the M x N logit matrix.

It is the oracle the other backends are tested against and the baseline the benchmarks beat.
Same contract as every backend (see :mod:`infonce_kernels.ops.backends`); which pairs are left
out is :meth:`infonce_kernels.ops.Exclusion.mask` (its threshold rule reads the logits computed
here, ``(q k^T) * s`` in the accumulation dtype).
"""

from dataclasses import replace

import torch

from .ops.precision import accumulation_dtype

__all__ = ["forward", "backward", "backward_paired", "logits"]


def _accumulate(x: torch.Tensor) -> torch.Tensor:
    return x.to(accumulation_dtype(x.dtype))


def logits(q, k, scale, spec) -> torch.Tensor:
    """(M, N) masked logits ``s * q k^T`` in the accumulation dtype, -inf on excluded pairs."""
    dots = _accumulate(q) @ _accumulate(k).T
    return _masked(dots * scale.to(dots.dtype), spec)


def _masked(raw, spec, key_offset=0):
    """``raw`` (M, N) logits with -inf on the pairs ``spec`` excludes."""
    return raw.masked_fill(spec.mask(raw.shape[1], key_offset=key_offset, logits=raw), float("-inf"))


def forward(q, k, scale, spec, *, count=False):
    """(M,) row log-sum-exp, float32 (float64 for float64 inputs); with ``count`` also the (M,)
    int32 number of keys each row's threshold rule drops among those the other rules keep."""
    dots = _accumulate(q) @ _accumulate(k).T
    raw = dots * scale.to(dots.dtype)
    lse = torch.logsumexp(_masked(raw, spec), dim=1)
    if not count:
        return lse
    others = replace(spec, threshold=None).mask(k.shape[0])
    return lse, (spec.threshold_drops(raw) & ~others).sum(1, dtype=torch.int32)


def backward(grad, q, k, scale, spec, lse):
    """(dq, dk, dscale) of ``sum_i grad_i lse_i``; dk is empty when ``spec.symmetric`` (dq is dz)."""
    qa, ka = _accumulate(q), _accumulate(k)
    s = scale.to(qa.dtype)
    dots = qa @ ka.T
    w = torch.exp(_masked(dots * s, spec) - lse[:, None]) * grad[:, None]
    dscale = (w * dots).sum().to(scale.dtype)
    if spec.symmetric:
        return (s * ((w + w.T) @ qa)).to(q.dtype), q.new_empty(0), dscale
    return (s * (w @ ka)).to(q.dtype), (s * (w.T @ qa)).to(k.dtype), dscale


def backward_paired(grad, q, k, scale, spec, lse, key_grad, key_lse, key_spec, row_offset):
    """(dq, dscale) when the keys are rows of a log-sum-exp too (the paired backward):
    dq_i = s sum_j (W_ij + V_ji) k_j with V_ji = h_j exp(s <q_i, k_j> - rho_j) on the pairs that
    key j, as a row, keeps (its keys are the rows of q, numbered from ``row_offset``)."""
    qa, ka = _accumulate(q), _accumulate(k)
    s = scale.to(qa.dtype)
    dots = qa @ ka.T
    w = torch.exp(_masked(dots * s, spec) - lse[:, None]) * grad[:, None]
    # Key j as a row over the rows of q (numbered from row_offset): the transposed logits.
    v = torch.exp(_masked((dots * s).T, key_spec, row_offset) - key_lse[:, None]).T * key_grad[None, :]
    return (s * ((w + v) @ ka)).to(q.dtype), (w * dots).sum().to(scale.dtype)
