"""Temperature for the contrastive losses: learnable (CLIP-style, log-parameterised) and scheduled.

* :class:`LearnableTemperature`: an ``nn.Module`` holding log(1/tau) (CLIP's ``logit_scale``);
  calling it returns tau as a 0-d tensor to pass as any loss's ``temperature``, and the gradient
  reaches the parameter through the fused op's d(scale).
* Schedules (:class:`ConstantTemperature`, :class:`LinearTemperature`,
  :class:`CosineTemperature`, :class:`StepTemperature`, :class:`LogarithmicAnnealing`): plain
  objects for any training loop, like an LR scheduler::

      schedule = LogarithmicAnnealing(beta0=2.0, t0=1000, beta_max=20.0)
      for batch in loader:
          loss = infonce_kernels.nt_xent(z1, z2, schedule.temperature)
          ...
          schedule.step()

  ``temperature`` (alias ``value``) is tau at the current step (a float), ``scale`` is 1/tau,
  ``step()`` advances one step and returns the new tau, ``temperature_at(t)`` evaluates any step,
  and ``state_dict()`` / ``load_state_dict()`` save and restore the step (and the settings;
  ``load_state_dict`` checks them as the constructor does).
"""

import abc
import math
import numbers
from collections.abc import Mapping

import torch

__all__ = [
    "LearnableTemperature",
    "TemperatureSchedule",
    "ConstantTemperature",
    "LinearTemperature",
    "CosineTemperature",
    "StepTemperature",
    "LogarithmicAnnealing",
]


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


def _count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _optional_positive(name, value):
    return None if value is None else _positive(name, value)


def _cap(name, value, floor):
    """An upper bound (inf allowed) that is >= ``floor``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= floor:
        raise ValueError(f"{name} must be a number >= beta0 = {floor}, got {value!r}")
    return float(value)


class LearnableTemperature(torch.nn.Module):
    """A learnable temperature, log-parameterised like CLIP's ``logit_scale``.

    The parameter ``log_scale`` is log(1/tau) (initialised to log(1/init)); ``forward()`` returns

        tau = exp(-min(log_scale, log(max_scale)))       (0-d float32 tensor, dimensionless)

    so 1/tau never exceeds ``max_scale`` (CLIP's clamp at 100). Pass the result as the
    ``temperature`` of any loss: its gradient reaches ``log_scale`` through the fused op's
    gradient with respect to its scale. While the clamp is active the gradient is 0 (as for a
    clamped parameter). :attr:`scale` gives 1/tau (also differentiable) for :func:`clip_loss`'s
    ``logit_scale``.

    Args:
        init: initial tau > 0 (default 0.07, CLIP's), with 1/init <= max_scale.
        max_scale: the largest inverse temperature 1/tau (default 100.0).
    """

    def __init__(self, init=0.07, max_scale=100.0):
        super().__init__()
        init, max_scale = _positive("init", init), _positive("max_scale", max_scale)
        if 1.0 / init > max_scale * (1 + 1e-12):
            raise ValueError(f"init={init} is below the smallest temperature 1/max_scale = {1.0 / max_scale}")
        self.max_scale = max_scale
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / init)))

    def _clamped(self):
        return self.log_scale.clamp(max=math.log(self.max_scale))

    def forward(self):
        return torch.exp(-self._clamped())

    @property
    def scale(self):
        """1/tau, a differentiable 0-d tensor (CLIP's ``logit_scale.exp()``, clamped)."""
        return torch.exp(self._clamped())

    @property
    def value(self):
        """tau as a float (for logging)."""
        return float(self.forward().detach())

    temperature = value

    def clamp_(self):
        """Clamp the parameter itself to log(max_scale) (call after an optimiser step, as CLIP
        does), so that it cannot drift beyond the clamp where it gets no gradient."""
        with torch.no_grad():
            self.log_scale.clamp_(max=math.log(self.max_scale))
        return self

    def extra_repr(self):
        return f"temperature={self.value:.6g}, max_scale={self.max_scale}"


class TemperatureSchedule(abc.ABC):
    """Base class: a temperature tau(t) of the step count t = 0, 1, 2, ...

    Subclasses define :meth:`temperature_at`. State: ``last_step`` (the number of ``step()``
    calls) and the constructor's settings, all plain Python numbers. ``_checks`` maps each
    attribute to the check ``(name, value) -> value`` that :meth:`load_state_dict` applies to it
    (attributes of a subclass without a check are loaded as they are).
    """

    _checks = {"last_step": lambda name, value: _count(name, value, 0)}

    def __init__(self):
        self.last_step = 0

    @abc.abstractmethod
    def temperature_at(self, step: int) -> float:
        """tau after ``step`` calls of :meth:`step`."""

    @property
    def temperature(self) -> float:
        """tau at the current step."""
        return self.temperature_at(self.last_step)

    @property
    def value(self) -> float:
        """Alias of :attr:`temperature`."""
        return self.temperature

    @property
    def scale(self) -> float:
        """1/tau at the current step (the inverse temperature beta)."""
        return 1.0 / self.temperature

    def step(self) -> float:
        """Advance one step; returns the new tau."""
        self.last_step += 1
        return self.temperature

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the step and settings of :meth:`state_dict`; a key may be left out (it keeps
        its value). Raises ValueError/TypeError, naming the key, for a value the constructor would
        refuse (a temperature <= 0, ``total_steps`` 0, ...): nothing is changed then."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        unknown = set(state_dict) - set(self.__dict__)
        if unknown:
            raise ValueError(f"state_dict has keys {sorted(unknown)} unknown to {type(self).__name__}")
        state = dict(self.__dict__)
        for key, value in state_dict.items():
            check = self._checks.get(key)
            state[key] = value if check is None else check(f"state_dict[{key!r}]", value)
        self._check_together(state)
        self.__dict__.update(state)

    def _check_together(self, state: dict) -> None:
        """Checks that involve several settings of ``state`` (a candidate ``__dict__``)."""

    def __repr__(self):
        settings = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({settings})"


class ConstantTemperature(TemperatureSchedule):
    """tau(t) = temperature."""

    _checks = {**TemperatureSchedule._checks, "base": _positive}

    def __init__(self, temperature=0.5):
        super().__init__()
        self.base = _positive("temperature", temperature)

    def temperature_at(self, step):
        return self.base


class _Ramp(TemperatureSchedule):
    """A schedule from ``start`` to ``end`` over ``total_steps`` steps, then constant."""

    _checks = {**TemperatureSchedule._checks, "start": _positive, "end": _positive,
               "total_steps": lambda name, value: _count(name, value, 1)}

    def __init__(self, start, end, total_steps):
        super().__init__()
        self.start, self.end = _positive("start", start), _positive("end", end)
        self.total_steps = _count("total_steps", total_steps, 1)

    def _progress(self, step):
        """min(t / total_steps, 1), in [0, 1]."""
        return min(max(step, 0) / self.total_steps, 1.0)


class LinearTemperature(_Ramp):
    """tau(t) = start + (end - start) * min(t / total_steps, 1): linear from ``start`` to ``end``
    over ``total_steps`` steps, then constant."""

    def temperature_at(self, step):
        return self.start + (self.end - self.start) * self._progress(step)


class CosineTemperature(_Ramp):
    """tau(t) = end + (start - end) * (1 + cos(pi * min(t / total_steps, 1))) / 2: half a cosine
    from ``start`` to ``end`` over ``total_steps`` steps, then constant."""

    def temperature_at(self, step):
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * self._progress(step)))


class StepTemperature(TemperatureSchedule):
    """tau(t) = start * gamma ** (t // step_size), stopped at ``final`` when given (a floor for
    gamma < 1, a ceiling for gamma > 1), like ``torch.optim.lr_scheduler.StepLR``."""

    _checks = {**TemperatureSchedule._checks, "start": _positive, "gamma": _positive, "final": _optional_positive,
               "step_size": lambda name, value: _count(name, value, 1)}

    def __init__(self, start, step_size, gamma=0.5, final=None):
        super().__init__()
        self.start = _positive("start", start)
        self.step_size = _count("step_size", step_size, 1)
        self.gamma = _positive("gamma", gamma)
        self.final = _optional_positive("final", final)

    def temperature_at(self, step):
        tau = self.start * self.gamma ** (max(step, 0) // self.step_size)
        if self.final is not None:
            tau = max(tau, self.final) if self.gamma < 1 else min(tau, self.final)
        return tau


class LogarithmicAnnealing(TemperatureSchedule):
    """Logarithmic inverse-temperature annealing (Chaudhry, "Asymptotic and Finite-Time
    Guarantees for Langevin-Based Temperature Annealing in InfoNCE"):

        beta(t) = min(beta0 * ln(e + t / t0), beta_max),   tau(t) = 1 / beta(t),

    so beta(0) = beta0 and tau decreases slowly (logarithmically) towards 1/beta_max.

    Args:
        beta0: initial inverse temperature 1/tau0 > 0.
        t0: time scale > 0 in steps.
        beta_max: cap on the inverse temperature (default inf: no cap); must be >= beta0.
    """

    _checks = {**TemperatureSchedule._checks, "beta0": _positive, "t0": _positive}

    def __init__(self, beta0, t0=1000.0, beta_max=math.inf):
        super().__init__()
        self.beta0, self.t0 = _positive("beta0", beta0), _positive("t0", t0)
        self.beta_max = _cap("beta_max", beta_max, self.beta0)

    def _check_together(self, state):
        state["beta_max"] = _cap("state_dict['beta_max']", state["beta_max"], state["beta0"])

    @classmethod
    def from_temperatures(cls, initial, t0=1000.0, minimum=None):
        """The schedule from tau0 = ``initial`` down to (at least) ``minimum``:
        beta0 = 1/initial, beta_max = 1/minimum."""
        initial = _positive("initial", initial)
        beta_max = math.inf if minimum is None else 1.0 / _positive("minimum", minimum)
        return cls(1.0 / initial, t0, beta_max)

    def inverse_temperature_at(self, step):
        return min(self.beta0 * math.log(math.e + max(step, 0) / self.t0), self.beta_max)

    def temperature_at(self, step):
        return 1.0 / self.inverse_temperature_at(step)
