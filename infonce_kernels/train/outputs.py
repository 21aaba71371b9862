"""The trainer's output directory: checked before any work, the metric tables, the plot and the
exported encoder.

Files of a run (in ``--output-dir``): ``last.pt`` and ``previous.pt`` (checkpoints), ``steps.csv``,
``epochs.csv``, ``metrics.json``, ``curves.png`` and ``tensorboard/``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .checkpoint import LAST, PREVIOUS
from .files import atomic_write

__all__ = ["RUN_FILES", "check_output_dir", "check_export_path", "clear_run", "write_metrics", "plot_curves",
           "export_state_dict", "summary_line"]

RUN_FILES = (LAST, PREVIOUS, "steps.csv", "epochs.csv", "metrics.json", "curves.png", "tensorboard")


def _writable_dir(directory: str, option: str) -> None:
    """Create ``directory`` if needed and write (then remove) a file in it; ValueError naming
    ``option`` when either fails."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option}: cannot create directory {directory!r} ({e.strerror or e})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{option}: cannot write in {directory!r} ({e.strerror or e})") from None


def check_output_dir(out: str, *, resume: bool, overwrite: bool) -> None:
    """Before any work: ``out`` can be created and written, and holds no other run unless
    ``resume`` (continue it) or ``overwrite`` (replace it, see :func:`clear_run`)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output-dir: {out!r} is a file, not a directory")
    existing = [f for f in RUN_FILES if os.path.lexists(os.path.join(out, f))]
    if existing and not (resume or overwrite):
        raise ValueError(f"--output-dir: {out!r} holds another run ({', '.join(existing)}); pass --overwrite to "
                         "replace it, --resume to continue it, or choose another --output-dir")
    _writable_dir(out, "--output-dir")


def check_export_path(path: str) -> None:
    """Before any work: the folder of ``--export`` can be written and ``path`` is not a folder."""
    if os.path.isdir(path):
        raise ValueError(f"--export: {path!r} is a directory; give a file name such as encoder.pt")
    _writable_dir(os.path.dirname(os.path.abspath(path)), "--export")


def clear_run(out: str) -> List[str]:
    """Delete the files of the run in ``out`` (for ``--overwrite``); returns their names."""
    removed = []
    for f in RUN_FILES:
        p = os.path.join(out, f)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)
        else:
            continue
        removed.append(f)
    return removed


def _csv_text(rows: List[Dict[str, Any]]) -> str:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def write_metrics(out: str, history: Dict[str, Any], summary: Dict[str, Any]) -> None:
    _write_text(os.path.join(out, "steps.csv"), _csv_text(history["steps"]))
    _write_text(os.path.join(out, "epochs.csv"), _csv_text(history["epochs"]))
    _write_text(os.path.join(out, "metrics.json"),
                json.dumps({"summary": summary, "epochs": history["epochs"], "steps": history["steps"]},
                           indent=1, default=float))


def plot_curves(path: str, history: Dict[str, Any], baseline: Dict[str, float]) -> None:
    """curves.png: the training loss, the temperature (only when it changed during the run: a
    fixed one is stated in the loss panel's title instead) and the evaluation accuracies."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = history["steps"]
    taus = [r["temperature"] for r in steps]
    varies = len(set(taus)) > 1
    fig, ax = plt.subplots(1, 3 if varies else 2, figsize=(15 if varies else 10, 4))
    loss_ax, eval_ax = ax[0], ax[-1]
    if steps:
        s = [r["step"] for r in steps]
        loss = np.array([r["loss"] for r in steps])
        loss_ax.plot(s, loss, lw=0.6, alpha=0.5, label="step")
        w = max(1, len(loss) // 50)
        if w > 1:
            sm = np.convolve(loss, np.ones(w) / w, mode="valid")
            loss_ax.plot(s[w - 1:], sm, lw=1.5, label=f"mean of {w}")
    if varies:
        ax[1].plot(s, taus)
        ax[1].set(title="temperature", xlabel="step")
    loss_ax.set(title="training loss" + (f" (temperature {taus[0]:.4g})" if taus and not varies else ""),
                xlabel="step")
    loss_ax.legend()
    ev = [r for r in history["epochs"] if "knn" in r]
    keys = [kk for kk in baseline if kk == "knn" or kk.startswith("linear")]
    for key in keys:
        name = {"knn": "kNN", "linear": "linear probe"}.get(key, key.replace("_", " "))
        pts = [(r["epoch"], r[key]) for r in ev if key in r]
        if pts:
            line, = eval_ax.plot(*zip(*pts), marker="o", label=f"{name}")
            if key in baseline:
                eval_ax.axhline(baseline[key], ls="--", color=line.get_color(), label=f"{name}, random init")
    eval_ax.set(title="evaluation accuracy (test split)", xlabel="epoch")
    eval_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_state_dict(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Write a state_dict (tensors only: ``torch.load(path)`` reads it with ``weights_only=True``)."""
    atomic_write(path, lambda f: torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, f))


def summary_line(out: str, plot: bool, export: Optional[str]) -> str:
    """The closing line of a run: where its files are."""
    files = f"steps.csv epochs.csv metrics.json{' curves.png' if plot else ''} {LAST}"
    return f"outputs in {out}: {files}" + (f"; encoder state_dict in {export}" if export else "")
