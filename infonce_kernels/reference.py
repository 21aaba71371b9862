"""The ``reference`` backend: plain PyTorch that materialises the M x N logit matrix.

It is the oracle the other backends are tested against and the baseline the benchmarks beat.
Same contract as every backend (see :mod:`infonce_kernels.ops.backends`); which pairs are left
out is :meth:`infonce_kernels.ops.Exclusion.mask` (its threshold rule reads the logits computed
here, ``(q k^T) * s`` in the accumulation dtype).
"""

from dataclasses import replace

import torch

from .ops.precision import accumulation_dtype

__all__ = ["forward", "backward", "backward_paired", "logits", "sigmoid_forward", "sigmoid_backward",
           "sigmoid_logits", "sigmoid_positive"]


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


# ------------------------------------------------------------------ the pairwise sigmoid op
def sigmoid_positive(rows, cols, labels, offset, device) -> torch.Tensor:
    """(M, N) bool: pair (i, j) is positive (z_ij = +1): ``row_labels[i] == col_labels[j]`` with
    ``labels = (row_labels, col_labels)``, else ``i + offset == j``."""
    if labels:
        row_labels, col_labels = labels
        return row_labels[:, None] == col_labels[None, :]
    i = torch.arange(rows, device=device)[:, None]
    return i + offset == torch.arange(cols, device=device)[None, :]


def sigmoid_logits(x, y, scale, bias) -> torch.Tensor:
    """(M, N) logits ``l = t x y^T + b`` in the accumulation dtype."""
    return (_accumulate(x) @ _accumulate(y).T) * scale + bias


def sigmoid_forward(x, y, scale, bias, labels, offset, with_grad):
    """``(rows,)``, or ``(rows, dx, dy, dscale, dbias)`` for a unit upstream gradient when
    ``with_grad``: rows_i = sum_j softplus(-z_ij l_ij) (M,), accumulation dtype."""
    l = sigmoid_logits(x, y, scale, bias)
    u = torch.where(sigmoid_positive(*l.shape, labels, offset, l.device), -l, l)
    rows = (u.clamp_min(0) + torch.log1p(torch.exp(-u.abs()))).sum(1)  # softplus, stably
    if not with_grad:
        return (rows,)
    return (rows, *sigmoid_backward(torch.ones_like(rows), x, y, scale, bias, labels, offset))


def sigmoid_backward(grad, x, y, scale, bias, labels, offset):
    """(dx, dy, dscale, dbias) of ``sum_i grad_i rows_i``: with G_ij = grad_i (sigmoid(l_ij) -
    [z_ij = 1]), dx = t G y, dy = t G^T x, dscale = sum G_ij <x_i, y_j>, dbias = sum G_ij."""
    xa, ya = _accumulate(x), _accumulate(y)
    dots = xa @ ya.T
    l = dots * scale + bias
    g = (torch.sigmoid(l) - sigmoid_positive(*l.shape, labels, offset, l.device).to(l.dtype)) * grad[:, None]
    return ((scale * (g @ ya)).to(x.dtype), (scale * (g.T @ xa)).to(y.dtype),
            (g * dots).sum().to(scale.dtype), g.sum().to(bias.dtype))
