"""Decoupled contrastive losses over the fused :func:`infonce_kernels.lse`: DCL and DCLW
(Yeh et al., "Decoupled Contrastive Learning", ECCV 2022) and DHEL (Koromilas et al., "Bridging
Mini-Batch and Asymptotic Analysis in Contrastive Learning: From InfoNCE to Kernel-Based Losses",
ICML 2024).

All of them remove the positive from the denominator; the fused op does it with per-row excluded
key indices, so no N x N tensor exists.
"""

import math
import numbers

import torch

from . import _validation as v
from . import distributed
from .losses import _inverse_temperature, _row_dot, check_views, l2_normalize, two_views
from .ops import fused_lse

__all__ = ["dcl", "dclw", "dhel", "DCLLoss", "DCLWLoss", "DHELLoss"]


def _positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


def _decoupled(z1, z2, temperature, sigma, detach_weights, normalize, reduction, backend, name,
               gather_distributed, group):
    z, b, scale = two_views(name, z1, z2, temperature, normalize, reduction, gather_distributed)
    n = z.shape[0]
    index = torch.arange(n, device=z.device)
    exclude = torch.stack([index, (index + b) % n], dim=1)  # {self, positive}
    cos = _row_dot(z[:b], z[b:])  # (B,) <z1_i, z2_i> in the lse dtype
    pos = cos * scale
    where = distributed.rank_rows(n, z.device, group) if gather_distributed else None
    if sigma is not None:
        # negative von Mises-Fisher weights (detached by default, as lightly), normalised over
        # the B pairs of the whole batch
        w_cos = cos.detach() if detach_weights else cos
        if where is None:
            weights = b * torch.softmax(w_cos / sigma, dim=0)
        else:
            pairs = distributed.rank_rows(b, z.device, group)
            all_cos = distributed.gather_rows_with_grad(w_cos[:, None], pairs)[:, 0]
            weights = pairs.total * torch.exp(w_cos / sigma - torch.logsumexp(all_cos / sigma, 0))
        pos = pos * (2.0 - weights)
    if where is None:
        r = fused_lse(z, z, scale, exclude, True, backend)
        return v.reduce(r - torch.cat([pos, pos]), reduction)
    r = distributed.gathered_lse(z, scale, *distributed.pair_exclusions(where, True), where, backend=backend)
    return distributed.scale_loss(r - torch.cat([pos, pos]), reduction, where)


def dcl(z1, z2, temperature=0.1, *, normalize=True, reduction="mean", backend="auto", gather_distributed=False,
        group=None):
    """Decoupled contrastive loss (DCL, Yeh et al. 2022, Eq. 6): NT-Xent without the positive in
    the denominator.

    With z = cat[z1, z2] (2B rows, normalised when ``normalize``) and pos(i) the other view of
    row i,

        loss_i = -<z_i, z_pos(i)>/tau + log sum_{j not in {i, pos(i)}} exp(<z_i, z_j>/tau),

    one log-sum-exp over the 2B - 2 negatives of both views (the paper's Eq. 6 and the authors'
    reference code; lightly's ``DCLLoss`` instead adds two separate log-sum-exps, one per view,
    which lightly-ai/lightly PR #1826 reports as a bug). The mean runs over the 2B anchors of
    both views, i.e. lightly's ``0.5 * (loss0 + loss1)``. Fused as
    ``lse(z, z, 1/tau, exclude={i, pos(i)}) - <z_i, z_pos(i)>/tau``.

    Args:
        z1, z2: (B, d) embeddings of two views of the same B samples, B >= 2; float16, bfloat16,
            float32 or float64 on one device.
        temperature: tau > 0, a float or a one-element tensor (learnable). Default 0.1 (lightly).
        normalize: L2-normalise the rows first (as the paper and lightly do).
        reduction: "mean" | "sum" over the 2B anchors, or "none" for the (2B,) per-anchor losses
            ordered [anchors of z1; anchors of z2].
        backend: see :func:`infonce_kernels.lse`.
        gather_distributed: each rank's rows are anchors against the rows of every rank of
            ``group`` (default: the world), with the O(N)-traffic backward and the loss
            convention of :mod:`infonce_kernels.distributed`.

    Returns:
        A 0-d tensor (or (2B,) for "none"), float32 (float64 for float64 inputs), in nats. It can
        be negative: the positive no longer bounds the denominator from below.
    """
    return _decoupled(z1, z2, temperature, None, True, normalize, reduction, backend, "dcl", gather_distributed,
                      group)


def dclw(z1, z2, temperature=0.1, sigma=0.5, *, detach_weights=True, normalize=True, reduction="mean",
         backend="auto", gather_distributed=False, group=None):
    """Weighted decoupled contrastive loss (DCLW, Yeh et al. 2022): :func:`dcl` with the positive
    term weighted by the negative von Mises-Fisher weight

        w_i = 2 - exp(<z1_i, z2_i>/sigma) / ((1/B) sum_j exp(<z1_j, z2_j>/sigma))
            = 2 - B * softmax_j(<z1_j, z2_j>/sigma)_i,

        loss_i = -w_i <z_i, z_pos(i)>/tau + log sum_{j not in {i, pos(i)}} exp(<z_i, z_j>/tau).

    The expectation in the paper's weight is the batch mean over the B positive pairs (factor B,
    not 2B: lightly's ``negative_mises_fisher_weights`` uses ``out0.shape[0]``); the same w_i
    weights both views' anchors of pair i and is computed on the normalised rows. By default the
    weights get no gradient (detached, as lightly's ``DCLWLoss``); ``detach_weights=False``
    differentiates through them too (as the unofficial reference code raminnakhli/
    Decoupled-Contrastive-Learning that lightly cites). Mean over the 2B anchors (lightly).

    Args:
        z1, z2: (B, d) embeddings of two views, B >= 2; float16, bfloat16, float32 or float64.
        temperature: tau > 0, a float or a one-element tensor (learnable). Default 0.1.
        sigma: sigma > 0 (a float), the weight's temperature. Default 0.5 (the paper, lightly).
        detach_weights: compute w without gradient (default True, lightly's convention).
        normalize: L2-normalise the rows first.
        reduction: "mean" | "sum" over the 2B anchors, or "none" for (2B,) [z1 anchors; z2 anchors].
        backend: see :func:`infonce_kernels.lse`.
        gather_distributed: each rank's rows are anchors against the rows of every rank of
            ``group`` (default: the world), with the O(N)-traffic backward and the loss
            convention of :mod:`infonce_kernels.distributed`.

    Returns:
        A 0-d tensor (or (2B,)), float32 (float64 for float64 inputs), in nats.
    """
    sigma = _positive_float("sigma", sigma)
    if not isinstance(detach_weights, bool):
        raise TypeError(f"detach_weights must be a bool, got {type(detach_weights).__name__}")
    return _decoupled(z1, z2, temperature, sigma, detach_weights, normalize, reduction, backend, "dclw",
                      gather_distributed, group)


def dhel(z1, z2, temperature=0.3, include_augs=True, *, normalize=True, reduction="mean", backend="auto",
         gather_distributed=False, group=None):
    """Decoupled Hyperspherical Energy Loss (DHEL, Koromilas et al. 2024).

    With u = z1, v = z2 (rows normalised when ``normalize``), anchors u_i, positives v_i and the
    negatives the other rows of the anchor's own view only:

        loss_i = -<u_i, v_i>/tau + log sum_{j != i} exp(<u_i, u_j>/tau)
                                [+ log sum_{j != i} exp(<v_i, v_j>/tau)    if include_augs]

    ``include_augs`` follows the authors' code (pakoromilas/DHEL-KCL ``losses.DHEL``), which
    divides the positive by the *product* of the two views' energies,
    ``-log(pos / (sum_j exp(u_i u_j/tau) * sum_j exp(v_i v_j/tau)))``: the v term is *added*
    (not averaged) to the u term, and the alignment term is counted once. The mean runs over the
    B anchors. Fused as ``lse(u, u, 1/tau, {self}) [+ lse(v, v, 1/tau, {self})] - <u_i, v_i>/tau``.

    Args:
        z1, z2: (B, d) embeddings of the anchors and of their positives (the other view),
            B >= 2; float16, bfloat16, float32 or float64 on one device.
        temperature: tau > 0, a float or a one-element tensor (learnable). Default 0.3 (the paper).
        include_augs: add the uniformity (energy) term of the second view. Default True.
        normalize: L2-normalise the rows first (the authors' code always does).
        reduction: "mean" | "sum" over the B anchors, or "none" for the (B,) per-anchor losses.
        backend: see :func:`infonce_kernels.lse`.
        gather_distributed: each rank's rows are anchors against the rows of every rank of
            ``group`` (default: the world), with the O(N)-traffic backward and the loss
            convention of :mod:`infonce_kernels.distributed`.

    Returns:
        A 0-d tensor (or (B,)), float32 (float64 for float64 inputs), in nats.
    """
    check_views("dhel", z1, z2, reduction, gather_distributed)
    if not isinstance(include_augs, bool):
        raise TypeError(f"include_augs must be a bool, got {type(include_augs).__name__}")
    scale = _inverse_temperature(temperature, z1)
    v.check_values({"z1": z1, "z2": z2}, positive={"temperature": scale})
    u, w = (l2_normalize(z1), l2_normalize(z2)) if normalize else (z1, z2)
    self_index = torch.arange(u.shape[0], device=u.device)[:, None]
    if gather_distributed:
        where = distributed.rank_rows(u.shape[0], u.device, group)
        exclusions = distributed.pair_exclusions(where, False)  # self only

        def energy(x):
            return distributed.gathered_lse(x, scale, *exclusions, where, backend=backend)
    else:
        def energy(x):
            return fused_lse(x, x, scale, self_index, True, backend)

    loss = energy(u) - _row_dot(u, w) * scale
    if include_augs:
        loss = loss + energy(w)
    return distributed.scale_loss(loss, reduction, where) if gather_distributed else v.reduce(loss, reduction)


class _PairLossModule(torch.nn.Module):
    def __init__(self, temperature, normalize, reduction, backend, gather_distributed, group):
        super().__init__()
        v.check_reduction(reduction)
        self.temperature, self.normalize, self.reduction, self.backend = temperature, normalize, reduction, backend
        self.gather_distributed, self.group = gather_distributed, group

    def _kwargs(self):
        return {"normalize": self.normalize, "reduction": self.reduction, "backend": self.backend,
                "gather_distributed": self.gather_distributed, "group": self.group}

    def extra_repr(self):
        return (f"temperature={self.temperature}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class DCLLoss(_PairLossModule):
    """Module form of :func:`dcl`: ``DCLLoss(temperature=0.1)(z1, z2)``."""

    def __init__(self, temperature=0.1, *, normalize=True, reduction="mean", backend="auto",
                 gather_distributed=False, group=None):
        super().__init__(temperature, normalize, reduction, backend, gather_distributed, group)

    def forward(self, z1, z2):
        return dcl(z1, z2, self.temperature, **self._kwargs())


class DCLWLoss(_PairLossModule):
    """Module form of :func:`dclw`: ``DCLWLoss(temperature=0.1, sigma=0.5)(z1, z2)``."""

    def __init__(self, temperature=0.1, sigma=0.5, *, detach_weights=True, normalize=True, reduction="mean",
                 backend="auto", gather_distributed=False, group=None):
        super().__init__(temperature, normalize, reduction, backend, gather_distributed, group)
        self.sigma, self.detach_weights = _positive_float("sigma", sigma), bool(detach_weights)

    def forward(self, z1, z2):
        return dclw(z1, z2, self.temperature, self.sigma, detach_weights=self.detach_weights, **self._kwargs())

    def extra_repr(self):
        return f"sigma={self.sigma}, detach_weights={self.detach_weights}, " + super().extra_repr()


class DHELLoss(_PairLossModule):
    """Module form of :func:`dhel`: ``DHELLoss(temperature=0.3, include_augs=True)(z1, z2)``."""

    def __init__(self, temperature=0.3, include_augs=True, *, normalize=True, reduction="mean", backend="auto",
                 gather_distributed=False, group=None):
        super().__init__(temperature, normalize, reduction, backend, gather_distributed, group)
        if not isinstance(include_augs, bool):
            raise TypeError(f"include_augs must be a bool, got {type(include_augs).__name__}")
        self.include_augs = include_augs

    def forward(self, z1, z2):
        return dhel(z1, z2, self.temperature, self.include_augs, **self._kwargs())

    def extra_repr(self):
        return f"include_augs={self.include_augs}, " + super().extra_repr()
