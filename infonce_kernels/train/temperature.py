"""Temperature for the trainer: fixed, learnable (CLIP-style log-parameterised and clamped), or
scheduled with the logarithmic inverse-temperature annealing

    beta(t) = min(beta_max, beta0 * ln(e + t / t0)),   tau(t) = 1 / beta(t),   beta0 = 1 / tau0

(t = optimiser step).  The library's ``infonce_kernels.temperature.LogarithmicAnnealing`` is used
when present; the same formula is implemented here as a fallback.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["TEMPERATURE_MODES", "Temperature", "log_annealing_beta"]

TEMPERATURE_MODES = ("fixed", "learnable", "log")


def log_annealing_beta(step: float, beta0: float, t0: float, beta_max: float) -> float:
    """beta(t) = min(beta_max, beta0 * ln(e + t/t0)); beta(0) = beta0."""
    if t0 <= 0:
        raise ValueError(f"--anneal-t0 must be > 0, got {t0}")
    return min(beta_max, beta0 * math.log(math.e + max(step, 0) / t0))


class Temperature(nn.Module):
    """``temperature(step)`` -> float (fixed / log schedule) or 0-d tensor with grad (learnable)."""

    def __init__(self, mode: str = "fixed", tau: float = 0.5, *, tau_min: float = 0.01, t0: float = 1000.0):
        super().__init__()
        if mode not in TEMPERATURE_MODES:
            raise ValueError(f"--temperature-mode: unknown mode {mode!r}; choose one of {', '.join(TEMPERATURE_MODES)}")
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"--temperature must be a positive finite number, got {tau}")
        if not (0 < tau_min <= tau):
            raise ValueError(f"--tau-min must be in (0, --temperature={tau}], got {tau_min}")
        self.mode, self.tau0, self.tau_min, self.t0 = mode, float(tau), float(tau_min), float(t0)
        self._schedule = None
        if mode == "log":
            try:  # the library's schedule (infonce_kernels.temperature), same formula
                from infonce_kernels.temperature import LogarithmicAnnealing

                self._schedule = LogarithmicAnnealing.from_temperatures(tau, t0=t0, minimum=tau_min)
            except (ImportError, AttributeError):
                self._schedule = None
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
        if self.mode == "log":
            if self._schedule is not None:
                return float(self._schedule.temperature_at(step))
            return 1.0 / log_annealing_beta(step, 1.0 / self.tau0, self.t0, 1.0 / self.tau_min)
        return torch.exp(-self.log_scale.clamp(max=self.max_log_scale))

    def value(self, step: int) -> float:
        t = self.forward(step)
        return float(t.detach()) if torch.is_tensor(t) else float(t)
