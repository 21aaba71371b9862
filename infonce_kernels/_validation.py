"""Argument checks for the public API.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
device or value) naming the argument, before any kernel runs. Checks that read tensor values
(NaN/inf, scale > 0, exclusion indices) share one device synchronisation and are skipped while
``torch.compile`` traces, where data-dependent Python branches are not allowed.
"""

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def tracing() -> bool:
    return torch.compiler.is_compiling()


def check_features(name: str, x, *, min_rows: int = 1) -> None:
    """x must be a 2-D floating tensor (rows, d) with at least ``min_rows`` rows and d >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; convert it with .to_dense()")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        what = "an empty batch" if x.shape[0] == 0 else f"{x.shape[0]} row(s)"
        raise ValueError(f"{name} needs at least {min_rows} row(s), got {what}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has feature size 0")


def check_same_kind(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, same_rows=False) -> None:
    """a and b must share dtype, device and feature size (and row count with ``same_rows``)."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same feature size, got {a.shape[1]} and {b.shape[1]}"
        )
    if same_rows and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same number of rows (pairs), got {a.shape[0]} and {b.shape[0]}"
        )


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def positive_scalar(name: str, value, *, device, dtype) -> torch.Tensor:
    """A float or a one-element tensor as a 0-d tensor (differentiable when it is one).

    A Python number is checked here; a tensor's value is checked by :func:`check_values`.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the features are on {device}")
        return value.reshape(()).to(device=device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    if tracing():  # a compiled graph may see a symbolic float: check_values asserts on the tensor
        return torch.scalar_tensor(value, device=device, dtype=dtype)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return torch.tensor(float(value), device=device, dtype=dtype)


def positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    """A Python real number > 0 (>= 0 with ``allow_zero``) and finite, as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'finite and >= 0' if allow_zero else 'positive and finite'}, got {value}")
    return float(value)


def temperature_value(temperature):
    """A temperature as the losses take it: a float, a one-element tensor, or a temperature
    module of :mod:`infonce_kernels.temperature` (a :class:`~torch.nn.Module` such as
    ``LearnableTemperature``, called for its 0-d tensor tau; a schedule, read for its current
    tau)."""
    if isinstance(temperature, (torch.Tensor, numbers.Real)):
        return temperature
    if isinstance(temperature, torch.nn.Module):
        return temperature()
    value = getattr(temperature, "temperature", None)
    if value is not None and hasattr(temperature, "temperature_at"):
        return value
    return temperature


def inverse_scalar(name: str, value, *, device, dtype):
    """(tau, 1/tau) as 0-d tensors of ``dtype`` for a positive ``value`` (see
    :func:`positive_scalar`); a Python number whose inverse overflows ``dtype`` is refused here,
    a tensor's by :func:`check_values` (pass ``inverse={name: tau}``)."""
    tau = positive_scalar(name, value, device=device, dtype=dtype)
    if not isinstance(value, torch.Tensor) and not tracing() and not math.isfinite(float(tau.reciprocal())):
        raise ValueError(f"{name} is too small: 1/{name} overflows {str(dtype).replace('torch.', '')} "
                         f"({name} = {value})")
    return tau, tau.reciprocal()


def exclude_tensor(exclude, rows: int, keys: int, device) -> torch.Tensor:
    """(rows, E) int64 contiguous exclusion indices; None gives E = 0."""
    if exclude is None:
        return torch.empty(rows, 0, dtype=torch.int64, device=device)
    if not isinstance(exclude, torch.Tensor):
        raise TypeError(f"exclude must be an integer tensor or None, got {type(exclude).__name__}")
    if exclude.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"exclude must be an integer tensor, got {exclude.dtype}")
    if exclude.dim() == 1:
        exclude = exclude[:, None]
    if exclude.dim() != 2 or exclude.shape[0] != rows or exclude.shape[1] > 2:
        raise ValueError(
            f"exclude must have shape ({rows}, E) with E <= 2 (one row per query), got {tuple(exclude.shape)}"
        )
    if exclude.device != device:
        raise ValueError(f"exclude is on {exclude.device} but q is on {device}")
    exclude = exclude.to(torch.int64).contiguous()
    if keys <= exclude.shape[1] and not tracing():
        # Only with N <= E can a row lose every key; N is tiny then, so look at the values.
        for i, row in enumerate(exclude.tolist()):
            if len({j for j in row if 0 <= j < keys}) == keys:
                raise ValueError(f"exclude removes every key from row {i}: its log-sum-exp is undefined")
    return exclude


def _int_vector(name: str, x, length: int, what: str, device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.dim() != 1 or x.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), one entry per {what}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the features are on {device}")
    return x.to(torch.int64).contiguous()


def label_tensors(row_labels, key_labels, positive, rows: int, keys: int, device):
    """None (no label rule) or the int64 (row_labels (M,), key_labels (N,), positive (M,))."""
    if row_labels is None and key_labels is None:
        if positive is not None:
            raise ValueError("positive only applies with row_labels and key_labels (the label rule)")
        return None
    if row_labels is None or key_labels is None:
        raise ValueError("row_labels and key_labels go together: pass both (or neither)")
    row_labels = _int_vector("row_labels", row_labels, rows, "query row", device)
    key_labels = _int_vector("key_labels", key_labels, keys, "key", device)
    if positive is None:
        positive = torch.full((rows,), -1, dtype=torch.int64, device=device)
    else:
        positive = _int_vector("positive", positive, rows, "query row", device)
    return row_labels, key_labels, positive


def threshold_tensors(threshold, positive, labels, rows: int, device, dtype):
    """(threshold, positive) of the threshold rule: (None, None) without it, else ``threshold``
    (M,) in ``dtype`` (the accumulation dtype) and the int64 positives (M,) (those of ``labels``
    when the label rule is on, else ``positive``, which the rule requires)."""
    if threshold is None:
        if positive is not None and labels is None:
            raise ValueError("positive only applies with row_labels and key_labels (the label rule) or threshold")
        return None, None
    if not isinstance(threshold, torch.Tensor):
        raise TypeError(f"threshold must be a floating tensor or None, got {type(threshold).__name__}")
    if not threshold.dtype.is_floating_point:
        raise TypeError(f"threshold must be a floating tensor (logits), got {threshold.dtype}")
    if threshold.dim() != 1 or threshold.shape[0] != rows:
        raise ValueError(f"threshold must have shape ({rows},), one entry per query row, got {tuple(threshold.shape)}")
    if threshold.device != device:
        raise ValueError(f"threshold is on {threshold.device} but the features are on {device}")
    if positive is None:
        raise ValueError("threshold needs positive: the (M,) index of each row's positive key, which the threshold "
                         "never drops")
    positive = labels[2] if labels is not None else _int_vector("positive", positive, rows, "query row", device)
    return threshold.detach().to(dtype).contiguous(), positive


def _keys_left(exclude, labels, keys: int) -> torch.Tensor:
    """(M,) number of keys each row keeps under its exclusion list and, when ``labels`` is given,
    the label rule. Static shapes throughout (no torch.unique), so it traces under torch.compile."""
    removed = torch.zeros(exclude.shape[0], dtype=torch.int64, device=exclude.device)
    if labels is not None:
        row_labels, key_labels, positive = labels
        sorted_keys = key_labels.sort().values
        same = torch.searchsorted(sorted_keys, row_labels, right=True) - torch.searchsorted(sorted_keys, row_labels)
        kept_positive = ((positive >= 0) & (positive < keys)
                         & (key_labels[positive.clamp(0, keys - 1)] == row_labels))
        removed = same - kept_positive.long()
    for e in range(exclude.shape[1]):  # list entries the label rule did not already remove, once each
        j = exclude[:, e]
        new = (j >= 0) & (j < keys)
        for f in range(e):
            new &= j != exclude[:, f]
        if labels is not None:
            new &= ~((key_labels[j.clamp(0, keys - 1)] == row_labels) & (j != positive))
        removed += new.long()
    return keys - removed


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The ordinary tensor under ``torch.func`` wrappers (vmap's batched tensors, the tracking
    tensors of grad and jvp): the value checks read every entry of it."""
    if tracing():  # compiled graphs hold plain tensors (functorch's C++ helpers are not traceable)
        return t
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


VALUE_CHECK_MODES = ("sync", "async", "off")


@torch.compiler.assume_constant_result
def value_check_mode() -> str:
    """$INFONCE_VALUE_CHECKS: "sync" (the default: one host synchronisation per call, then a
    ValueError), "async" (device-side asserts, no synchronisation: a bad value raises a
    RuntimeError at the next synchronisation) or "off" (no value checks: a bad value gives a
    wrong or NaN loss)."""
    mode = os.environ.get("INFONCE_VALUE_CHECKS", "sync") or "sync"
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"INFONCE_VALUE_CHECKS must be one of {VALUE_CHECK_MODES}, got {mode!r}")
    return mode


def _capturing(device) -> bool:
    """True while a CUDA graph is being captured on the current stream (no host sync allowed)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_values(tensors: dict, *, positive: dict = (), inverse: dict = (), exclude=None, keys: int = 0,
                 labels=None, threshold=None, threshold_positive=None) -> None:
    """Value checks: no NaN/inf in ``tensors``, ``positive`` and ``inverse`` entries finite and
    > 0, the inverse of ``inverse`` entries finite, ``exclude`` and label-rule positives in
    [-1, keys), no row left without keys by the exclusion list and label rule, no NaN in
    ``threshold`` (+-inf allowed) and its ``threshold_positive`` in [-1, keys).

    Eagerly they cost one host synchronisation and raise ``ValueError``. In a compiled graph
    (torch.compile), while a CUDA graph is captured, or with INFONCE_VALUE_CHECKS=async they are
    device-side asserts (``torch._assert_async``) with the same messages, which raise a
    ``RuntimeError`` without synchronising; INFONCE_VALUE_CHECKS=off skips them
    (:func:`value_check_mode`)."""
    mode = value_check_mode()
    if mode == "off":
        return
    names, flags = [], []
    with torch.no_grad():
        for name, t in tensors.items():
            names.append(f"{name} contains NaN or inf")
            flags.append(torch.isfinite(_plain(t)).all())
        for name, t in {**dict(positive), **dict(inverse)}.items():
            if isinstance(t, torch.Tensor):
                t = _plain(t)
                names.append(f"{name} must be positive and finite")
                flags.append((torch.isfinite(t) & (t > 0)).all())
        for name, t in dict(inverse).items():
            t = _plain(t)
            names.append(f"{name} is too small: 1/{name} overflows {str(t.dtype).replace('torch.', '')}")
            flags.append(torch.isfinite(t.reciprocal()).all())
        if exclude is not None and exclude.numel():
            names.append(f"exclude indices must lie in [-1, {keys})")
            flags.append(((exclude >= -1) & (exclude < keys)).all())
        if labels is not None:
            names.append(f"positive indices must lie in [-1, {keys})")
            flags.append(((labels[2] >= -1) & (labels[2] < keys)).all())
        if threshold is not None:
            names.append("threshold contains NaN")
            flags.append(~torch.isnan(_plain(threshold)).any())
            if labels is None:
                names.append(f"positive indices must lie in [-1, {keys})")
                flags.append(((threshold_positive >= -1) & (threshold_positive < keys)).all())
        if labels is not None or (exclude is not None and keys <= exclude.shape[1]):
            names.append("exclude and the label rule remove every key from some row (a row whose label every key "
                         "shares, with no designated positive among them)" if labels is not None else
                         "exclude removes every key from some row: its log-sum-exp is undefined")
            flags.append((_keys_left(exclude, labels, keys) > 0).all())
        if not flags:
            return
        if mode == "async" or tracing() or _capturing(flags[0].device):
            for name, flag in zip(names, flags):
                torch._assert_async(flag, name)
            return
        ok = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    for name, good in zip(names, ok):
        if not good:
            raise ValueError(name)
