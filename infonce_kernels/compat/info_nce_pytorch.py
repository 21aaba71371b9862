"""Drop-in replacement for info-nce-pytorch (``from info_nce import InfoNCE, info_nce``).

    from info_nce import InfoNCE, info_nce                               # before
    from infonce_kernels.compat.info_nce_pytorch import InfoNCE, info_nce   # after

Same arguments, defaults (temperature 0.1, reduction "mean", negative_mode "unpaired") and values:
query, positive and negative keys are L2-normalised, then

- no negatives: cross-entropy of ``q k^T / tau`` against the diagonal (in-batch negatives);
- ``unpaired`` (M, d) negatives shared by all queries: ``logaddexp(pos, lse(q, neg)) - pos``; the
  negatives get their gradient, as in info-nce-pytorch;
- ``paired`` (N, M, d) negatives per query: computed per query with plain torch (an (N, M)
  logit tensor, which is the size of the input, never N x N).

Losses are float32 (float64 for float64 inputs).
"""

import torch
from torch import nn

import infonce_kernels as ik

from ._common import acc, autocast_off, normalize, row_dot

__all__ = ["InfoNCE", "info_nce"]


def _reduce(loss, reduction):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"{reduction} is not a valid value for reduction")


def info_nce(query, positive_key, negative_keys=None, temperature=0.1, reduction="mean",
             negative_mode="unpaired", *, backend="auto"):
    """info-nce-pytorch's ``info_nce`` (under autocast: float32, see ``InfoNCE``)."""
    return InfoNCE(temperature, reduction, negative_mode, backend=backend)(query, positive_key, negative_keys)


def _info_nce(query, positive_key, negative_keys, temperature, reduction, negative_mode, backend):
    if query.dim() != 2:
        raise ValueError("<query> must have 2 dimensions.")
    if positive_key.dim() != 2:
        raise ValueError("<positive_key> must have 2 dimensions.")
    if negative_keys is not None:
        if negative_mode == "unpaired" and negative_keys.dim() != 2:
            raise ValueError("<negative_keys> must have 2 dimensions if <negative_mode> == 'unpaired'.")
        if negative_mode == "paired" and negative_keys.dim() != 3:
            raise ValueError("<negative_keys> must have 3 dimensions if <negative_mode> == 'paired'.")
        if negative_mode not in ("paired", "unpaired"):
            raise ValueError(f"negative_mode must be 'paired' or 'unpaired', got {negative_mode!r}")
    if len(query) != len(positive_key):
        raise ValueError("<query> and <positive_key> must must have the same number of samples.")
    if negative_keys is not None and negative_mode == "paired" and len(query) != len(negative_keys):
        raise ValueError("If negative_mode == 'paired', then <negative_keys> must have the same number of "
                         "samples as <query>.")
    if query.shape[-1] != positive_key.shape[-1]:
        raise ValueError("Vectors of <query> and <positive_key> should have the same number of components.")
    if negative_keys is not None and query.shape[-1] != negative_keys.shape[-1]:
        raise ValueError("Vectors of <query> and <negative_keys> should have the same number of components.")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if negative_keys is None:
        return ik.info_nce(query, positive_key, temperature=temperature, reduction=reduction, backend=backend)
    q, p, n = normalize(query), normalize(positive_key), normalize(negative_keys)
    scale = 1.0 / temperature
    pos = row_dot(q, p) * scale
    if negative_mode == "unpaired":
        neg = ik.lse(q, n, scale, backend=backend)
    else:
        neg = torch.logsumexp(torch.einsum("nd,nmd->nm", acc(q), acc(n)) * scale, dim=1)
    return _reduce(torch.logaddexp(pos, neg) - pos, reduction)


class InfoNCE(nn.Module):
    """info-nce-pytorch's ``InfoNCE(temperature=0.1, reduction='mean', negative_mode='unpaired')``."""

    def __init__(self, temperature=0.1, reduction="mean", negative_mode="unpaired", *, backend="auto"):
        super().__init__()
        self.temperature, self.reduction, self.negative_mode, self.backend = (
            temperature, reduction, negative_mode, backend)

    @autocast_off
    def forward(self, query, positive_key, negative_keys=None):
        return _info_nce(query, positive_key, negative_keys, self.temperature, self.reduction, self.negative_mode,
                         self.backend)
