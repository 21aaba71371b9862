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

Both return 0 when the batch has no positive pair or no negative pair, as PML does.
``indices_tuple`` (miners) is not supported: it raises ``ValueError``. PML adds ``tiny`` inside
the log of ``NTXentLoss``; that changes a value only where a pair's probability underflows.
"""

import torch
from torch import nn

import infonce_kernels as ik

from ._common import acc, different_label_lse, normalize, row_dot

__all__ = ["NTXentLoss", "SupConLoss", "SelfSupervisedLoss"]

_BLOCK = 16  # classes with more rows than this are handled as one (n_c x n_c) block


def _check(embeddings, labels, indices_tuple, ref_emb, ref_labels, owner):
    if indices_tuple is not None:
        raise ValueError(f"{owner}: indices_tuple (miners) is not supported by the infonce_kernels adapter; "
                         "use pytorch_metric_learning's own loss for mined pairs")
    if labels is None:
        raise ValueError(f"{owner}: labels are required")
    if embeddings.dim() != 2:
        raise ValueError(f"{owner}: embeddings must be 2-D (batch, features), got {tuple(embeddings.shape)}")
    labels = torch.as_tensor(labels, device=embeddings.device).reshape(-1)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{owner}: embeddings has {embeddings.shape[0]} rows but labels has {labels.shape[0]}")
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError(f"{owner}: ref_labels given without ref_emb")
        return labels, None, None
    if ref_labels is None:
        raise ValueError(f"{owner}: ref_labels are required with ref_emb")
    ref_labels = torch.as_tensor(ref_labels, device=embeddings.device).reshape(-1)
    if ref_emb.dim() != 2 or ref_labels.shape[0] != ref_emb.shape[0]:
        raise ValueError(f"{owner}: ref_emb must be (rows, features) with one ref label per row")
    return labels, ref_emb, ref_labels


def _zero(embeddings):
    return acc(embeddings).sum() * 0


def _class_counts(q_labels, k_labels):
    """For every query row, the number of keys with its label."""
    uk, counts = torch.unique(k_labels, return_counts=True)
    pos = torch.searchsorted(uk, q_labels).clamp(max=uk.numel() - 1)
    return torch.where(uk[pos] == q_labels, counts[pos], 0)


class NTXentLoss(nn.Module):
    """pytorch-metric-learning's ``NTXentLoss(temperature=0.07)`` (cosine similarity)."""

    def __init__(self, temperature=0.07, *, backend="auto"):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        labels, ref_emb, ref_labels = _check(embeddings, labels, indices_tuple, ref_emb, ref_labels, "NTXentLoss")
        symmetric = ref_emb is None
        q = normalize(embeddings)
        k, k_labels = (q, labels) if symmetric else (normalize(ref_emb), ref_labels)
        counts = _class_counts(labels, k_labels) - (1 if symmetric else 0)  # positives per anchor
        n_pairs = int(counts.sum())
        has_negative = bool((torch.unique(k_labels).numel() > 1) or (labels != k_labels[0]).any())
        if n_pairs == 0 or not has_negative:
            return _zero(embeddings)
        scale = 1.0 / self.temperature
        neg = different_label_lse(q, labels, k, k_labels, scale, symmetric=symmetric, backend=self.backend)
        total = acc(q).new_zeros(())
        # small classes: gather the pairs
        small = (counts > 0) & (counts <= _BLOCK)
        if bool(small.any()):
            a, p = self._pairs(labels, k_labels, small, symmetric)
            s_ap = row_dot(q[a], k[p]) * scale
            total = total + (torch.logaddexp(s_ap, neg[a]) - s_ap).sum()
        for c in torch.unique(labels[counts > _BLOCK]).tolist():
            rows = (labels == c).nonzero().flatten()
            keys = (k_labels == c).nonzero().flatten()
            s = (acc(q[rows]) @ acc(k[keys]).T) * scale
            loss = torch.logaddexp(s, neg[rows][:, None]) - s
            if symmetric:
                loss = loss.masked_fill(torch.eye(len(rows), dtype=torch.bool, device=loss.device), 0)
            total = total + loss.sum()
        return total / n_pairs

    @staticmethod
    def _pairs(labels, k_labels, rows_mask, symmetric):
        """(anchor, key) index pairs with equal labels (a != p when symmetric) for the masked rows."""
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
        if symmetric:
            keep = a != p
            a, p = a[keep], p[keep]
        return a, p


class SupConLoss(nn.Module):
    """pytorch-metric-learning's ``SupConLoss(temperature=0.1)`` (cosine similarity)."""

    def __init__(self, temperature=0.1, *, backend="auto"):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        labels, ref_emb, ref_labels = _check(embeddings, labels, indices_tuple, ref_emb, ref_labels, "SupConLoss")
        symmetric = ref_emb is None
        q = normalize(embeddings)
        k, k_labels = (q, labels) if symmetric else (normalize(ref_emb), ref_labels)
        counts = _class_counts(labels, k_labels) - (1 if symmetric else 0)
        has_negative = bool((torch.unique(k_labels).numel() > 1) or (labels != k_labels[0]).any())
        if int(counts.sum()) == 0 or not has_negative:
            return _zero(embeddings)
        scale = 1.0 / self.temperature
        if symmetric:
            r = ik.lse(q, q, scale, exclude=torch.arange(q.shape[0], device=q.device)[:, None], symmetric=True,
                       backend=self.backend)
        else:
            r = ik.lse(q, k, scale, backend=self.backend)
        uk, k_inv = torch.unique(k_labels, return_inverse=True)
        class_sum = acc(k).new_zeros(uk.numel(), k.shape[1]).index_add(0, k_inv, acc(k))
        cls = torch.searchsorted(uk, labels).clamp(max=uk.numel() - 1)
        present = uk[cls] == labels
        pos_sum = torch.where(present[:, None], class_sum[cls], 0)
        if symmetric:
            pos_sum = pos_sum - acc(q)
        pos_dot = row_dot(q, pos_sum) * scale
        has_pos = counts > 0
        loss = torch.where(has_pos, r - pos_dot / counts.clamp(min=1).to(r.dtype), 0)
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

    def forward(self, embeddings, ref_emb):
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb], dim=0), torch.cat([labels, labels], dim=0))
        return self.loss(embeddings=embeddings, labels=labels, ref_emb=ref_emb, ref_labels=labels.clone())
