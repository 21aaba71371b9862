"""The packages of the ``train`` extra, checked before any work so that a missing one gives one
clear sentence (what is missing, the pip command) instead of a ModuleNotFoundError mid-run."""

from __future__ import annotations

import importlib.util

__all__ = ["MissingExtraError", "require_train_extra", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'infonce_kernels[train]'"

# import name -> distribution name; matplotlib only when a plot is written
_REQUIRED = {"kornia": "kornia", "sklearn": "scikit-learn", "tqdm": "tqdm"}
_PLOT = {"matplotlib": "matplotlib"}


class MissingExtraError(ImportError):
    """A package of the ``train`` extra is not installed."""


def require_train_extra(plot: bool = True) -> None:
    """Raise :class:`MissingExtraError` naming every missing package and :data:`INSTALL_HINT`."""
    needed = dict(_REQUIRED, **(_PLOT if plot else {}))
    missing = [dist for module, dist in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtraError(f"the trainer needs the 'train' extra, and {', '.join(missing)} "
                                f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}")
