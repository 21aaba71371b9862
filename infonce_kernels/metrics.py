"""Alignment and uniformity of embeddings (Wang & Isola, "Understanding Contrastive
Representation Learning through Alignment and Uniformity on the Hypersphere", ICML 2020).

Uniformity is a log mean Gaussian kernel over all pairs, fused over the row log-sum-exp of
:func:`infonce_kernels.lse` (on unit rows exp(-t||a-b||^2) = exp(2t<a,b> - 2t)), so no N x N
tensor exists.
"""

import math
import numbers

import torch

from . import _validation as v
from .kernel_losses import unit_rows
from .losses import l2_normalize
from .ops import _lse_dtype, fused_lse

__all__ = ["alignment", "uniformity"]


def alignment(x, y, alpha=2, *, normalize=True, reduction="mean"):
    """Alignment loss ``mean_i ||x_i - y_i||_2^alpha`` (Wang & Isola's ``align_loss``).

    Args:
        x, y: (N, d) embeddings of positive pairs (row i of x with row i of y); float16, bfloat16,
            float32 or float64 on one device.
        alpha: exponent > 0 (a float). Default 2.
        normalize: L2-normalise the rows first (Wang & Isola assume unit-norm embeddings).
        reduction: "mean" (the metric), "sum", or "none" for the (N,) per-pair values.

    Returns:
        A 0-d tensor (or (N,)), float32 (float64 for float64 inputs), in units of distance^alpha
        (in [0, 2^alpha] on unit rows). The gradient at x_i = y_i is 0.
    """
    v.check_features("x", x)
    v.check_features("y", y)
    v.check_same_kind("x", x, "y", y, same_rows=True)
    v.check_reduction(reduction)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be positive and finite, got {alpha}")
    v.check_values({"x": x, "y": y})
    if normalize:
        x, y = l2_normalize(x), l2_normalize(y)
    dtype = _lse_dtype(x.dtype)
    diff = x.to(dtype) - y.to(dtype)
    sq = (diff * diff).sum(1)
    if alpha == 2:
        dist = sq
    else:
        nonzero = sq > 0
        dist = torch.where(nonzero, torch.where(nonzero, sq, 1).pow(alpha / 2), 0)
    return v.reduce(dist, reduction)


def uniformity(x, t=2, *, normalize=True, backend="auto"):
    """Uniformity loss ``log mean_{i != j} exp(-t ||x_i - x_j||^2)`` (Wang & Isola's
    ``uniform_loss``; ``torch.pdist``'s pairs i < j give the same mean as i != j).

    Fused: ``logsumexp_i(lse(x, x, 2t, {self})_i) - 2t - log(N (N - 1))`` on the unit rows.

    Args:
        x: (N, d) embeddings, N >= 2; float16, bfloat16, float32 or float64.
        t: t > 0, a float or a one-element tensor. Default 2.
        normalize: L2-normalise the rows first. With ``normalize=False`` the rows must already be
            unit-norm (checked: ValueError otherwise), since the identity holds on the sphere.
        backend: see :func:`infonce_kernels.lse`.

    Returns:
        A 0-d tensor, float32 (float64 for float64 inputs), in nats (log of a mean kernel value),
        in [-4t, 0] on unit rows; lower is more uniform.
    """
    v.check_features("x", x)
    if x.shape[0] < 2:
        raise ValueError("x needs at least 2 rows: uniformity is a mean over pairs i != j")
    dtype = _lse_dtype(x.dtype)
    t = v.positive_scalar("t", t, device=x.device, dtype=dtype)
    v.check_values({"x": x}, positive={"t": t})
    x = unit_rows("x", x, normalize)
    n = x.shape[0]
    self_index = torch.arange(n, device=x.device)[:, None]
    r = fused_lse(x, x, 2 * t, self_index, True, backend)
    return torch.logsumexp(r, 0) - 2 * t - math.log(n * (n - 1))
