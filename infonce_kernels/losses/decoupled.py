"""Decoupled contrastive losses over the fused :func:`infonce_kernels.lse`: DCL and DCLW
(Yeh et al., "Decoupled Contrastive Learning", ECCV 2022) and DHEL (Koromilas et al., "Bridging
Mini-Batch and Asymptotic Analysis in Contrastive Learning: From InfoNCE to Kernel-Based Losses",
ICML 2024).

All of them remove the positive from the denominator; the fused op does it with per-row excluded
key indices, so no N x N tensor exists.
"""

import torch

from .. import _validation as v
from .. import distributed
from ._common import (LossModule, check_views, inverse_temperature, l2_normalize, pair_lse, rank_rows, reduce_rows,
                      row_dot, shared_doc, two_views)

__all__ = ["dcl", "dclw", "dhel", "DCLLoss", "DCLWLoss", "DHELLoss"]


def _decoupled(z1, z2, temperature, sigma, detach_weights, normalize, reduction, backend, name,
               gather_distributed, group):
    z, b, scale = two_views(name, z1, z2, temperature, normalize, reduction, gather_distributed)
    cos = row_dot(z[:b], z[b:])  # (B,) <z1_i, z2_i> in the accumulation dtype
    pos = cos * scale
    where = rank_rows(z.shape[0], z.device, gather_distributed, group)
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
    r = pair_lse(z, scale, True, backend, where)  # exclude {self, positive}
    return reduce_rows(r - torch.cat([pos, pos]), reduction, where)


@shared_doc
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
        temperature: $temperature Default 0.1 (lightly).
        normalize: L2-normalise the rows first (as the paper and lightly do).
        reduction: "mean" | "sum" over the 2B anchors, or "none" for the (2B,) per-anchor losses
            ordered [anchors of z1; anchors of z2].
        backend: $backend
        gather_distributed: $gather

    Returns:
        A 0-d tensor (or (2B,) for "none"), float32 (float64 for float64 inputs), in nats. It can
        be negative: the positive no longer bounds the denominator from below.
    """
    return _decoupled(z1, z2, temperature, None, True, normalize, reduction, backend, "dcl", gather_distributed,
                      group)


@shared_doc
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
        temperature: $temperature Default 0.1.
        sigma: sigma > 0 (a float), the weight's temperature. Default 0.5 (the paper, lightly).
        detach_weights: compute w without gradient (default True, lightly's convention).
        normalize: L2-normalise the rows first.
        reduction: "mean" | "sum" over the 2B anchors, or "none" for (2B,) [z1 anchors; z2 anchors].
        backend: $backend
        gather_distributed: $gather

    Returns:
        A 0-d tensor (or (2B,)), float32 (float64 for float64 inputs), in nats.
    """
    sigma = v.positive_float("sigma", sigma)
    if not isinstance(detach_weights, bool):
        raise TypeError(f"detach_weights must be a bool, got {type(detach_weights).__name__}")
    return _decoupled(z1, z2, temperature, sigma, detach_weights, normalize, reduction, backend, "dclw",
                      gather_distributed, group)


@shared_doc
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
        temperature: $temperature Default 0.3 (the paper).
        include_augs: add the uniformity (energy) term of the second view. Default True.
        normalize: L2-normalise the rows first (the authors' code always does).
        reduction: "mean" | "sum" over the B anchors, or "none" for the (B,) per-anchor losses.
        backend: $backend
        gather_distributed: $gather

    Returns:
        A 0-d tensor (or (B,)), float32 (float64 for float64 inputs), in nats.
    """
    check_views("dhel", z1, z2, reduction, gather_distributed)
    if not isinstance(include_augs, bool):
        raise TypeError(f"include_augs must be a bool, got {type(include_augs).__name__}")
    tau, scale = inverse_temperature(temperature, z1)
    v.check_values({"z1": z1, "z2": z2}, inverse={"temperature": tau})
    u, w = (l2_normalize(z1), l2_normalize(z2)) if normalize else (z1, z2)
    where = rank_rows(u.shape[0], u.device, gather_distributed, group)

    def energy(x):  # lse(x, x, 1/tau, {self}), against every rank's rows of x when gathered
        return pair_lse(x, scale, False, backend, where)

    loss = energy(u) - row_dot(u, w) * scale
    if include_augs:
        loss = loss + energy(w)
    return reduce_rows(loss, reduction, where)


class DCLLoss(LossModule):
    """Module form of :func:`dcl`: ``DCLLoss(temperature=0.1)(z1, z2)``; the arguments are
    :func:`dcl`'s."""

    loss = staticmethod(dcl)
    default_temperature = 0.1


class DCLWLoss(LossModule):
    """Module form of :func:`dclw`: ``DCLWLoss(temperature=0.1, sigma=0.5)(z1, z2)``."""

    def __init__(self, temperature=0.1, sigma=0.5, *, detach_weights=True, normalize=True, reduction="mean",
                 backend="auto", gather_distributed=False, group=None):
        super().__init__(temperature, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, group=group)
        self.sigma, self.detach_weights = v.positive_float("sigma", sigma), bool(detach_weights)

    def forward(self, z1, z2):
        return dclw(z1, z2, self.temperature, self.sigma, detach_weights=self.detach_weights, **self.options())

    def _settings(self):
        return f"sigma={self.sigma}, detach_weights={self.detach_weights}"


class DHELLoss(LossModule):
    """Module form of :func:`dhel`: ``DHELLoss(temperature=0.3, include_augs=True)(z1, z2)``."""

    def __init__(self, temperature=0.3, include_augs=True, *, normalize=True, reduction="mean", backend="auto",
                 gather_distributed=False, group=None):
        super().__init__(temperature, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, group=group)
        if not isinstance(include_augs, bool):
            raise TypeError(f"include_augs must be a bool, got {type(include_augs).__name__}")
        self.include_augs = include_augs

    def forward(self, z1, z2):
        return dhel(z1, z2, self.temperature, self.include_augs, **self.options())

    def _settings(self):
        return f"include_augs={self.include_augs}"
