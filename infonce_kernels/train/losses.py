"""Name -> loss registry for the trainer.

Every entry adapts one public loss of :mod:`infonce_kernels` to the trainer's calling convention
``fn(z1, z2, temperature, labels=None, backend="auto") -> scalar``, where ``z1``/``z2`` are the
projections of the two views (B x d, not yet normalised; the losses normalise) and
``temperature`` is a float or a 0-d tensor (learnable temperature).

The function itself is looked up with ``getattr(infonce_kernels, name)`` when the loss is built, so a
loss that another part of the package adds later (``dcl``, ``dhel``, ``supcon``) works as soon as it
is exported.  To add one: ``register_loss("name")`` for a pair loss with ``nt_xent``'s signature,
or ``register_loss("name", adapter)`` with an adapter ``(fn, z1, z2, temperature, labels, backend)``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

__all__ = ["LOSSES", "register_loss", "get_loss", "available_losses", "loss_needs_labels"]


def _pair(fn, z1, z2, temperature, labels, backend):
    return fn(z1, z2, temperature=temperature, backend=backend)


def _info_nce(fn, z1, z2, temperature, labels, backend):
    # in-batch InfoNCE is one-directional: average both directions (each view as the query)
    return 0.5 * (fn(z1, z2, temperature=temperature, backend=backend)
                  + fn(z2, z1, temperature=temperature, backend=backend))


def _supcon(fn, z1, z2, temperature, labels, backend):
    # multi-view SupCon: all 2B projections with their labels (DESIGN §2)
    z = torch.cat([z1, z2])
    return fn(z, torch.cat([labels, labels]), temperature=temperature, backend=backend)


# name -> (adapter, needs_labels)
LOSSES: Dict[str, tuple] = {}


def register_loss(name: str, adapter: Callable = _pair, *, needs_labels: bool = False) -> None:
    LOSSES[name] = (adapter, needs_labels)


register_loss("nt_xent")
register_loss("info_nce", _info_nce)
register_loss("dcl")
register_loss("dhel")
register_loss("supcon", _supcon, needs_labels=True)


def _package():
    import infonce_kernels

    return infonce_kernels


def available_losses():
    """Registered names whose function is exported by ``infonce_kernels`` right now."""
    pkg = _package()
    return [n for n in LOSSES if callable(getattr(pkg, n, None))]


def loss_needs_labels(name: str) -> bool:
    return LOSSES.get(name, (None, False))[1]


def get_loss(name: str, backend: str = "auto") -> Callable:
    """``loss(z1, z2, temperature, labels=None)`` for the registered loss ``name``."""
    pkg = _package()
    fn = getattr(pkg, name, None)
    if name not in LOSSES or not callable(fn):
        avail = available_losses()
        why = "is not a registered trainer loss" if name not in LOSSES else "is not exported by infonce_kernels (yet)"
        raise ValueError(f"--loss: {name!r} {why}; available: {', '.join(avail) or '(none)'}")
    adapter, needs_labels = LOSSES[name]

    def loss(z1: torch.Tensor, z2: torch.Tensor, temperature, labels: Optional[torch.Tensor] = None):
        if needs_labels and (labels is None or bool((labels < 0).any())):
            raise ValueError(f"--loss {name} needs a label for every training image")
        return adapter(fn, z1, z2, temperature, labels, backend)

    loss.__name__ = name
    return loss
