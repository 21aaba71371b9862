"""The trainer's checkpoint files: what they hold, how they are written, and how they are checked.

A checkpoint is an ordinary ``torch.save`` file of a dict that holds only tensors and plain Python
values (dict, list, tuple, str, int, float, bool, None), so ``torch.load(path)`` reads it with the
default ``weights_only=True``. Its top-level keys::

    format          "infonce_kernels.train checkpoint"
    version         2
    sha256          hex SHA-256 of every other entry (see :func:`digest`)
    config          the resolved TrainConfig as a dict
    model           SimCLRModel.state_dict() (keys "encoder.*" and "head.*")
    temperature     LearnableTemperature.state_dict() or the schedule's state_dict()
    optimizer, scheduler, epoch, step_in_epoch, global_step, history, baseline
    rng             one dict per rank: python (random.getstate()), numpy (np.random.get_state
                    (legacy=False) with its key as an int64 tensor), torch, and cuda when used

The digest covers the bytes of every tensor and every plain value, so a file whose bytes changed
after it was written (a flipped bit, a partial copy) is refused instead of resuming silently with
damaged weights. :func:`save_checkpoint` writes atomically (temporary file, ``os.replace``) with the
user's umask (:mod:`.files`), and keeps the file it replaces as ``previous.pt`` beside ``last.pt``.

Version 1 files (written before the digest; their RNG states are numpy arrays) still load: numpy
arrays and dtypes are the only classes allowed in them, the rest is read as ``weights_only``.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import math
import os
import pickle
import zipfile
from typing import Any, Dict, Optional

import numpy as np
import torch

from .files import atomic_write

__all__ = ["CheckpointError", "FORMAT", "VERSION", "LAST", "PREVIOUS", "digest", "save_checkpoint",
           "load_checkpoint", "previous_of", "numpy_rng_state", "set_numpy_rng_state"]

FORMAT = "infonce_kernels.train checkpoint"
VERSION = 2
LAST, PREVIOUS = "last.pt", "previous.pt"  # the newest checkpoint and the one before it

# what every checkpoint holds besides format, version and sha256
_ENTRIES = ("config", "model", "temperature", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step",
            "history", "baseline", "rng")
# the numpy globals a version-1 checkpoint may name (its RNG state, numpy scalars in its history)
_LEGACY_NUMPY_GLOBALS = ("numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                         "numpy.core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
                         "numpy.core.multiarray.scalar")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and says why."""


# ----------------------------------------------------------------------------------------------
# integrity


def _feed(h, obj) -> None:
    """Feed ``obj`` to the hash ``h``: a type tag, then the value (tensor: dtype, shape, raw bytes).

    Only the types ``weights_only`` loading accepts are allowed, so a checkpoint that hashes is
    also one that ``torch.load(path)`` reads with its defaults."""
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif kind in (dict, collections.OrderedDict):  # state_dict()s are OrderedDicts
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif kind in (list, tuple):
        h.update(f"{'L' if kind is list else 'U'}{len(obj)};".encode())
        for v in obj:
            _feed(h, v)
    elif kind is str:
        b = obj.encode()
        h.update(f"S{len(b)};".encode() + b)
    elif kind is bool or obj is None:
        h.update(f"{obj!r};".encode())
    elif kind is int:
        h.update(f"I{obj};".encode())
    elif kind is float:
        h.update(f"F{obj.hex() if math.isfinite(obj) else obj!r};".encode())
    else:
        raise TypeError(f"checkpoint entries must be tensors or plain Python values, got {kind.__module__}."
                        f"{kind.__qualname__}")


def digest(record: Dict[str, Any]) -> str:
    """Hex SHA-256 of every entry of ``record`` but ``sha256``, in insertion order."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in record.items() if k != "sha256"})
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# writing


def previous_of(path: str) -> Optional[str]:
    """``previous.pt`` beside ``path`` when ``path`` is a ``last.pt``, else None."""
    if os.path.basename(path) != LAST:
        return None
    return os.path.join(os.path.dirname(path), PREVIOUS)


def save_checkpoint(payload: Dict[str, Any], path: str) -> None:
    """Write ``payload`` (tensors and plain values only) to ``path`` with its format, version and
    digest, atomically; a ``last.pt`` already there becomes ``previous.pt``."""
    record: Dict[str, Any] = {"format": FORMAT, "version": VERSION}
    record.update(payload)
    record["sha256"] = digest(record)
    prev = previous_of(path)

    def keep_previous():
        if prev is not None and os.path.exists(path):
            # a hard link keeps last.pt in place until the new one replaces it (never a moment without one)
            link = prev + ".tmp"
            try:
                if os.path.lexists(link):
                    os.unlink(link)
                os.link(path, link)
                os.replace(link, prev)
            except OSError:  # no hard links on this file system
                os.replace(path, prev)

    atomic_write(path, lambda f: torch.save(record, f), before_replace=keep_previous)


# ----------------------------------------------------------------------------------------------
# reading


def _legacy_numpy_globals(path: str):
    """The numpy classes a version-1 file names, or None when it names anything else."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    if not names or any(n not in _LEGACY_NUMPY_GLOBALS and not
                        (n.startswith("numpy.dtypes.") and n.endswith("DType")) for n in names):
        return None
    resolved = []
    for n in names:
        module, _, attr = n.rpartition(".")
        resolved.append((getattr(importlib.import_module(module), attr), n))
    # a dtype is rebuilt through its class (numpy.dtypes.UInt32DType, ...), not named in the file
    return resolved + [type(np.dtype(t)) for t in ("uint32", "int64", "float64")]


def _read(path: str) -> Any:
    """torch.load(path, weights_only=True), numpy arrays allowed only for a version-1 file."""
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        raise CheckpointError(f"{path} is not a PyTorch checkpoint file (it does not begin as one; {size} bytes)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or damaged: its {size} bytes are the start of a PyTorch file "
                              "without its end")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            allowed = _legacy_numpy_globals(path)
            if allowed is None:
                raise
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds Python objects other than tensors and plain values, which a "
                              "checkpoint of this trainer never does; it is refused because loading them "
                              "could run code") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged archive
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path} cannot be read: it is damaged or not a checkpoint "
                              f"({type(e).__name__}{': ' + first[:200] if first else ''})") from None


def _plain(obj):
    """numpy scalars and containers of them (found in version-1 histories) -> Python values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return type(obj)((k, _plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _upgrade_v1(ck: Dict[str, Any]) -> Dict[str, Any]:
    """A version-1 record in the version-2 layout (same training state, exact resume)."""
    ck = dict(ck)
    rng = []
    for r in ck["rng"]:
        r = dict(r)
        name, key, pos, has_gauss, gauss = r["numpy"]  # np.random.get_state() (legacy tuple)
        r["numpy"] = {"bit_generator": str(name), "state": {"key": torch.from_numpy(np.asarray(key, np.int64)),
                                                            "pos": int(pos)},
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
        rng.append(r)
    ck["rng"] = rng
    ck["history"], ck["baseline"] = _plain(ck["history"]), _plain(ck["baseline"])
    if ck["config"].get("temperature_mode") not in ("learnable", None) and not ck["temperature"]:
        # version 1 kept no schedule state: the schedule's step is the optimiser step
        ck["temperature"] = {"last_step": int(ck["global_step"])}
    ck["format"], ck["version"] = FORMAT, VERSION
    return ck


def _check(path: str) -> Dict[str, Any]:
    ck = _read(path)
    if not isinstance(ck, dict) or not ("format" in ck or ck.get("version") == 1) or set(_ENTRIES) - set(ck):
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of infonce_kernels.train")
    version = ck.get("version")
    if version == 1:
        return _upgrade_v1(ck)
    if ck.get("format") != FORMAT or version != VERSION:
        raise CheckpointError(f"{path} is a checkpoint of format {ck.get('format')!r} version {version!r}; this "
                              f"trainer reads versions 1 and {VERSION}")
    stored = ck.get("sha256")
    if not isinstance(stored, str) or digest(ck) != stored:
        raise CheckpointError(f"{path} is damaged: its contents do not match the SHA-256 recorded when it was "
                              "written")
    return ck


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read and verify a checkpoint; raises :class:`CheckpointError` with one clear sentence (and,
    for a damaged ``last.pt``, where the previous checkpoint is and how to continue from it)."""
    try:
        return _check(path)
    except CheckpointError as e:
        prev = previous_of(path)
        if prev is None or not os.path.exists(prev):
            raise
        try:
            p = _check(prev)
            offer = (f"; the previous checkpoint {prev} (epoch {p['epoch']}, step {p['global_step']}) is intact: "
                     f"continue from it with --resume {prev}")
        except CheckpointError as e2:
            offer = f"; the previous checkpoint is unusable too: {e2}"
        raise CheckpointError(str(e) + offer) from None


# ----------------------------------------------------------------------------------------------
# numpy's RNG state as tensors and plain values


def numpy_rng_state() -> Dict[str, Any]:
    """``np.random.get_state(legacy=False)`` with its key as an int64 tensor (weights_only-safe)."""
    s = np.random.get_state(legacy=False)
    s["state"] = {"key": torch.from_numpy(s["state"]["key"].astype(np.int64)), "pos": int(s["state"]["pos"])}
    s["has_gauss"], s["gauss"] = int(s["has_gauss"]), float(s["gauss"])
    return s


def set_numpy_rng_state(s: Dict[str, Any]) -> None:
    np.random.set_state({**s, "state": {"key": s["state"]["key"].numpy().astype(np.uint32),
                                        "pos": s["state"]["pos"]}})
