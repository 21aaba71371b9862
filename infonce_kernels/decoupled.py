"""Deprecated alias of :mod:`infonce_kernels.losses.decoupled` (the losses are one package now)."""

import warnings

from .losses.decoupled import *  # noqa: F401,F403
from .losses.decoupled import __all__  # noqa: F401

warnings.warn("infonce_kernels.decoupled is deprecated: import from infonce_kernels (or infonce_kernels.losses.decoupled)",
              DeprecationWarning, stacklevel=2)
