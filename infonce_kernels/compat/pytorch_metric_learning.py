"""Drop-in replacements for pytorch-metric-learning's ``NTXentLoss``, ``SupConLoss`` and
``SelfSupervisedLoss``.

    from pytorch_metric_learning.losses import NTXentLoss, SupConLoss, SelfSupervisedLoss   # before
    from infonce_kernels.compat.pytorch_metric_learning import NTXentLoss, SupConLoss, SelfSupervisedLoss

Same defaults (``NTXentLoss(temperature=0.07)``, ``SupConLoss(temperature=0.1)``), cosine
similarity (rows L2-normalised), ``forward(embeddings, labels, indices_tuple=None, ref_emb=None,
ref_labels=None)`` and values, without PML's N x N matrices (and, for ``NTXentLoss``, without its
(#positive pairs x #negative pairs) mask):

- ``NTXentLoss``: over every positive pair (a, p) (same label, a != p; with ``ref_emb``, every
  ref row with a's label), ``-log(exp(s_ap) / (exp(s_ap) + sum_{n: label_n != label_a} exp(s_an)))``,
  averaged over the pairs. The negatives' log-sum-exp is one value per anchor (the op's label
  rule). The positive-pair term costs O(sum_c n_c^2) as in any per-pair loss; classes of more
  than 16 rows are done as one (n_c x n_c) block each.
- ``SupConLoss``: per anchor, ``-(1/|P(a)|) sum_p log(exp(s_ap) / sum_{j != a} exp(s_aj))``,
  averaged over the anchors whose loss is > 0 (PML's ``AvgNonZeroReducer``).

Both return 0 when the batch has no positive pair or no negative pair, or at most one of each,
as PML does. Passing ``ref_labels`` as the very object ``labels`` (``ref_labels=labels``) makes
the (i, i) pairs no pairs, as in PML. ``indices_tuple`` (a miner's pairs or triplets, or
CrossBatchMemory's) gives the pairs explicitly: NT-Xent's negatives go through the fused label
rule when they are every different-label pair (CrossBatchMemory without miner), otherwise both
losses take a log-sum-exp over the given pairs, O(#pairs) like the tuple itself. Constructor
options: ``distance=CosineSimilarity()`` and the default reducer written out are accepted, the
rest raise ``TypeError`` naming PML's class. PML adds ``tiny`` inside the log of
``NTXentLoss``; that changes a value only where a pair's probability underflows.
"""

import torch
from torch import nn

import infonce_kernels as ik

from ._common import acc, autocast_off, different_label_lse, normalize, row_dot

__all__ = ["NTXentLoss", "SupConLoss", "SelfSupervisedLoss"]

_BLOCK = 16  # classes with more rows than this are handled as one (n_c x n_c) block


def _options(owner, kwargs, reducer):
    """Accept PML constructor options whose value is what the fused loss computes; refuse the
    rest with one sentence naming the option and PML's class."""
    for name, value in kwargs.items():
        kind = type(value).__name__
        same = (
            (name == "distance" and (value is None or (
                kind == "CosineSimilarity" and getattr(value, "normalize_embeddings", True)
                and getattr(value, "p", 2) == 2 and getattr(value, "power", 1) == 1)))
            or (name == "reducer" and (value is None or kind == reducer))
            or (name == "embedding_regularizer" and value is None)
            or name in ("embedding_reg_weight", "collect_stats"))
        if not same:
            raise TypeError(f"{owner}({name}={value!r}) is not supported by infonce_kernels.compat."
                            f"pytorch_metric_learning.{owner} (it computes cosine similarity with "
                            f"PML's default {reducer}); use pytorch_metric_learning.losses.{owner}")


def _check(embeddings, labels, indices_tuple, ref_emb, ref_labels, owner):
    """(labels, ref_emb, ref_labels, drop_self, pairs): ``drop_self`` when the (i, i) pairs are
    not pairs (no ref_emb, or ``ref_labels is labels``, as PML's get_matches_and_diffs);
    ``pairs``: PML's (a1, p, a2, n) from ``indices_tuple`` (triplets as PML converts them), or None."""
    if labels is None:
        raise ValueError(f"{owner}: labels are required")
    if embeddings.dim() != 2:
        raise ValueError(f"{owner}: embeddings must be 2-D (batch, features), got {tuple(embeddings.shape)}")
    drop_self = ref_emb is None or ref_labels is labels
    labels = torch.as_tensor(labels, device=embeddings.device).reshape(-1)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{owner}: embeddings has {embeddings.shape[0]} rows but labels has {labels.shape[0]}")
    pairs = None
    if indices_tuple is not None:
        if len(indices_tuple) not in (3, 4):
            raise ValueError(f"{owner}: indices_tuple must be (anchor, positive, negative) or "
                             f"(anchor1, positive, anchor2, negative), got {len(indices_tuple)} tensors")
        t = [torch.as_tensor(x, device=embeddings.device).reshape(-1).long() for x in indices_tuple]
        pairs = (t[0], t[1], t[0], t[2]) if len(t) == 3 else tuple(t)
        keys = embeddings.shape[0] if ref_emb is None else ref_emb.shape[0]
        for x, size in zip(pairs, (embeddings.shape[0], keys) * 2):
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= size):
                raise ValueError(f"{owner}: indices_tuple has an index outside [0, {size})")
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError(f"{owner}: ref_labels given without ref_emb")
        return labels, None, None, drop_self, pairs
    if ref_labels is None:
        raise ValueError(f"{owner}: ref_labels are required with ref_emb")
    ref_labels = torch.as_tensor(ref_labels, device=embeddings.device).reshape(-1)
    if ref_emb.dim() != 2 or ref_labels.shape[0] != ref_emb.shape[0]:
        raise ValueError(f"{owner}: ref_emb must be (rows, features) with one ref label per row")
    return labels, ref_emb, ref_labels, drop_self, pairs


def _segment_lse(values, index, rows):
    """(rows,) log-sum-exp of ``values`` grouped by ``index`` (-inf for a row without any): the
    explicit pairs a miner or CrossBatchMemory passed, O(#pairs) as the pairs themselves."""
    m = values.new_full((rows,), float("-inf")).scatter_reduce(0, index, values.detach(), "amax")
    shift = torch.where(torch.isfinite(m), m, 0)
    total = values.new_zeros(rows).index_add(0, index, torch.exp(values - shift[index]))
    return torch.log(total) + shift


def _all_different(labels, k_labels, a2, n):
    """Whether the negative pairs (a2, n) are exactly every pair of different labels (then their
    log-sum-exp is the fused op's label rule)."""
    total = _n_negative_pairs(labels, k_labels)
    if a2.numel() != total or not bool((labels[a2] != k_labels[n]).all()):
        return False
    return torch.unique(a2 * k_labels.shape[0] + n).numel() == total


def _cosine_pairs(embeddings, labels, indices_tuple, ref_emb, ref_labels, owner):
    """Checks the arguments (see ``_check``) and normalises: returns (q, labels, k, k_labels,
    symmetric, drop_self, pairs) with q (M, d) the unit embeddings and k (N, d) the unit keys,
    q itself (with labels) when no ref_emb is given."""
    labels, ref_emb, ref_labels, drop_self, pairs = _check(embeddings, labels, indices_tuple, ref_emb,
                                                           ref_labels, owner)
    symmetric = ref_emb is None
    q = normalize(embeddings)
    k, k_labels = (q, labels) if symmetric else (normalize(ref_emb), ref_labels)
    return q, labels, k, k_labels, symmetric, drop_self, pairs


def _too_few_pairs(n_positive, n_negative):
    """PML returns 0 without positive or negative pair, and when there is at most one of each."""
    return n_positive == 0 or n_negative == 0 or (n_positive <= 1 and n_negative <= 1)


def _zero(embeddings):
    return acc(embeddings).sum() * 0


def _class_counts(q_labels, k_labels):
    """For every query row, the number of keys with its label."""
    uk, counts = torch.unique(k_labels, return_counts=True)
    pos = torch.searchsorted(uk, q_labels).clamp(max=uk.numel() - 1)
    return torch.where(uk[pos] == q_labels, counts[pos], 0)


def _n_negative_pairs(labels, k_labels):
    return labels.shape[0] * k_labels.shape[0] - int(_class_counts(labels, k_labels).sum())


def _unique_pairs(a, p, keys):
    """PML's mask-based losses set mask[a, p] = 1: repeated pairs count once."""
    code = torch.unique(a * keys + p)
    return code // keys, code % keys


class _CosineLabelLoss(nn.Module):
    """What the PML adapters below share: the constructor (temperature, backend, PML's distance
    and reducer options) and ``forward``'s arguments, checked and normalised by ``_cosine_pairs``
    before the subclass's ``_loss`` sees them."""

    def __init__(self, name, reducer, temperature, backend, kwargs):
        super().__init__()
        _options(name, kwargs, reducer)
        self._name = name
        self.temperature, self.backend = temperature, backend

    @autocast_off
    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        batch = _cosine_pairs(embeddings, labels, indices_tuple, ref_emb, ref_labels, self._name)
        return self._loss(embeddings, *batch, 1.0 / self.temperature)


class NTXentLoss(_CosineLabelLoss):
    """pytorch-metric-learning's ``NTXentLoss(temperature=0.07, **kwargs)`` (cosine similarity,
    ``MeanReducer``; ``distance=CosineSimilarity()``, ``reducer=MeanReducer()`` written out are
    accepted, other distances and reducers raise ``TypeError``)."""

    def __init__(self, temperature=0.07, *, backend="auto", **kwargs):
        super().__init__("NTXentLoss", "MeanReducer", temperature, backend, kwargs)

    def _loss(self, embeddings, q, labels, k, k_labels, symmetric, drop_self, pairs, scale):
        if pairs is not None:
            return self._given_pairs(q, labels, k, k_labels, pairs, scale, symmetric)
        counts = _class_counts(labels, k_labels) - (1 if drop_self else 0)  # positives per anchor
        n_pairs = int(counts.sum())
        if _too_few_pairs(n_pairs, _n_negative_pairs(labels, k_labels)):
            return _zero(embeddings)
        neg = different_label_lse(q, labels, k, k_labels, scale, symmetric=symmetric, backend=self.backend)
        total = acc(q).new_zeros(())
        # small classes: gather the pairs
        small = (counts > 0) & (counts <= _BLOCK)
        if bool(small.any()):
            a, p = self._pairs(labels, k_labels, small, drop_self)
            s_ap = row_dot(q[a], k[p]) * scale
            total = total + (torch.logaddexp(s_ap, neg[a]) - s_ap).sum()
        for c in torch.unique(labels[counts > _BLOCK]).tolist():
            rows = (labels == c).nonzero().flatten()
            keys = (k_labels == c).nonzero().flatten()
            s = (acc(q[rows]) @ acc(k[keys]).T) * scale
            loss = torch.logaddexp(s, neg[rows][:, None]) - s
            if drop_self:  # labels is k_labels: rows and keys are the same indices
                loss = loss.masked_fill(torch.eye(len(rows), dtype=torch.bool, device=loss.device), 0)
            total = total + loss.sum()
        return total / n_pairs

    def _given_pairs(self, q, labels, k, k_labels, pairs, scale, symmetric):
        """PML's loss over the positive pairs (a1, p) of ``indices_tuple``, each against the
        negative pairs (a2, n) of its anchor: the fused op's label rule when those are every
        different-label pair (CrossBatchMemory without miner), else their explicit log-sum-exp."""
        a1, p, a2, n = pairs
        if _too_few_pairs(a1.numel(), a2.numel()):
            return _zero(q)
        if _all_different(labels, k_labels, a2, n):
            neg = different_label_lse(q, labels, k, k_labels, scale, symmetric=symmetric, backend=self.backend)
        else:
            neg = _segment_lse(row_dot(q[a2], k[n]) * scale, a2, q.shape[0])
        s_ap = row_dot(q[a1], k[p]) * scale
        return (torch.logaddexp(s_ap, neg[a1]) - s_ap).mean()

    @staticmethod
    def _pairs(labels, k_labels, rows_mask, drop_self):
        """(anchor, key) index pairs with equal labels (a != p when drop_self) for the masked rows."""
        uk, k_inv = torch.unique(k_labels, return_inverse=True)
        order = torch.argsort(k_inv, stable=True)
        counts_k = torch.bincount(k_inv, minlength=uk.numel())
        starts = torch.cumsum(counts_k, 0) - counts_k
        rows = rows_mask.nonzero().flatten()
        cls = torch.searchsorted(uk, labels[rows])
        n = counts_k[cls]
        a = torch.repeat_interleave(rows, n)
        offset = torch.arange(a.numel(), device=a.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        p = order[torch.repeat_interleave(starts[cls], n) + offset]
        if drop_self:
            keep = a != p
            a, p = a[keep], p[keep]
        return a, p


class SupConLoss(_CosineLabelLoss):
    """pytorch-metric-learning's ``SupConLoss(temperature=0.1, **kwargs)`` (cosine similarity,
    ``AvgNonZeroReducer``; those written out are accepted, others raise ``TypeError``)."""

    def __init__(self, temperature=0.1, *, backend="auto", **kwargs):
        super().__init__("SupConLoss", "AvgNonZeroReducer", temperature, backend, kwargs)

    def _loss(self, embeddings, q, labels, k, k_labels, symmetric, drop_self, pairs, scale):
        if pairs is not None:
            return self._given_pairs(q, k, pairs, scale)
        counts = _class_counts(labels, k_labels) - (1 if drop_self else 0)
        if _too_few_pairs(int(counts.sum()), _n_negative_pairs(labels, k_labels)):
            return _zero(embeddings)
        own = torch.arange(q.shape[0], device=q.device)[:, None]
        if symmetric:
            r = ik.lse(q, q, scale, exclude=own, symmetric=True, backend=self.backend)
        else:  # with ref_labels is labels, PML's denominator skips ref row i too
            r = ik.lse(q, k, scale, exclude=own if drop_self else None, backend=self.backend)
        uk, k_inv = torch.unique(k_labels, return_inverse=True)
        class_sum = acc(k).new_zeros(uk.numel(), k.shape[1]).index_add(0, k_inv, acc(k))
        cls = torch.searchsorted(uk, labels).clamp(max=uk.numel() - 1)
        present = uk[cls] == labels
        pos_sum = torch.where(present[:, None], class_sum[cls], 0)
        if drop_self:
            pos_sum = pos_sum - acc(k)
        pos_dot = row_dot(q, pos_sum) * scale
        loss = torch.where(counts > 0, r - pos_dot / counts.clamp(min=1).to(r.dtype), 0)
        return _mean_non_zero(loss, embeddings)

    @staticmethod
    def _given_pairs(q, k, pairs, scale):
        """PML's mask-based SupCon over the pairs of ``indices_tuple``: row i's denominator is
        its positive and negative pairs, its loss the mean -log p over its positive pairs."""
        a1, p, a2, n = pairs
        if _too_few_pairs(a1.numel(), a2.numel()):
            return _zero(q)
        a1, p = _unique_pairs(a1, p, k.shape[0])
        a2, n = _unique_pairs(a2, n, k.shape[0])
        rows = q.shape[0]
        s_pos = row_dot(q[a1], k[p]) * scale
        s_neg = row_dot(q[a2], k[n]) * scale
        r = _segment_lse(torch.cat([s_pos, s_neg]), torch.cat([a1, a2]), rows)
        counts = torch.bincount(a1, minlength=rows)
        total = s_pos.new_zeros(rows).index_add(0, a1, r[a1] - s_pos)
        return _mean_non_zero(total / counts.clamp(min=1).to(total.dtype), q)


def _mean_non_zero(loss, embeddings):
    """PML's AvgNonZeroReducer: the mean of the losses > 0, 0 when there is none."""
    keep = loss > 0
    if not bool(keep.any()):
        return _zero(embeddings)
    return loss[keep].mean()


class SelfSupervisedLoss(nn.Module):
    """pytorch-metric-learning's ``SelfSupervisedLoss(loss, symmetric=True)``:
    ``forward(embeddings, ref_emb)`` labels row i of both tensors with i."""

    def __init__(self, loss, symmetric=True, **kwargs):
        super().__init__()
        self.loss, self.symmetric = loss, symmetric

    @staticmethod
    def supported_losses():
        """The loss class names PML's wrapper accepts (pytorch-metric-learning 2.9); the wrapper
        only relabels, so the adapters above and PML's own losses work with it alike."""
        return ["AngularLoss", "CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss",
                "IntraPairVarianceLoss", "LiftedStructureLoss", "MultiSimilarityLoss", "NTXentLoss",
                "SignalToNoiseRatioContrastiveLoss", "SupConLoss", "TripletMarginLoss", "NCALoss",
                "TupletMarginLoss"]

    @classmethod
    def check_loss_support(cls, loss_name):
        if loss_name not in cls.supported_losses():
            raise Exception(f"SelfSupervisedLoss not supported for {loss_name}")

    def forward(self, embeddings, ref_emb):
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb], dim=0), torch.cat([labels, labels], dim=0))
        return self.loss(embeddings=embeddings, labels=labels, ref_emb=ref_emb, ref_labels=labels.clone())
