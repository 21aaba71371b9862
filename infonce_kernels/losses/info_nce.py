"""InfoNCE with in-batch negatives or a bank: ``lse(q, k, 1/tau) - <q_i, k_i>/tau``."""

import warnings

import torch

from .. import _validation as v
from .. import distributed
from ..ops import Exclusion, fused_lse
from ._common import LossModule, inverse_temperature, l2_normalize, reduce_rows, row_dot, shared_doc

__all__ = ["info_nce", "InfoNCELoss"]


DEFAULT_TEMPERATURE = 0.1


def _temperature_and_bank(positional, temperature, negative_keys):
    """The rule for info_nce's optional third positional argument: it is the temperature (a
    float, a one-element tensor or a temperature module), unless it is a 2-D tensor, which is
    read, as before the bank became keyword-only, as ``negative_keys`` with a
    DeprecationWarning."""
    if len(positional) > 1:
        raise TypeError(f"info_nce takes at most 3 positional arguments (query, positive_key, temperature), "
                        f"got {2 + len(positional)}")
    if positional:
        (value,) = positional
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            if negative_keys is not None:
                raise TypeError("info_nce got a bank both as its third positional argument and as negative_keys")
            warnings.warn("info_nce(query, positive_key, negative_keys) is deprecated: the third positional "
                          "argument is the temperature; pass the bank as negative_keys=...", DeprecationWarning,
                          stacklevel=3)
            negative_keys = value
        elif temperature is not None:
            raise TypeError("info_nce got the temperature both as its third positional argument and as "
                            "temperature=")
        else:
            temperature = value
    return (DEFAULT_TEMPERATURE if temperature is None else temperature), negative_keys


@shared_doc
def info_nce(query, positive_key, *temperature_, temperature=None, negative_keys=None, normalize=True,
             reduction="mean", backend="auto", gather_distributed=False, group=None):
    """InfoNCE with in-batch negatives, or with a shared bank of negatives.

    In-batch (``negative_keys=None``): key j != i is a negative for query i,

        loss_i = lse_j(<q_i, k_j>/tau) - <q_i, k_i>/tau.

    With a bank (e.g. a MoCo queue): only the bank's rows are negatives, and the bank gets no
    gradient (it is detached),

        loss_i = logaddexp(pos_i, lse_j(<q_i, n_j>/tau)) - pos_i,   pos_i = <q_i, k_i>/tau.

    Args:
        query: (M, d); positive_key: (M, d), row i is query i's positive.
        temperature: $temperature Default 0.1. It may be passed as the third positional
            argument, ``info_nce(q, k, 0.1)``; a 2-D tensor there is read as ``negative_keys``
            (the bank's old place) with a DeprecationWarning.
        negative_keys: optional (K, d) bank shared by every query; keyword-only.
        normalize: L2-normalise query, keys and bank rows first.
        reduction: "mean" | "sum" over the M queries, or "none" for (M,).
        backend: $backend
        gather_distributed: in-batch only: each rank's queries meet the keys of every rank of
            ``group``; the keys are gathered with a gather whose backward reduce-scatters their
            gradients (the general, asymmetric case of :mod:`infonce_kernels.distributed`).

    Returns:
        A 0-d tensor (or (M,)), float32 (float64 for float64 inputs), in nats.
    """
    temperature, negative_keys = _temperature_and_bank(temperature_, temperature, negative_keys)
    v.check_features("query", query)
    if gather_distributed and negative_keys is not None:
        raise ValueError("gather_distributed=True applies to in-batch negatives; with negative_keys each rank "
                         "already holds the whole bank")
    v.check_features("positive_key", positive_key)
    v.check_same_kind("query", query, "positive_key", positive_key, same_rows=True)
    tensors = {"query": query, "positive_key": positive_key}
    if negative_keys is not None:
        v.check_features("negative_keys", negative_keys)
        v.check_same_kind("query", query, "negative_keys", negative_keys)
        tensors["negative_keys"] = negative_keys
    v.check_reduction(reduction)
    tau, scale = inverse_temperature(temperature, query)
    v.check_values(tensors, inverse={"temperature": tau})
    if normalize:
        query, positive_key = l2_normalize(query), l2_normalize(positive_key)
    pos = row_dot(query, positive_key) * scale
    none = Exclusion.none(query.shape[0], query.device)
    if negative_keys is not None:
        bank = negative_keys.detach()
        if normalize:
            bank = l2_normalize(bank)
        neg = fused_lse(query, bank, scale, none, backend)
        return v.reduce(torch.logaddexp(pos, neg) - pos, reduction)
    where = distributed.rank_rows(query.shape[0], query.device, group) if gather_distributed else None
    keys = positive_key if where is None else distributed.gather_rows_with_grad(positive_key, where)
    return reduce_rows(fused_lse(query, keys, scale, none, backend) - pos, reduction, where)


class InfoNCELoss(LossModule):
    """Module form of :func:`info_nce`: ``InfoNCELoss(temperature=0.1)(query, positive_key, negative_keys=None)``."""

    def __init__(self, temperature=0.1, *, normalize=True, reduction="mean", backend="auto",
                 gather_distributed=False, group=None):
        super().__init__(temperature, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, group=group)

    def forward(self, query, positive_key, negative_keys=None):
        return info_nce(query, positive_key, temperature=self.temperature, negative_keys=negative_keys,
                        **self.options())
