"""Name -> loss registry for the trainer.

Every entry adapts one public loss of :mod:`infonce_kernels` to the trainer's calling convention
``fn(z1, z2, temperature, labels=None, gather_distributed=False) -> scalar``, where ``z1``/``z2``
are the projections of the two views (B x d, not yet normalised; the losses normalise) and
``temperature`` is a float or a 0-d tensor (learnable temperature).

Under DDP a loss registered with ``distributed=True`` takes ``gather_distributed=True``: each rank
passes its own rows and the loss runs over every rank's (:mod:`infonce_kernels.distributed`,
O(N) gradient traffic). The others are given the projections of every rank, gathered with
gradient by the trainer, and compute the whole batch's loss on each rank.

To add a loss: ``register_loss("name")`` for a pair loss with ``nt_xent``'s signature, or
``register_loss("name", adapter)`` with an adapter
``(fn, z1, z2, temperature, labels, backend, **gather) -> scalar``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

__all__ = ["LOSSES", "register_loss", "get_loss", "available_losses", "loss_needs_labels", "loss_gathers"]


def _pair(fn, z1, z2, temperature, labels, backend, **gather):
    return fn(z1, z2, temperature=temperature, backend=backend, **gather)


def _info_nce(fn, z1, z2, temperature, labels, backend, **gather):
    # in-batch InfoNCE is one-directional: average both directions (each view as the query)
    return 0.5 * (fn(z1, z2, temperature=temperature, backend=backend, **gather)
                  + fn(z2, z1, temperature=temperature, backend=backend, **gather))


def _supcon(fn, z1, z2, temperature, labels, backend, **gather):
    # multi-view SupCon: all 2B projections with their labels (docs/design.md, the loss family)
    z = torch.cat([z1, z2])
    return fn(z, torch.cat([labels, labels]), temperature=temperature, backend=backend, **gather)


def _kcl(fn, z1, z2, temperature, labels, backend):
    # KCL's Gaussian kernel exp(-t ||u - v||^2) = exp(2t <u, v> - 2t) on unit rows: t = 1/(2 tau)
    # gives the sharpness of an InfoNCE temperature tau
    return fn(z1, z2, t=0.5 / temperature, backend=backend)


# name -> (adapter, needs_labels, distributed)
LOSSES: Dict[str, tuple] = {}


def register_loss(name: str, adapter: Callable = _pair, *, needs_labels: bool = False,
                  distributed: bool = False) -> None:
    LOSSES[name] = (adapter, needs_labels, distributed)


register_loss("nt_xent", distributed=True)
register_loss("info_nce", _info_nce, distributed=True)
register_loss("dcl", distributed=True)
register_loss("dclw", distributed=True)
register_loss("dhel", distributed=True)
register_loss("supcon", _supcon, needs_labels=True, distributed=True)
register_loss("kcl", _kcl)
register_loss("hard_negative_nt_xent")
register_loss("debiased_nt_xent")


def _package():
    import infonce_kernels

    return infonce_kernels


def available_losses():
    """Registered names whose function is exported by ``infonce_kernels`` right now."""
    pkg = _package()
    return [n for n in LOSSES if callable(getattr(pkg, n, None))]


def loss_needs_labels(name: str) -> bool:
    return LOSSES.get(name, (None, False, False))[1]


def loss_gathers(name: str) -> bool:
    """Whether the loss runs over several ranks itself (``gather_distributed=True``)."""
    return LOSSES.get(name, (None, False, False))[2]


def get_loss(name: str, backend: str = "auto") -> Callable:
    """``loss(z1, z2, temperature, labels=None, gather_distributed=False)`` for the registered loss
    ``name``; ``gather_distributed=True`` only for a loss with :func:`loss_gathers`."""
    pkg = _package()
    fn = getattr(pkg, name, None)
    if name not in LOSSES or not callable(fn):
        avail = available_losses()
        why = "is not a registered trainer loss" if name not in LOSSES else "is not exported by infonce_kernels"
        raise ValueError(f"--loss: {name!r} {why}; available: {', '.join(avail) or '(none)'}")
    adapter, needs_labels, distributed = LOSSES[name]

    def loss(z1: torch.Tensor, z2: torch.Tensor, temperature, labels: Optional[torch.Tensor] = None,
             gather_distributed: bool = False):
        if needs_labels and (labels is None or bool((labels < 0).any())):
            raise ValueError(f"--loss {name} needs a label for every training image")
        if gather_distributed and not distributed:
            raise ValueError(f"--loss {name} does not gather over ranks itself; gather its inputs instead")
        gather = {"gather_distributed": True} if gather_distributed else {}
        return adapter(fn, z1, z2, temperature, labels, backend, **gather)

    loss.__name__ = name
    return loss
