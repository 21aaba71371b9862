"""Temperature for the trainer: fixed, learnable (CLIP-style log-parameterised and clamped), or
scheduled over the optimiser steps t by one of the package's schedules
(:mod:`infonce_kernels.temperature`):

- ``log``: logarithmic inverse-temperature annealing, beta(t) = min(beta_max, beta0 ln(e + t/t0)),
  tau = 1/beta, beta0 = 1/tau0, beta_max = 1/tau_min;
- ``linear`` / ``cosine``: from tau0 down to tau_min over the whole run (``total_steps``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from infonce_kernels.temperature import CosineTemperature, LinearTemperature, LogarithmicAnnealing

__all__ = ["TEMPERATURE_MODES", "Temperature"]

TEMPERATURE_MODES = ("fixed", "learnable", "log", "linear", "cosine")


class Temperature(nn.Module):
    """``temperature(step)`` -> float (fixed / scheduled) or 0-d tensor with grad (learnable).

    Args:
        mode: one of :data:`TEMPERATURE_MODES`.
        tau: the temperature (the initial one for learnable and the schedules), > 0.
        tau_min: the learnable temperature's clamp and the schedules' end (log: its cap).
        t0: the log schedule's time constant in steps.
        total_steps: the run's optimiser steps (linear / cosine reach ``tau_min`` there).
    """

    def __init__(self, mode: str = "fixed", tau: float = 0.5, *, tau_min: float = 0.01, t0: float = 1000.0,
                 total_steps: int = 1):
        super().__init__()
        if mode not in TEMPERATURE_MODES:
            raise ValueError(f"--temperature-mode: unknown mode {mode!r}; choose one of {', '.join(TEMPERATURE_MODES)}")
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"--temperature must be a positive finite number, got {tau}")
        if not (0 < tau_min <= tau):
            raise ValueError(f"--tau-min must be in (0, --temperature={tau}], got {tau_min}")
        if t0 <= 0:
            raise ValueError(f"--anneal-t0 must be > 0, got {t0}")
        self.mode, self.tau0, self.tau_min = mode, float(tau), float(tau_min)
        self._schedule = {
            "log": lambda: LogarithmicAnnealing.from_temperatures(tau, t0=t0, minimum=tau_min),
            "linear": lambda: LinearTemperature(tau, tau_min, max(int(total_steps), 1)),
            "cosine": lambda: CosineTemperature(tau, tau_min, max(int(total_steps), 1)),
        }.get(mode, lambda: None)()
        if mode == "learnable":
            # log of the inverse temperature (CLIP's logit_scale), clamped to <= ln(1/tau_min)
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau)))

    @property
    def max_log_scale(self) -> float:
        return math.log(1.0 / self.tau_min)

    def clamp_(self) -> None:
        """Call after each optimiser step (CLIP clamps logit_scale the same way)."""
        if self.mode == "learnable":
            with torch.no_grad():
                self.log_scale.clamp_(max=self.max_log_scale)

    def forward(self, step: int):
        if self.mode == "fixed":
            return self.tau0
        if self._schedule is not None:
            return float(self._schedule.temperature_at(step))
        return torch.exp(-self.log_scale.clamp(max=self.max_log_scale))

    def value(self, step: int) -> float:
        t = self.forward(step)
        return float(t.detach()) if torch.is_tensor(t) else float(t)
