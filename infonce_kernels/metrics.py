"""Deprecated alias of :mod:`infonce_kernels.losses.metrics` (the losses are one package now)."""

import warnings

from .losses.metrics import *  # noqa: F401,F403
from .losses.metrics import __all__  # noqa: F401

warnings.warn("infonce_kernels.metrics is deprecated: import from infonce_kernels (or infonce_kernels.losses.metrics)",
              DeprecationWarning, stacklevel=2)
