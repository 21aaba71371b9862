"""Deprecated alias of :mod:`infonce_kernels.losses.supcon` (the losses are one package now)."""

import warnings

from .losses.supcon import *  # noqa: F401,F403
from .losses.supcon import __all__  # noqa: F401

warnings.warn("infonce_kernels.supcon is deprecated: import from infonce_kernels (or infonce_kernels.losses.supcon)",
              DeprecationWarning, stacklevel=2)
