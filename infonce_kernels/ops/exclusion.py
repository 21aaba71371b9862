"""Which pairs (i, j) a row log-sum-exp leaves out: the exclusion specification.

A loss builds one :class:`Exclusion` and hands it, unchanged, to the op layer, which gives it to
the backend's forward and backward. It holds

* ``exclude`` (M, E) int64, E <= 2: row i skips keys ``exclude[i, 0]`` and ``exclude[i, 1]``
  (-1 = none), e.g. its own index when the keys are the rows, its positive for decoupled losses;
* the label rule, optional: row i also skips every key j with ``key_labels[j] == row_labels[i]``
  other than its designated ``positive[i]`` (-1 = none);
* ``symmetric``: the keys are the rows themselves (``k is q``), so the backward needs one pass.

"Is pair (i, j) excluded" is written once per language: here (:meth:`Exclusion.mask`, used by
the reference backend and the tests), in C++ in csrc/common/exclusion.h, and in Triton in
infonce_kernels/triton/_common.py (``kept``).
"""

from dataclasses import dataclass
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
        row_labels, key_labels, positive: (M,), (N,), (M,) int64, or all None (no label rule).
        symmetric: the keys are the rows (``k is q``).
    """

    exclude: torch.Tensor
    row_labels: Optional[torch.Tensor] = None
    key_labels: Optional[torch.Tensor] = None
    positive: Optional[torch.Tensor] = None
    symmetric: bool = False

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
    def from_tensors(cls, exclude, row_labels, key_labels, positive, symmetric=False) -> "Exclusion":
        """From the op's flat arguments, where empty label tensors mean "no label rule"."""
        if row_labels.numel() == 0:
            return cls(exclude, symmetric=symmetric)
        return cls(exclude, row_labels, key_labels, positive, symmetric)

    @property
    def labels(self):
        """None, or (row_labels, key_labels, positive) when the label rule is on."""
        return None if self.row_labels is None else (self.row_labels, self.key_labels, self.positive)

    def tensors(self):
        """(exclude, row_labels, key_labels, positive), the label tensors empty without the rule:
        the flat arguments of the ``infonce_kernels::lse`` custom op."""
        none = _no_labels(self.exclude.device)
        labels = self.labels or (none, none, none)
        return (self.exclude, *labels)

    def keys_as_rows(self, key_exclude: torch.Tensor, key_positive: Optional[torch.Tensor]) -> "Exclusion":
        """The exclusion of the keys seen as rows of their own log-sum-exp over the rows of q
        (the paired backward): ``key_exclude`` (N, E') and ``key_positive`` (N,) number the rows
        of q from the backward's ``row_offset``; the labels swap sides."""
        if self.row_labels is None:
            return Exclusion(key_exclude)
        return Exclusion(key_exclude, self.key_labels, self.row_labels, key_positive)

    def mask(self, num_keys: int, *, key_offset: int = 0) -> torch.Tensor:
        """(M, N) bool, True where row i leaves key j out: ``offset + j`` is in row i's list,
        or (label rule) ``key_labels[j] == row_labels[i]`` and ``offset + j != positive[i]``.

        ``key_offset`` numbers the N keys from it (the keys are a slice of a larger numbering,
        as in the paired backward); indices outside the slice exclude nothing.
        """
        rows = self.exclude.shape[0]
        index = self.exclude - key_offset
        index = torch.where((index >= 0) & (index < num_keys) & (self.exclude >= 0), index,
                            torch.full_like(index, num_keys))  # -1 / outside: the spare column
        mask = torch.zeros(rows, num_keys + 1, dtype=torch.bool, device=self.exclude.device)
        mask.scatter_(1, index, True)
        mask = mask[:, :num_keys]
        if self.row_labels is not None:
            keys = torch.arange(num_keys, device=mask.device)
            same = self.row_labels[:, None] == self.key_labels[None, :]
            same &= (self.positive - key_offset)[:, None] != keys[None, :]
            mask = mask | same
        return mask
