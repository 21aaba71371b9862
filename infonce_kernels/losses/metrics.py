"""Alignment and uniformity of embeddings (Wang & Isola, "Understanding Contrastive
Representation Learning through Alignment and Uniformity on the Hypersphere", ICML 2020).

Uniformity is a log mean Gaussian kernel over all pairs, fused over the row log-sum-exp of
:func:`infonce_kernels.lse` (on unit rows exp(-t||a-b||^2) = exp(2t<a,b> - 2t)), so no N x N
tensor exists.
"""

import math

import torch

from .. import _validation as v
from .. import distributed
from ..ops import accumulation_dtype
from ._common import l2_normalize, rank_rows, shared_doc
from .kcl import kernel_lse, unit_rows

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
    v.positive_float("alpha", alpha)
    v.check_values({"x": x, "y": y})
    if normalize:
        x, y = l2_normalize(x), l2_normalize(y)
    dtype = accumulation_dtype(x.dtype)
    diff = x.to(dtype) - y.to(dtype)
    sq = (diff * diff).sum(1)
    if alpha == 2:
        dist = sq
    else:
        nonzero = sq > 0
        dist = torch.where(nonzero, torch.where(nonzero, sq, 1).pow(alpha / 2), 0)
    return v.reduce(dist, reduction)


@shared_doc
def uniformity(x, t=2, *, normalize=True, backend="auto", gather_distributed=False, group=None):
    """Uniformity loss ``log mean_{i != j} exp(-t ||x_i - x_j||^2)`` (Wang & Isola's
    ``uniform_loss``; ``torch.pdist``'s pairs i < j give the same mean as i != j).

    Fused: ``logsumexp_i(lse(x, x, 2t, {self})_i) - 2t - log(N (N - 1))`` on the unit rows.

    Args:
        x: (N, d) embeddings, N >= 2; float16, bfloat16, float32 or float64.
        t: t > 0, a float or a one-element tensor. Default 2.
        normalize: L2-normalise the rows first. With ``normalize=False`` the rows must already be
            unit-norm (checked: ValueError otherwise), since the identity holds on the sphere.
        backend: $backend
        gather_distributed: the pairs are those of the rows of every rank of ``group`` (default:
            the world); every rank returns the uniformity of the whole batch, and its gradients,
            averaged over the ranks as DistributedDataParallel does, are those of the whole
            batch (the row log-sum-exps are gathered with a gather whose backward sums them).

    Returns:
        A 0-d tensor, float32 (float64 for float64 inputs), in nats (log of a mean kernel value),
        in [-4t, 0] on unit rows; lower is more uniform.
    """
    v.check_features("x", x)
    if x.shape[0] < 2 and not gather_distributed:
        raise ValueError("x needs at least 2 rows: uniformity is a mean over pairs i != j")
    dtype = accumulation_dtype(x.dtype)
    t = v.positive_scalar("t", t, device=x.device, dtype=dtype)
    v.check_values({"x": x}, positive={"t": t})
    x = unit_rows("x", x, normalize)
    where = rank_rows(x.shape[0], x.device, gather_distributed, group)
    r = kernel_lse(x, t, backend, where)
    if where is not None:
        r = distributed.gather_rows_with_grad(r[:, None], where)[:, 0]
    n = r.shape[0]
    return torch.logsumexp(r, 0) - 2 * t - math.log(n * (n - 1))
