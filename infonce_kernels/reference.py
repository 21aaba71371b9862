"""The ``reference`` backend: plain PyTorch that materialises the M x N logit matrix.

It is the oracle the other backends are tested against and the baseline the benchmarks beat.
Same contract as every backend (see :mod:`infonce_kernels.ops`): contiguous inputs, ``scale`` a
0-d tensor, ``exclude`` an (M, E) int64 tensor with -1 for "none".
"""

import torch

__all__ = ["forward", "backward", "logits"]


def _accumulate(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _excluded(exclude: torch.Tensor, num_keys: int) -> torch.Tensor:
    """(M, N) bool, True where row i excludes key j. -1 entries go to a spare column."""
    rows = exclude.shape[0]
    mask = torch.zeros(rows, num_keys + 1, dtype=torch.bool, device=exclude.device)
    index = torch.where(exclude < 0, torch.full_like(exclude, num_keys), exclude)
    mask.scatter_(1, index, True)
    return mask[:, :num_keys]


def logits(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """(M, N) masked logits ``s * q k^T`` in the accumulation dtype, -inf on excluded pairs."""
    dots = _accumulate(q) @ _accumulate(k).T
    return (dots * scale.to(dots.dtype)).masked_fill(_excluded(exclude, k.shape[0]), float("-inf"))


def forward(q, k, scale, exclude, symmetric):
    """(M,) row log-sum-exp, float32 (float64 for float64 inputs)."""
    return torch.logsumexp(logits(q, k, scale, exclude), dim=1)


def backward(grad, q, k, scale, exclude, symmetric, lse):
    """(dq, dk, dscale) of ``sum_i grad_i lse_i``; dk is empty when ``symmetric`` (dq is dz)."""
    qa, ka = _accumulate(q), _accumulate(k)
    s = scale.to(qa.dtype)
    dots = qa @ ka.T
    w = torch.exp((dots * s).masked_fill(_excluded(exclude, k.shape[0]), float("-inf")) - lse[:, None])
    w = w * grad[:, None]
    dscale = (w * dots).sum().to(scale.dtype)
    if symmetric:
        return (s * ((w + w.T) @ qa)).to(q.dtype), q.new_empty(0), dscale
    return (s * (w @ ka)).to(q.dtype), (s * (w.T @ qa)).to(k.dtype), dscale
