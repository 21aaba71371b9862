"""The ``reference`` backend: plain PyTorch that materialises the M x N logit matrix.

It is the oracle the other backends are tested against and the baseline the benchmarks beat.
Same contract as every backend (see :mod:`infonce_kernels.ops`): contiguous inputs, ``scale`` a
0-d tensor, ``exclude`` an (M, E) int64 tensor with -1 for "none".
"""

import torch

__all__ = ["forward", "backward", "backward_paired", "logits", "excluded"]


def _accumulate(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def excluded(exclude, row_labels, key_labels, positive, num_keys: int) -> torch.Tensor:
    """(M, N) bool, True where row i leaves key j out (its list, or the label rule)."""
    rows = exclude.shape[0]
    mask = torch.zeros(rows, num_keys + 1, dtype=torch.bool, device=exclude.device)
    index = torch.where(exclude < 0, torch.full_like(exclude, num_keys), exclude)  # -1: spare column
    mask.scatter_(1, index, True)
    mask = mask[:, :num_keys]
    if row_labels.numel():
        same = row_labels[:, None] == key_labels[None, :]
        same &= positive[:, None] != torch.arange(num_keys, device=same.device)[None, :]
        mask = mask | same
    return mask


def logits(q, k, scale, exclude, row_labels, key_labels, positive) -> torch.Tensor:
    """(M, N) masked logits ``s * q k^T`` in the accumulation dtype, -inf on excluded pairs."""
    dots = _accumulate(q) @ _accumulate(k).T
    mask = excluded(exclude, row_labels, key_labels, positive, k.shape[0])
    return (dots * scale.to(dots.dtype)).masked_fill(mask, float("-inf"))


def forward(q, k, scale, exclude, row_labels, key_labels, positive, symmetric):
    """(M,) row log-sum-exp, float32 (float64 for float64 inputs)."""
    return torch.logsumexp(logits(q, k, scale, exclude, row_labels, key_labels, positive), dim=1)


def backward(grad, q, k, scale, exclude, row_labels, key_labels, positive, symmetric, lse):
    """(dq, dk, dscale) of ``sum_i grad_i lse_i``; dk is empty when ``symmetric`` (dq is dz)."""
    qa, ka = _accumulate(q), _accumulate(k)
    s = scale.to(qa.dtype)
    dots = qa @ ka.T
    mask = excluded(exclude, row_labels, key_labels, positive, k.shape[0])
    w = torch.exp((dots * s).masked_fill(mask, float("-inf")) - lse[:, None])
    w = w * grad[:, None]
    dscale = (w * dots).sum().to(scale.dtype)
    if symmetric:
        return (s * ((w + w.T) @ qa)).to(q.dtype), q.new_empty(0), dscale
    return (s * (w @ ka)).to(q.dtype), (s * (w.T @ qa)).to(k.dtype), dscale


def backward_paired(grad, q, k, scale, exclude, row_labels, key_labels, positive, lse,
                    key_grad, key_lse, key_exclude, key_positive, row_offset):
    """(dq, dscale) when the keys are rows of a log-sum-exp too (see ``lse_bwd_paired``):
    dq_i = s sum_j (W_ij + V_ji) k_j with V_ji = h_j exp(s <q_i, k_j> - rho_j) on the pairs that
    key j, as a row, keeps (its keys are the rows of q, numbered from ``row_offset``)."""
    qa, ka = _accumulate(q), _accumulate(k)
    s = scale.to(qa.dtype)
    dots = qa @ ka.T
    rows = q.shape[0]
    w = torch.exp((dots * s).masked_fill(excluded(exclude, row_labels, key_labels, positive, k.shape[0]),
                                         float("-inf")) - lse[:, None]) * grad[:, None]
    # Key j's exclusions renumbered to the rows of q; entries outside them exclude nothing.
    local = key_exclude - row_offset
    local = torch.where((key_exclude >= 0) & (local >= 0) & (local < rows), local, torch.full_like(local, -1))
    key_mask = excluded(local, key_labels, row_labels, key_positive - row_offset, rows)  # (N, M)
    v = torch.exp((dots * s).masked_fill(key_mask.T, float("-inf")) - key_lse[None, :]) * key_grad[None, :]
    return (s * ((w + v) @ ka)).to(q.dtype), (w * dots).sum().to(scale.dtype)
