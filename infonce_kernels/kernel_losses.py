"""Deprecated alias of :mod:`infonce_kernels.losses.kcl` (the losses are one package now)."""

import warnings

from .losses.kcl import *  # noqa: F401,F403
from .losses.kcl import __all__  # noqa: F401

warnings.warn("infonce_kernels.kernel_losses is deprecated: import from infonce_kernels (or infonce_kernels.losses.kcl)",
              DeprecationWarning, stacklevel=2)
