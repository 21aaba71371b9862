"""Supervised contrastive loss (SupCon, Khosla et al. 2020, the L_out variant) over the fused
:func:`infonce_kernels.lse`.

With z the N anchors (rows normalised when ``normalize``), y their labels, s = 1/tau and
P(i) = {p != i : y_p = y_i} the positives of anchor i,

    loss_i = -(tau / tau_base) * 1/|P(i)| sum_{p in P(i)} log( exp(s <z_i, z_p>) / sum_{a != i} exp(s <z_i, z_a>) )
           =  (tau / tau_base) * ( r_i - s <z_i, C_{y_i} - z_i> / |P(i)| ),

where r = lse(z, z, s, exclude={self}) is the fused row log-sum-exp and C_c the sum of the rows of
class c (an ``index_add`` over the rows, O(N d)): the positive term needs no N x N mask and no
N x N tensor exists anywhere.
"""

import torch

from .. import _validation as v
from .. import distributed
from ..ops import accumulation_dtype
from ._common import LossModule, inverse_temperature, l2_normalize, pair_lse, shared_doc

__all__ = ["supcon", "SupConLoss"]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _flatten_features(features):
    """(rows, d) anchors in view-major order and the number of views V (1 for 2-D input)."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() == 3:
        b, views, d = features.shape
        if b == 0 or views == 0:
            raise ValueError(f"features (B, V, d) must have B >= 1 and V >= 1, got shape {tuple(features.shape)}")
        # SupContrast: torch.cat(torch.unbind(features, dim=1)) -> [view 0 of all B; view 1; ...]
        return features.transpose(0, 1).reshape(views * b, d), views
    if features.dim() != 2:
        raise ValueError("features must be (N, d) with labels (N,), or (B, V, d) for V views of B "
                         f"samples, got shape {tuple(features.shape)}")
    return features, 1


def _check_labels(labels, samples: int, views: int, device) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES and labels.dtype != torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != samples:
        what = "(B,) for features (B, V, d)" if views > 1 else "(N,) for features (N, d)"
        raise ValueError(f"labels must have shape {what}, i.e. ({samples},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but features are on {device}")


def _classes(labels, samples: int, views: int, device, where):
    """Per anchor (view-major): class index in [0, K) and its class's row count (|P(i)| + 1) over
    the whole (gathered) batch; K; the number of anchors with a positive in the whole batch.
    Without labels each sample is its own class and its positives are its other views."""
    if labels is None:
        anchors = (where.total if where is not None else samples * views) if views > 1 else 0
        ids = torch.arange(samples, device=device).repeat(views)
        return ids, torch.full_like(ids, views), samples, torch.tensor(anchors, device=device)
    row_labels = labels.to(torch.int64).repeat(views)
    all_labels = row_labels if where is None else distributed.gather_rows(row_labels, where)
    # Classes numbered by sorting, with static shapes (torch.unique's are data-dependent and
    # would break a torch.compile(fullgraph=True) graph): a row's class is the number of distinct
    # labels below its own, its class size the width of its label's run in the sorted labels.
    ordered, order = torch.sort(all_labels)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    class_of_sorted = torch.cumsum(starts, 0) - 1
    inverse = torch.empty_like(class_of_sorted).scatter_(0, order, class_of_sorted)
    rows = torch.searchsorted(ordered, all_labels, right=True) - torch.searchsorted(ordered, all_labels)
    # K: exact in eager (one host read, as torch.unique), the row count (an upper bound) when traced
    num_classes = all_labels.shape[0] if v.tracing() else int(class_of_sorted[-1]) + 1
    lo = 0 if where is None else where.offset
    ids = inverse[lo: lo + row_labels.shape[0]]
    return ids, rows[lo: lo + row_labels.shape[0]], num_classes, (rows > 1).sum()


@shared_doc
def supcon(features, labels=None, temperature=0.1, *, base_temperature=None, normalize=True,
           reduction="mean", backend="auto", gather_distributed=False, group=None):
    """Supervised contrastive loss (Khosla et al. 2020, L_out), the SupContrast/``SupConLoss`` one.

    Every row is an anchor (SupContrast's ``contrast_mode='all'``); its positives are the other
    rows with the same label, its denominator every row but itself:

        loss_i = -(tau / base_temperature) / |P(i)| * sum_{p in P(i)} log( exp(<z_i, z_p>/tau)
                                                            / sum_{a != i} exp(<z_i, z_a>/tau) )

    computed as ``(tau/base_temperature) * (r_i - <z_i, C_{y_i} - z_i> / (tau |P(i)|))`` with
    ``r = lse(z, z, 1/tau, exclude={self})`` and C_c the sum of class c's rows (O(N d); no
    N x N tensor or mask).

    Without labels each sample is its own class, so the positives of a row are the other views of
    the same sample: SimCLR over V views (for V = 2 this equals :func:`infonce_kernels.nt_xent`).

    Anchors without a positive (a label that occurs once, with one view) contribute 0 and are
    left out of the mean, as pytorch-metric-learning's ``SupConLoss`` (``AvgNonZeroReducer``) does;
    their loss is 0 (never NaN) in ``reduction="none"``. A batch in which no anchor has a
    positive raises ``ValueError``: the loss is undefined there.

    Args:
        features: (B, V, d) embeddings of V views of B samples, as SupContrast takes them, or
            (N, d) with ``labels`` of shape (N,) (e.g. the two views concatenated with their labels
            repeated). float16, bfloat16, float32 or float64.
        labels: optional integer (B,) (for 3-D features) or (N,) class labels, any values, on the
            features' device. None: each sample is its own class (needs V >= 2).
        temperature: $temperature Default 0.1 (as pytorch-metric-learning; SupContrast uses 0.07).
        base_temperature: SupContrast multiplies the loss by tau / base_temperature. None (default)
            means base_temperature = temperature, a factor of exactly 1 (pytorch-metric-learning's
            convention). SupContrast's defaults are temperature = base_temperature = 0.07.
        normalize: L2-normalise the rows first (both SupContrast and pytorch-metric-learning use
            cosine similarity; SupContrast expects normalised features from the model).
        reduction: "mean" over the anchors that have a positive, "sum" over all anchors, or "none"
            for the (N,) per-anchor losses (rows in view-major order for 3-D features:
            [view 0 of samples 0..B-1; view 1 of samples 0..B-1; ...], as SupContrast's
            ``loss.view(anchor_count, batch_size)``), 0 for anchors without a positive.
        backend: $backend
        gather_distributed: each rank's rows are anchors against the rows of every rank of
            ``group``, labels gathered too; class sums are all-reduced (K x d floats, with
            gradient); without labels the positives are the sample's own views, all local. Loss
            convention of :mod:`infonce_kernels.distributed` ("mean" divides by the number of
            anchors with a positive in the whole batch).

    Returns:
        A 0-d tensor (or (N,) for "none"), float32 (float64 for float64 inputs), in nats.

    Raises:
        TypeError / ValueError naming the argument for bad input, and ValueError when no anchor
        has a positive.
    """
    z, views = _flatten_features(features)
    v.check_features("features", z)
    samples = z.shape[0] // views
    if labels is not None:
        _check_labels(labels, samples, views, z.device)
    v.check_reduction(reduction)
    tau, scale = inverse_temperature(temperature, z)
    positive = {}
    factor = None
    if base_temperature is not None:
        base = v.positive_scalar("base_temperature", base_temperature, device=z.device, dtype=scale.dtype)
        positive["base_temperature"] = base
        factor = scale.reciprocal() / base
    v.check_values({"features": z}, positive=positive, inverse={"temperature": tau})

    dtype = accumulation_dtype(z.dtype)
    where = distributed.rank_rows(z.shape[0], z.device, group) if gather_distributed else None
    ids, class_rows, num_classes, anchors = _classes(labels, samples, views, z.device, where)
    num_pos = class_rows - 1  # (N,) |P(i)| over the whole batch
    has_pos = num_pos > 0
    if not v.tracing() and not bool(anchors > 0):
        raise ValueError("supcon: no anchor has a positive (every label occurs in exactly one row); "
                         "pass labels shared by at least two rows, or V >= 2 views per sample")

    if normalize:
        z = l2_normalize(z)
    r = pair_lse(z, scale, False, backend, where)

    zf = z.to(dtype)
    class_sum = torch.zeros(num_classes, zf.shape[1], dtype=dtype, device=z.device).index_add(0, ids, zf)
    if where is not None and labels is not None:
        class_sum = distributed.all_reduce_with_grad(class_sum, where.group)
    # index_select, not class_sum[ids]: its backward (index_add) sums in a fixed order, where the
    # backward of indexing (index_put with accumulate) is not bitwise reproducible across threads
    pos_sum = class_sum.index_select(0, ids) - zf  # (N, d): sum of anchor i's positives
    mean_pos_logit = scale * (zf * pos_sum).sum(1) / num_pos.clamp(min=1).to(dtype)
    loss = torch.where(has_pos, r - mean_pos_logit, torch.zeros((), dtype=dtype, device=z.device))
    if factor is not None:
        loss = loss * factor
    if reduction == "mean":
        world = 1 if where is None else where.world
        return loss.sum() * world / anchors.to(dtype)
    if where is not None:
        return distributed.scale_loss(loss, reduction, where)
    return v.reduce(loss, reduction)


class SupConLoss(LossModule):
    """Module form of :func:`supcon`: ``SupConLoss(temperature=0.1)(features, labels=None)``."""

    def __init__(self, temperature=0.1, *, base_temperature=None, normalize=True, reduction="mean",
                 backend="auto", gather_distributed=False, group=None):
        super().__init__(temperature, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, group=group)
        self.base_temperature = base_temperature

    def forward(self, features, labels=None):
        return supcon(features, labels, self.temperature, base_temperature=self.base_temperature, **self.options())

    def _settings(self):
        return f"base_temperature={self.base_temperature}"
