"""Deprecated alias of :mod:`infonce_kernels.losses.debiased` (the losses are one package now)."""

import warnings

from .losses.debiased import *  # noqa: F401,F403
from .losses.debiased import __all__  # noqa: F401

warnings.warn("infonce_kernels.debiased is deprecated: import from infonce_kernels (or infonce_kernels.losses.debiased)",
              DeprecationWarning, stacklevel=2)
