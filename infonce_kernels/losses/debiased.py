"""Debiased (Chuang et al., NeurIPS 2020) and hard-negative (Robinson et al., ICLR 2021)
NT-Xent, over the fused :func:`infonce_kernels.lse`.

Both papers' reference code (SimCLR 2B setting: z = cat[z1, z2], the negatives of anchor i are
the 2B - 2 rows other than i and its positive pos(i), N = 2B - 2) computes, with s = 1/tau,
pos_i = exp(s <z_i, z_pos(i)>) and neg_ij = exp(s <z_i, z_j>),

    imp_ij = neg_ij ** beta = exp(beta s <z_i, z_j>)                     (hard negatives)
    R_i    = sum_j imp_ij neg_ij / mean_j imp_ij
           = N exp( lse(z, z, (1+beta) s, {i, pos(i)})_i - lse(z, z, beta s, {i, pos(i)})_i )
    Ng_i   = max( (R_i - tau_plus N pos_i) / (1 - tau_plus),  N exp(-1/tau) )
    loss_i = -log( pos_i / (pos_i + Ng_i) ) = logaddexp(log pos_i, log Ng_i) - log pos_i

With beta = 0 the reweighting is the identity, R_i = sum_j neg_ij, and this is the debiased loss;
with tau_plus = 0 as well it is DCL's denominator plus the positive, i.e. NT-Xent. Everything
after the two fused row LSEs is O(N) per-row arithmetic in the log domain (no exp of a logit).
"""

import math

import torch

from .. import _validation as v
from ._common import LossModule, pair_lse, rank_rows, reduce_rows, row_dot, shared_doc, two_views

__all__ = ["hard_negative_nt_xent", "debiased_nt_xent", "HardNegativeNTXentLoss", "DebiasedNTXentLoss"]


def _check_tau_plus(tau_plus):
    v.positive_float("tau_plus", tau_plus, allow_zero=True)
    if not (0 <= tau_plus < 1):
        raise ValueError(f"tau_plus (the class prior) must lie in [0, 1), got {tau_plus}")
    return float(tau_plus)


def _check_beta(beta):
    return v.positive_float("beta (the hardness concentration)", beta, allow_zero=True)


def _hcl(z1, z2, temperature, beta, tau_plus, normalize, reduction, backend, name, gather_distributed, group):
    z, b, scale = two_views(name, z1, z2, temperature, normalize, reduction, gather_distributed)
    where = rank_rows(z.shape[0], z.device, gather_distributed, group)
    negatives = (z.shape[0] if where is None else where.total) - 2

    def lse(s):  # exclude {self, positive}
        return pair_lse(z, s, True, backend, where)

    if beta > 0:
        # log R_i = log N + lse_{(1+beta)s} - lse_{beta s}
        log_r = math.log(negatives) + lse((1 + beta) * scale) - lse(beta * scale)
    else:
        log_r = lse(scale)
    pos = row_dot(z[:b], z[b:]) * scale
    pos = torch.cat([pos, pos])  # log pos_i
    if tau_plus > 0:
        # log(R - tau+ N pos) = log R + log1p(-exp(a)), a = log(tau+ N) + log pos - log R; Ng <= 0 when a >= 0
        a = math.log(tau_plus * negatives) + pos - log_r
        valid = a < 0
        a_safe = torch.where(valid, a, torch.full_like(a, -1.0))
        log_ng = log_r + torch.log1p(-torch.exp(a_safe)) - math.log1p(-tau_plus)
        log_ng = torch.where(valid, log_ng, torch.full_like(log_ng, float("-inf")))
    else:
        log_ng = log_r
    log_ng = torch.maximum(log_ng, math.log(negatives) - scale)  # the papers' clamp Ng >= N e^{-1/tau}
    return reduce_rows(torch.logaddexp(pos, log_ng) - pos, reduction, where)


@shared_doc
def hard_negative_nt_xent(z1, z2, temperature=0.5, beta=1.0, tau_plus=0.1, *, normalize=True,
                          reduction="mean", backend="auto", gather_distributed=False, group=None):
    """Hard-negative NT-Xent (Robinson et al. 2021, "Contrastive Learning with Hard Negative
    Samples", the ``estimator='hard'`` loss of their code).

    SimCLR's 2B anchors (z = cat[z1, z2]); for anchor i, N = 2B - 2 negatives (all rows but i
    and its positive pos(i)) reweighted by their hardness exp(beta <z_i, z_j>/tau), debiased with
    the class prior tau_plus and clamped as in the paper:

        pos_i  = exp(<z_i, z_pos(i)>/tau)
        R_i    = sum_j exp((1+beta) <z_i, z_j>/tau) / mean_j exp(beta <z_i, z_j>/tau)
        Ng_i   = max( (R_i - tau_plus N pos_i) / (1 - tau_plus),  N e^{-1/tau} )
        loss_i = -log( pos_i / (pos_i + Ng_i) )

    Fused as two row log-sum-exps at scales (1+beta)/tau and beta/tau with the exclusion
    {i, pos(i)}, combined per row in the log domain. The reweighting weights carry gradient, as
    in the authors' code (no detach). beta = 0 gives :func:`debiased_nt_xent`.

    Args:
        z1, z2: (B, d) embeddings of two views, B >= 2; float16, bfloat16, float32 or float64.
        temperature: $temperature Default 0.5 (the code).
        beta: hardness concentration >= 0, a float. Default 1.0.
        tau_plus: class prior in [0, 1), a float. Default 0.1. 0 disables the debiasing.
        normalize: L2-normalise the rows first (the authors' model normalises its output; the
            clamp N e^{-1/tau} assumes unit rows).
        reduction: "mean" | "sum" over the 2B anchors, or "none" for (2B,) [z1 anchors; z2 anchors].
        backend: $backend
        gather_distributed: $gather N counts the negatives of the whole batch.

    Returns:
        A 0-d tensor (or (2B,)), float32 (float64 for float64 inputs), in nats, >= 0.
    """
    beta, tau_plus = _check_beta(beta), _check_tau_plus(tau_plus)
    return _hcl(z1, z2, temperature, beta, tau_plus, normalize, reduction, backend, "hard_negative_nt_xent",
                gather_distributed, group)


@shared_doc
def debiased_nt_xent(z1, z2, temperature=0.5, tau_plus=0.1, *, normalize=True, reduction="mean", backend="auto",
                     gather_distributed=False, group=None):
    """Debiased NT-Xent (Chuang et al. 2020, "Debiased Contrastive Learning", ``debiased=True`` in
    their code).

    SimCLR's 2B anchors; for anchor i, N = 2B - 2 negatives (all rows but i and pos(i)):

        pos_i  = exp(<z_i, z_pos(i)>/tau)
        Ng_i   = max( (sum_j exp(<z_i, z_j>/tau) - tau_plus N pos_i) / (1 - tau_plus),  N e^{-1/tau} )
        loss_i = -log( pos_i / (pos_i + Ng_i) )

    Fused as one row log-sum-exp with the exclusion {i, pos(i)}. With tau_plus = 0 (and the
    clamp inactive) this is NT-Xent.

    Args:
        z1, z2: (B, d) embeddings of two views, B >= 2; float16, bfloat16, float32 or float64.
        temperature: $temperature Default 0.5.
        tau_plus: class prior in [0, 1), a float. Default 0.1.
        normalize: L2-normalise the rows first.
        reduction: "mean" | "sum" over the 2B anchors, or "none" for (2B,) [z1 anchors; z2 anchors].
        backend: $backend
        gather_distributed: $gather N counts the negatives of the whole batch.

    Returns:
        A 0-d tensor (or (2B,)), float32 (float64 for float64 inputs), in nats, >= 0.
    """
    tau_plus = _check_tau_plus(tau_plus)
    return _hcl(z1, z2, temperature, 0.0, tau_plus, normalize, reduction, backend, "debiased_nt_xent",
                gather_distributed, group)


class HardNegativeNTXentLoss(LossModule):
    """Module form of :func:`hard_negative_nt_xent`."""

    def __init__(self, temperature=0.5, beta=1.0, tau_plus=0.1, *, normalize=True, reduction="mean", backend="auto",
                 gather_distributed=False, group=None):
        super().__init__(temperature, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, group=group)
        self.beta, self.tau_plus = _check_beta(beta), _check_tau_plus(tau_plus)

    def forward(self, z1, z2):
        return hard_negative_nt_xent(z1, z2, self.temperature, self.beta, self.tau_plus, **self.options())

    def _settings(self):
        return f"beta={self.beta}, tau_plus={self.tau_plus}"


class DebiasedNTXentLoss(LossModule):
    """Module form of :func:`debiased_nt_xent`."""

    def __init__(self, temperature=0.5, tau_plus=0.1, *, normalize=True, reduction="mean", backend="auto",
                 gather_distributed=False, group=None):
        super().__init__(temperature, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, group=group)
        self.tau_plus = _check_tau_plus(tau_plus)

    def forward(self, z1, z2):
        return debiased_nt_xent(z1, z2, self.temperature, self.tau_plus, **self.options())

    def _settings(self):
        return f"tau_plus={self.tau_plus}"
