"""Kernel contrastive loss (KCL, Koromilas et al., ICML 2024) with the Gaussian kernel, over the
fused :func:`infonce_kernels.lse`.

On the unit sphere the Gaussian kernel is the exponential of an inner product,

    K(u, v) = exp(-t ||u - v||^2) = exp(2t <u, v> - 2t),

so a row's kernel sum is the exponential of a row log-sum-exp at scale 2t:
``sum_{j != i} K(u_i, u_j) = exp(lse(u, u, 2t, {self})_i - 2t)``, and the mean pairwise energy is

    log mean_{i != j} K(u_i, u_j) = logsumexp_i( lse(u, u, 2t, {self})_i ) - 2t - log(N (N - 1)).

No N x N tensor exists.
"""

import math

import torch
import torch.distributed as dist

from .. import _validation as v
from .. import distributed
from ..ops import Exclusion, accumulation_dtype, fused_lse
from ._common import LossModule, l2_normalize, pair_lse, rank_rows, reduce_rows, shared_doc

__all__ = ["kcl", "KCLLoss", "KERNELS"]

KERNELS = ("gaussian",)


def unit_rows(name: str, x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``x`` L2-normalised, or (``normalize=False``) checked to have unit rows already: the
    Gaussian-kernel identity above holds on the sphere only."""
    if normalize:
        return l2_normalize(x)
    if not v.tracing():
        dtype = accumulation_dtype(x.dtype)
        tol = max(1e-6, 8 * torch.finfo(x.dtype).eps)
        with torch.no_grad():
            err = ((x.to(dtype) ** 2).sum(1) - 1).abs().max().item()
        if not err <= tol:
            raise ValueError(f"{name} must have unit-norm rows when normalize=False (the Gaussian kernel is "
                             f"fused as exp(2t<u,v> - 2t) on the sphere): max | ||row||^2 - 1 | = {err:.3g}")
    return x


def check_kernel(kernel):
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be 'gaussian', got {kernel!r}: only the Gaussian kernel is LSE-shaped "
                         "(exp(-t||u-v||^2) = exp(2t<u,v> - 2t) on the sphere); the 'log', 'imq' and 'riesz' "
                         "kernels of the KCL paper are not a log-sum-exp of inner products")


def kernel_lse(u, t, backend, where=None):
    """(N,) ``log sum_{j != i} exp(-t ||u_i - u_j||^2) + 2t`` for rows u, against every rank's
    rows when ``where``: on unit rows ``lse(u, u, 2t, {self})``, since there
    ``-t ||u_i - u_j||^2 = 2t <u_i, u_j> - 2t``.

    Rows that normalisation cannot put on the sphere (zero rows, or rows shorter than its eps)
    break that identity; with any of them (or while torch.compile traces, where the check cannot
    run) the exact form ``2t <u_i, u_j> - t n_j - t n_i`` (n = squared norms) is used: one
    log-sum-exp of rows [u_i, 1] against keys [u_j, -n_j/2] at scale 2t, minus t n_i.
    """
    dtype = accumulation_dtype(u.dtype)
    norms = (u.to(dtype) ** 2).sum(1)  # n_i = ||u_i||^2
    if not v.tracing():
        short = (norms < 0.5).any().to(torch.int32)
        if where is not None:
            dist.all_reduce(short, op=dist.ReduceOp.MAX, group=where.group)  # every rank takes one path
        if not bool(short):
            return pair_lse(u, 2 * t, False, backend, where)
    rows = torch.cat([u.to(dtype), torch.ones_like(norms)[:, None]], 1)
    keys = torch.cat([u.to(dtype), -0.5 * norms[:, None]], 1)
    offset = 0
    if where is not None:
        keys, offset = distributed.gather_rows_with_grad(keys, where), where.offset
    r = fused_lse(rows, keys, 2 * t, Exclusion.itself(u.shape[0], u.device, offset=offset, symmetric=False), backend)
    return r - t * norms + 2 * t


@shared_doc
def kcl(z1, z2, t=2.0, gamma=16.0, kernel="gaussian", *, normalize=True, reduction="mean", backend="auto",
        gather_distributed=False, group=None):
    """Kernel contrastive loss (KCL, Koromilas et al. 2024) with the Gaussian kernel
    K(a, b) = exp(-t ||a - b||^2):

        loss = -2 mean_i K(u_i, v_i) + gamma * ( mean_{i != j} K(u_i, u_j) + mean_{i != j} K(v_i, v_j) )

    (the authors' ``KCL``: ``-2 * align_gaussian(u, v, t) + gamma * (gaussian_kernel(u, t) +
    gaussian_kernel(v, t))``, ``torch.pdist``'s mean over pairs i < j equals the mean over i != j).
    The energies are computed as ``exp(logsumexp_i(lse(u, u, 2t, {self})_i) - 2t - log(N(N-1)))``
    on the unit rows; the alignment term as ``exp(-t ||u_i - v_i||^2)`` directly (O(N d)).

    Args:
        z1, z2: (N, d) embeddings u (anchors) and v (their positives), N >= 2; float16, bfloat16,
            float32 or float64 on one device.
        t: the kernel's t > 0 (1/length^2), a float or a one-element tensor. Default 2.0.
        gamma: the weight >= 0 of the energy (uniformity) terms, a float. Default 16.0.
        kernel: "gaussian" only; any other name raises ValueError (not LSE-shaped).
        normalize: L2-normalise the rows first (the authors' code always does). With
            ``normalize=False`` the rows must already be unit-norm (checked: ValueError otherwise).
        reduction: "mean" (the loss above), "sum" (N times it), or "none" for the (N,) per-anchor
            terms ``-2 K(u_i, v_i) + gamma * (E^u_i + E^v_i)`` with
            ``E^u_i = 1/(N-1) sum_{j != i} K(u_i, u_j)``, whose mean is the loss.
        backend: $backend
        gather_distributed: $gather "mean" is then the mean of the per-anchor terms of
            ``reduction="none"`` over the whole batch.

    Returns:
        A 0-d tensor (or (N,)), float32 (float64 for float64 inputs), dimensionless (kernel values).
    """
    check_kernel(kernel)
    v.check_features("z1", z1)
    v.check_features("z2", z2)
    v.check_same_kind("z1", z1, "z2", z2, same_rows=True)
    if z1.shape[0] < 2 and not gather_distributed:
        raise ValueError("kcl needs at least 2 pairs (z1 has 1 row): the energy is a mean over pairs i != j")
    v.check_reduction(reduction)
    gamma = v.positive_float("gamma", gamma, allow_zero=True)
    dtype = accumulation_dtype(z1.dtype)
    t = v.positive_scalar("t", t, device=z1.device, dtype=dtype)
    v.check_values({"z1": z1, "z2": z2}, positive={"t": t})
    u, w = unit_rows("z1", z1, normalize), unit_rows("z2", z2, normalize)
    where = rank_rows(u.shape[0], u.device, gather_distributed, group)
    n = u.shape[0] if where is None else where.total
    diff = u.to(dtype) - w.to(dtype)
    align = torch.exp(-t * (diff * diff).sum(1))  # (N,)
    r_u, r_w = kernel_lse(u, t, backend, where), kernel_lse(w, t, backend, where)
    if reduction == "none" or where is not None:
        log_norm = 2 * t + math.log(n - 1)
        per_row = -2 * align + gamma * (torch.exp(r_u - log_norm) + torch.exp(r_w - log_norm))
        return reduce_rows(per_row, reduction, where)
    log_norm = 2 * t + math.log(n * (n - 1))
    energy = torch.exp(torch.logsumexp(r_u, 0) - log_norm) + torch.exp(torch.logsumexp(r_w, 0) - log_norm)
    loss = -2 * align.mean() + gamma * energy
    return loss * n if reduction == "sum" else loss


class KCLLoss(LossModule):
    """Module form of :func:`kcl`: ``KCLLoss(t=2.0, gamma=16.0)(z1, z2)``."""

    def __init__(self, t=2.0, gamma=16.0, kernel="gaussian", *, normalize=True, reduction="mean", backend="auto",
                 gather_distributed=False, group=None):
        check_kernel(kernel)
        super().__init__(None, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, group=group)
        self.t, self.gamma, self.kernel = t, v.positive_float("gamma", gamma, allow_zero=True), kernel

    def forward(self, z1, z2):
        return kcl(z1, z2, self.t, self.gamma, self.kernel, **self.options())

    def _settings(self):
        return f"t={self.t}, gamma={self.gamma}, kernel={self.kernel!r}"
