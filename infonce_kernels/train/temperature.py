"""The trainer's temperature, built from the package's own classes (:mod:`infonce_kernels.temperature`):

- ``fixed``: :class:`~infonce_kernels.ConstantTemperature` (tau0);
- ``learnable``: :class:`~infonce_kernels.LearnableTemperature` (CLIP-style log(1/tau), its
  inverse temperature clamped at 1/tau_min);
- ``log``: :class:`~infonce_kernels.LogarithmicAnnealing`, beta(t) = min(beta_max, beta0 ln(e + t/t0)),
  tau = 1/beta, beta0 = 1/tau0, beta_max = 1/tau_min;
- ``linear`` / ``cosine``: :class:`~infonce_kernels.LinearTemperature` / ``CosineTemperature``
  from tau0 down to tau_min over the whole run (``total_steps``).

The schedules are stepped once per optimiser step, like the learning-rate scheduler, so their
``last_step`` is the global step and their ``state_dict()`` goes into the checkpoint.
"""

from __future__ import annotations

from typing import Union

from infonce_kernels.temperature import (ConstantTemperature, CosineTemperature, LearnableTemperature,
                                         LinearTemperature, LogarithmicAnnealing, TemperatureSchedule)

__all__ = ["TEMPERATURE_MODES", "build_temperature"]

TEMPERATURE_MODES = ("fixed", "learnable", "log", "linear", "cosine")


def build_temperature(mode: str, tau: float, *, tau_min: float, t0: float,
                      total_steps: int) -> Union[LearnableTemperature, TemperatureSchedule]:
    """The temperature of ``--temperature-mode mode``.

    Args:
        mode: one of :data:`TEMPERATURE_MODES`.
        tau: the temperature (the initial one for learnable and the schedules), > 0.
        tau_min: the learnable temperature's clamp and the schedules' end (log: its cap), <= tau.
        t0: the log schedule's time constant in steps, > 0.
        total_steps: the run's optimiser steps (linear / cosine reach ``tau_min`` there).
    """
    if mode == "fixed":
        return ConstantTemperature(tau)
    if mode == "learnable":
        return LearnableTemperature(tau, max_scale=1.0 / tau_min)
    if mode == "log":
        return LogarithmicAnnealing.from_temperatures(tau, t0=t0, minimum=tau_min)
    if mode == "linear":
        return LinearTemperature(tau, tau_min, max(int(total_steps), 1))
    if mode == "cosine":
        return CosineTemperature(tau, tau_min, max(int(total_steps), 1))
    raise ValueError(f"--temperature-mode: unknown mode {mode!r}; choose one of {', '.join(TEMPERATURE_MODES)}")
