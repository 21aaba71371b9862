"""NT-Xent, the SimCLR loss: ``lse(z, z, 1/tau, {self}) - <z_i, z_pos(i)>/tau``."""

import torch

from ._common import LossModule, pair_lse, rank_rows, reduce_rows, row_dot, shared_doc, two_views

__all__ = ["nt_xent", "NTXentLoss"]


@shared_doc
def nt_xent(z1, z2, temperature=0.5, *, normalize=True, reduction="mean", backend="auto",
            gather_distributed=False, group=None):
    """NT-Xent, the SimCLR loss, over 2B anchors.

    With z = cat[z1, z2] (rows normalised when ``normalize``) and pos(i) the other view of row i,

        loss_i = -log( exp(<z_i, z_pos(i)>/tau) / sum_{j != i} exp(<z_i, z_j>/tau) ),

    i.e. each anchor's own row is excluded, its positive stays in the denominator and the
    negatives are the 2B - 2 other rows of both views.

    Args:
        z1, z2: $views
        temperature: $temperature
        normalize: $normalize SimCLR does.
        reduction: $reduction_2b
        backend: $backend
        gather_distributed: $gather

    Returns:
        $returns
    """
    z, b, scale = two_views("nt_xent", z1, z2, temperature, normalize, reduction, gather_distributed)
    pos = row_dot(z[:b], z[b:]) * scale
    where = rank_rows(z.shape[0], z.device, gather_distributed, group)
    r = pair_lse(z, scale, False, backend, where)
    return reduce_rows(r - torch.cat([pos, pos]), reduction, where)


class NTXentLoss(LossModule):
    """Module form of :func:`nt_xent`: ``loss = NTXentLoss(temperature=0.5)(z1, z2)``; the
    arguments are :func:`nt_xent`'s."""

    loss = staticmethod(nt_xent)
    default_temperature = 0.5
