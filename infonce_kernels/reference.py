"""The ``reference`` backend: plain PyTorch that materialises the M x N logit matrix.

It is the oracle the other backends are tested against and the baseline the benchmarks beat.
Same contract as every backend (see :mod:`infonce_kernels.ops.backends`); which pairs are left
out is :meth:`infonce_kernels.ops.Exclusion.mask`.
"""

import torch

from .ops.precision import accumulation_dtype

__all__ = ["forward", "backward", "backward_paired", "logits"]


def _accumulate(x: torch.Tensor) -> torch.Tensor:
    return x.to(accumulation_dtype(x.dtype))


def logits(q, k, scale, spec) -> torch.Tensor:
    """(M, N) masked logits ``s * q k^T`` in the accumulation dtype, -inf on excluded pairs."""
    dots = _accumulate(q) @ _accumulate(k).T
    return (dots * scale.to(dots.dtype)).masked_fill(spec.mask(k.shape[0]), float("-inf"))


def forward(q, k, scale, spec):
    """(M,) row log-sum-exp, float32 (float64 for float64 inputs)."""
    return torch.logsumexp(logits(q, k, scale, spec), dim=1)


def backward(grad, q, k, scale, spec, lse):
    """(dq, dk, dscale) of ``sum_i grad_i lse_i``; dk is empty when ``spec.symmetric`` (dq is dz)."""
    qa, ka = _accumulate(q), _accumulate(k)
    s = scale.to(qa.dtype)
    dots = qa @ ka.T
    w = torch.exp((dots * s).masked_fill(spec.mask(k.shape[0]), float("-inf")) - lse[:, None])
    w = w * grad[:, None]
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
    w = torch.exp((dots * s).masked_fill(spec.mask(k.shape[0]), float("-inf")) - lse[:, None]) * grad[:, None]
    key_mask = key_spec.mask(q.shape[0], key_offset=row_offset)  # (N, M)
    v = torch.exp((dots * s).masked_fill(key_mask.T, float("-inf")) - key_lse[None, :]) * key_grad[None, :]
    return (s * ((w + v) @ ka)).to(q.dtype), (w * dots).sum().to(scale.dtype)
