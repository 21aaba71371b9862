"""Drop-in replacement for SupContrast's ``SupConLoss`` (HobbitLong/SupContrast, losses.py).

    from losses import SupConLoss                                  # before (SupContrast)
    from infonce_kernels.compat.supcontrast import SupConLoss      # after

``SupConLoss(temperature=0.07, contrast_mode='all', base_temperature=0.07)`` with
``forward(features[bsz, n_views, ...], labels=None, mask=None)``, the same values: the features
are used as given (SupContrast expects them normalised), every view of every sample ('all') or
view 0 only ('one') is an anchor, the contrast set is every view, an anchor's denominator is
every contrast row but itself and its positives the other rows of its class (or, with ``mask``,
the rows j with ``mask[i, j]`` as weights), and

    loss_i = -(tau / base_tau) * sum_j mask_ij log(exp(s_ij) / sum_{a != i} exp(s_ia)) / sum_j mask_ij

averaged over the anchors, where, as current SupContrast, a weight sum below 1e-6 divides by 1
instead (so an anchor without positive gives 0). The
denominator is the fused ``lse(anchors, contrast, 1/tau, exclude={self})``; the positive sums are
``<a_i, C_{y_i}>`` with C the per-class sums of the contrast rows (labels) or
``<a_i, (mask @ sum_v features[:, v])_i>`` (an explicit (bsz, bsz) mask, which the caller has
already built: O(bsz^2), never the (bsz*n_views)^2 logits).
"""

import torch
from torch import nn

import infonce_kernels as ik

from ._common import acc, autocast_off, row_dot

__all__ = ["SupConLoss"]


class SupConLoss(nn.Module):
    """SupContrast's ``SupConLoss(temperature=0.07, contrast_mode='all', base_temperature=0.07)``."""

    def __init__(self, temperature=0.07, contrast_mode="all", base_temperature=0.07, *, backend="auto"):
        super().__init__()
        self.temperature, self.contrast_mode, self.base_temperature = temperature, contrast_mode, base_temperature
        self.backend = backend

    @autocast_off
    def forward(self, features, labels=None, mask=None):
        if features.dim() < 3:
            raise ValueError("`features` needs to be [bsz, n_views, ...], at least 3 dimensions are required")
        if features.dim() > 3:
            features = features.view(features.shape[0], features.shape[1], -1)
        bsz, views = features.shape[0], features.shape[1]
        device = features.device
        if labels is not None and mask is not None:
            raise ValueError("Cannot define both `labels` and `mask`")
        if self.contrast_mode not in ("all", "one"):
            raise ValueError("Unknown mode: {}".format(self.contrast_mode))
        contrast = torch.cat(torch.unbind(features, dim=1), dim=0)  # (views * bsz, d), view-major
        anchors = contrast if self.contrast_mode == "all" else features[:, 0]
        count = views if self.contrast_mode == "all" else 1
        rows = anchors.shape[0]
        scale = 1.0 / self.temperature
        self_index = torch.arange(rows, device=device)[:, None]
        if self.contrast_mode == "all":
            r = ik.lse(contrast, contrast, scale, exclude=self_index, symmetric=True, backend=self.backend)
        else:
            r = ik.lse(anchors, contrast, scale, exclude=self_index, backend=self.backend)
        sample = torch.arange(rows, device=device) % bsz
        view_sum = acc(features).sum(1)  # (bsz, d): sum over the views of each sample
        if mask is None:
            if labels is None:
                labels = torch.arange(bsz, device=device)
            labels = labels.contiguous().view(-1).to(device)
            if labels.shape[0] != bsz:
                raise ValueError("Num of labels does not match num of features")
            uk, inv = torch.unique(labels, return_inverse=True)
            class_sum = view_sum.new_zeros(uk.numel(), view_sum.shape[1]).index_add(0, inv, view_sum)
            pos_sum = class_sum[inv[sample]]
            diag = torch.ones(rows, dtype=pos_sum.dtype, device=device)
            n_pos = views * torch.bincount(inv, minlength=uk.numel())[inv[sample]].to(pos_sum.dtype) - diag
        else:
            mask = mask.to(device=device, dtype=view_sum.dtype)  # float, int or bool weights
            if mask.shape != (bsz, bsz):
                raise ValueError(f"mask must be ({bsz}, {bsz}), got {tuple(mask.shape)}")
            pos_sum = (mask @ view_sum)[sample]
            diag = mask.diagonal()[sample]
            n_pos = views * mask.sum(1)[sample] - diag
        a = acc(anchors)
        pos = scale * (row_dot(a, pos_sum) - diag * row_dot(a, a))  # sum_j mask_ij L_ij, self removed
        # sum_j mask_ij log p_ij = pos - n_pos r, divided, as SupContrast, by n_pos, or by 1 where
        # n_pos < 1e-6 (an anchor without positive gives 0)
        divisor = torch.where(n_pos < 1e-6, torch.ones_like(n_pos), n_pos)
        mean_log_prob_pos = (pos - n_pos * r) / divisor
        loss = -(self.temperature / self.base_temperature) * mean_log_prob_pos
        return loss.view(count, bsz).mean()
