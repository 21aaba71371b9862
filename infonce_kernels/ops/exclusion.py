"""Which pairs (i, j) a row log-sum-exp leaves out: the exclusion specification.

A loss builds one :class:`Exclusion` and hands it, unchanged, to the op layer, which gives it to
the backend's forward and backward. It holds

* ``exclude`` (M, E) int64, E <= 2: row i skips keys ``exclude[i, 0]`` and ``exclude[i, 1]``
  (-1 = none), e.g. its own index when the keys are the rows, its positive for decoupled losses;
* the label rule, optional: row i also skips every key j with ``key_labels[j] == row_labels[i]``
  other than its designated ``positive[i]`` (-1 = none);
* the threshold rule (false-negative filtering), optional: row i also drops every key j whose
  logit ``s <q_i, k_j>`` exceeds ``threshold[i]``, except its designated ``positive[i]``;
* ``symmetric``: the keys are the rows themselves (``k is q``), so the backward needs one pass.

``positive`` (M,) belongs to both rules: it is required by the threshold rule and then allowed
without labels.

"Is pair (i, j) excluded" is written once per language: here (:meth:`Exclusion.mask`, used by
the reference backend and the tests), in C++ in csrc/common/exclusion.h, and in Triton in
infonce_kernels/triton/_common.py (``kept``).
"""

from dataclasses import dataclass, replace
from typing import Optional

import torch

__all__ = ["Exclusion", "self_indices"]


def self_indices(rows: int, device, offset: int = 0) -> torch.Tensor:
    """(rows, 1) int64: row i's own index, ``offset + i`` (its position among the keys)."""
    return (offset + torch.arange(rows, device=device))[:, None]


def _no_labels(device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64, device=device)


@dataclass(frozen=True)
class Exclusion:
    """The pairs a row log-sum-exp leaves out (see the module docstring).

    Attributes:
        exclude: (M, E) int64, E <= 2, -1 = none, numbered like the keys.
        row_labels, key_labels: (M,), (N,) int64, or both None (no label rule).
        positive: (M,) int64, -1 = none, numbered like the keys: the key the label rule and the
            threshold rule never remove; None when neither rule is on.
        symmetric: the keys are the rows (``k is q``).
        threshold: (M,) of the accumulation dtype, in logit units, or None (no threshold rule):
            row i drops key j when ``s <q_i, k_j> > threshold[i]`` and j is not ``positive[i]``;
            +inf drops nothing. Requires ``positive``.
    """

    exclude: torch.Tensor
    row_labels: Optional[torch.Tensor] = None
    key_labels: Optional[torch.Tensor] = None
    positive: Optional[torch.Tensor] = None
    symmetric: bool = False
    threshold: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.threshold is not None and self.positive is None:
            raise ValueError("Exclusion: the threshold rule needs positive (M,), the key each row never drops")

    @classmethod
    def none(cls, rows: int, device) -> "Exclusion":
        """Every row keeps every key."""
        return cls(torch.empty(rows, 0, dtype=torch.int64, device=device))

    @classmethod
    def itself(cls, rows: int, device, *, offset: int = 0, symmetric: bool = True) -> "Exclusion":
        """Row i skips key ``offset + i``, its own row among the keys ({self})."""
        return cls(self_indices(rows, device, offset), symmetric=symmetric)

    @classmethod
    def itself_and_partner(cls, rows: int, device, *, offset: int = 0, symmetric: bool = True) -> "Exclusion":
        """For rows [view 1; view 2] of rows/2 samples: row i skips itself and the other view of
        its sample, ``offset + (i + rows/2) % rows`` ({self, partner})."""
        index = torch.arange(rows, device=device)
        return cls(offset + torch.stack([index, (index + rows // 2) % rows], dim=1), symmetric=symmetric)

    @classmethod
    def from_tensors(cls, exclude, row_labels, key_labels, positive, symmetric=False, threshold=None) -> "Exclusion":
        """From the op's flat arguments (:meth:`tensors`), where an empty tensor (or None) means
        "not given": no label rule without ``row_labels``, no threshold rule without ``threshold``."""
        def given(t):
            return t if t is not None and t.numel() else None

        labelled = given(row_labels) is not None
        return cls(exclude, row_labels if labelled else None, key_labels if labelled else None, given(positive),
                   symmetric, given(threshold))

    @property
    def labels(self):
        """None, or (row_labels, key_labels, positive) when the label rule is on."""
        return None if self.row_labels is None else (self.row_labels, self.key_labels, self.positive)

    def tensors(self):
        """(exclude, row_labels, key_labels, positive, threshold), each rule's tensors empty when
        it is off: the flat arguments of the custom ops (infonce_kernels/ops/_custom_ops.py)."""
        none = _no_labels(self.exclude.device)
        labels = (self.row_labels, self.key_labels) if self.labels else (none, none)
        positive = none if self.positive is None else self.positive
        threshold = none.to(torch.float32) if self.threshold is None else self.threshold
        return (self.exclude, *labels, positive, threshold)

    def rows(self, index) -> "Exclusion":
        """The exclusion of the rows ``index`` (a slice or an index tensor), the keys unchanged."""
        def pick(t):
            return None if t is None else t[index]

        return replace(self, exclude=self.exclude[index], row_labels=pick(self.row_labels),
                       positive=pick(self.positive), threshold=pick(self.threshold), symmetric=False)

    def keys_as_rows(self, key_exclude: torch.Tensor, key_positive: Optional[torch.Tensor],
                     key_threshold: Optional[torch.Tensor] = None) -> "Exclusion":
        """The exclusion of the keys seen as rows of their own log-sum-exp over the rows of q
        (the paired backward): ``key_exclude`` (N, E'), ``key_positive`` (N,) (needed with the
        label rule or ``key_threshold``) and ``key_threshold`` (N,) (the key rows' thresholds,
        None: no threshold rule on the key side) number the rows of q from the backward's
        ``row_offset``; the labels swap sides."""
        if key_positive is not None and key_positive.numel() == 0:
            key_positive = None
        if self.row_labels is None:
            return Exclusion(key_exclude, positive=key_positive if key_threshold is not None else None,
                             threshold=key_threshold)
        return Exclusion(key_exclude, self.key_labels, self.row_labels, key_positive, threshold=key_threshold)

    def mask(self, num_keys: int, *, key_offset: int = 0, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(M, N) bool, True where row i leaves key j out: ``offset + j`` is in row i's list,
        or (label rule) ``key_labels[j] == row_labels[i]`` and ``offset + j != positive[i]``,
        or (threshold rule) :meth:`threshold_drops`, which reads ``logits``.

        ``key_offset`` numbers the N keys from it (the keys are a slice of a larger numbering,
        as in the paired backward); indices outside the slice exclude nothing. ``logits`` (M, N):
        ``s <q_i, k_j>`` in the accumulation dtype, required by the threshold rule.
        """
        rows = self.exclude.shape[0]
        index = self.exclude - key_offset
        index = torch.where((index >= 0) & (index < num_keys) & (self.exclude >= 0), index,
                            torch.full_like(index, num_keys))  # -1 / outside: the spare column
        mask = torch.zeros(rows, num_keys + 1, dtype=torch.bool, device=self.exclude.device)
        mask.scatter_(1, index, True)
        mask = mask[:, :num_keys]
        if self.row_labels is not None:
            same = self.row_labels[:, None] == self.key_labels[None, :]
            same &= ~self._is_positive(num_keys, key_offset)
            mask = mask | same
        if self.threshold is not None:
            if logits is None:
                raise ValueError("Exclusion.mask: the threshold rule needs the (M, N) logits")
            mask = mask | self.threshold_drops(logits, key_offset=key_offset)
        return mask

    def threshold_drops(self, logits: torch.Tensor, *, key_offset: int = 0) -> torch.Tensor:
        """(M, N) bool, the threshold rule alone: ``logits[i, j] > threshold[i]`` and
        ``key_offset + j != positive[i]`` (all False without the rule)."""
        if self.threshold is None:
            return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        above = logits > self.threshold[:, None].to(logits.dtype)
        return above & ~self._is_positive(logits.shape[1], key_offset)

    def _is_positive(self, num_keys: int, key_offset: int) -> torch.Tensor:
        """(M, N) bool: key j is row i's designated positive."""
        keys = torch.arange(num_keys, device=self.exclude.device)
        return (self.positive - key_offset)[:, None] == keys[None, :]
