"""Trainer configuration: one dataclass, dataset-dependent defaults, and validation.

Every check raises ``ValueError`` whose message starts with the command-line option at fault
(``--batch-size: ...``); the CLI turns it into an argparse error (exit status 2).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import infonce_kernels

from .data import DATASETS
from .models import ARCHS
from .optim import OPTIMIZERS
from .temperature import TEMPERATURE_MODES

__all__ = ["TrainConfig", "DATASET_DEFAULTS", "resolve", "option_name"]

BACKENDS = ("auto",) + tuple(infonce_kernels.BACKENDS)
PRECISIONS = ("auto", "fp32", "bf16")
STEMS = ("auto", "cifar", "imagenet")

# Values used when an option is left at None.  ``base_lr`` is the learning rate for a batch of 256
# (scaled linearly with --batch-size, as SimCLR does).  The digits recipe is tuned to finish in
# ~2-3 minutes on 2 CPU cores; the others follow SimCLR's CIFAR / STL recipes.
DATASET_DEFAULTS = {
    "digits": dict(arch="smallcnn", image_size=8, batch_size=256, epochs=60, optimizer="adamw", base_lr=2e-3,
                   weight_decay=1e-4, warmup_epochs=2, temperature=0.1, knn_k=20, eval_every=10, aug_strength=1.0, few_shot=5),
    "cifar10": dict(arch="resnet18", image_size=32, batch_size=512, epochs=200, optimizer="lars", base_lr=0.3,
                    weight_decay=1e-6, warmup_epochs=10, temperature=0.5, knn_k=200, eval_every=10, aug_strength=0.5, few_shot=0),
    "cifar100": dict(arch="resnet18", image_size=32, batch_size=512, epochs=200, optimizer="lars", base_lr=0.3,
                     weight_decay=1e-6, warmup_epochs=10, temperature=0.5, knn_k=200, eval_every=10, aug_strength=0.5, few_shot=0),
    "stl10": dict(arch="resnet18", image_size=96, batch_size=256, epochs=100, optimizer="lars", base_lr=0.3,
                  weight_decay=1e-6, warmup_epochs=10, temperature=0.5, knn_k=200, eval_every=10, aug_strength=1.0, few_shot=0),
    "imagefolder": dict(arch="resnet18", image_size=64, batch_size=256, epochs=100, optimizer="lars", base_lr=0.3,
                        weight_decay=1e-6, warmup_epochs=10, temperature=0.5, knn_k=200, eval_every=10,
                        aug_strength=1.0, few_shot=0),
}


@dataclass
class TrainConfig:
    # data
    dataset: str = "digits"
    data_dir: Optional[str] = None
    subset: Optional[int] = None  # keep at most this many images per split (quick runs, tests)
    image_size: Optional[int] = None  # side of the augmented crops (default: the dataset's)
    aug_strength: Optional[float] = None
    # model
    arch: Optional[str] = None
    stem: str = "auto"
    width: int = 32  # smallcnn base width
    hidden_dim: Optional[int] = None  # projection-head hidden width (default: encoder width)
    proj_dim: int = 128
    # loss and temperature
    loss: str = "nt_xent"
    backend: str = "auto"
    temperature: Optional[float] = None
    temperature_mode: str = "fixed"
    tau_min: float = 0.05  # learnable: clamp (CLIP-like); log schedule: beta_max = 1 / tau_min
    anneal_t0: Optional[float] = None  # log schedule time constant in steps (default: one epoch)
    # optimisation
    optimizer: Optional[str] = None
    lr: Optional[float] = None  # absolute; default base_lr * batch_size / 256
    weight_decay: Optional[float] = None
    momentum: float = 0.9
    epochs: Optional[int] = None
    warmup_epochs: Optional[float] = None
    batch_size: Optional[int] = None  # global batch (split across DDP ranks)
    # execution
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    sync_bn: Optional[bool] = None  # default: on under DDP
    grad_cache_chunk: Optional[int] = None  # gradient caching: images (both views) per chunk; None = off
    seed: int = 0
    # evaluation
    eval_every: Optional[int] = None  # epochs; 0 = only at the start (random init) and the end
    knn_k: Optional[int] = None
    probe: bool = True
    probe_max_train: Optional[int] = 10000
    few_shot: Optional[int] = None  # also a linear probe on N labelled images per class (0 = off)
    # outputs
    output_dir: str = os.path.join("runs", "simclr")
    resume: Optional[str] = None  # path, or "auto" = <output_dir>/last.pt
    overwrite: bool = False  # replace a run already in output_dir (refused otherwise)
    export: Optional[str] = None  # write the trained encoder's state_dict there at the end
    progress: bool = True
    plot: bool = True
    stop_after_epochs: Optional[int] = None  # stop (checkpoint, exit) after this epoch as if interrupted
    stop_after_steps: Optional[int] = None  # same, after this global step (mid-epoch)
    # filled by resolve()
    steps_per_epoch: int = field(default=0, repr=False)


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"{option_name(name)}: {msg}")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Validate ``cfg`` and fill dataset defaults; returns a new config (cfg is not modified)."""
    if cfg.dataset not in DATASETS:
        raise _err("dataset", f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    d = DATASET_DEFAULTS[cfg.dataset]
    c = dataclasses.replace(cfg)
    if c.warmup_epochs is None and isinstance(c.epochs, int) and c.epochs > 0:
        # the dataset's warm-up, shortened to a tenth of the run for short runs
        c.warmup_epochs = min(d["warmup_epochs"], 0.1 * c.epochs)
    for k in ("arch", "image_size", "batch_size", "epochs", "optimizer", "weight_decay", "warmup_epochs",
              "temperature", "knn_k", "eval_every", "aug_strength", "few_shot"):
        if getattr(c, k) is None:
            setattr(c, k, d[k])
    if c.lr is None:
        c.lr = d["base_lr"] * c.batch_size / 256
    if c.anneal_t0 is None:
        c.anneal_t0 = -1.0  # placeholder: one epoch of steps, set by the trainer once the data is known

    choices = dict(arch=ARCHS, optimizer=OPTIMIZERS, temperature_mode=TEMPERATURE_MODES, backend=BACKENDS,
                   precision=PRECISIONS, stem=STEMS)
    for k, allowed in choices.items():
        if getattr(c, k) not in allowed:
            raise _err(k, f"invalid choice {getattr(c, k)!r}; choose one of {', '.join(allowed)}")
    if c.device != "auto" and not (c.device == "cpu" or c.device.startswith("cuda")):
        raise _err("device", f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {c.device!r}")

    def positive_int(name, allow_none=False, allow_zero=False):
        v = getattr(c, name)
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
            raise _err(name, f"must be an integer >= {0 if allow_zero else 1}, got {v!r}")

    def finite(name, lo=None, lo_open=True, hi=None):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _err(name, f"must be a finite number, got {v!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise _err(name, f"must be {'>' if lo_open else '>='} {lo}, got {v!r}")
        if hi is not None and v > hi:
            raise _err(name, f"must be <= {hi}, got {v!r}")

    for k in ("batch_size", "epochs", "image_size", "width", "proj_dim", "knn_k"):
        positive_int(k)
    for k in ("hidden_dim", "subset", "probe_max_train", "stop_after_epochs", "stop_after_steps"):
        positive_int(k, allow_none=True)
    positive_int("eval_every", allow_zero=True)
    positive_int("grad_cache_chunk", allow_none=True)
    positive_int("few_shot", allow_zero=True)
    if c.batch_size < 2:
        raise _err("batch_size", f"must be >= 2 (a contrastive batch needs negatives), got {c.batch_size}")
    finite("lr", 0.0, lo_open=False)
    finite("weight_decay", 0.0, lo_open=False)
    finite("momentum", 0.0, lo_open=False, hi=1.0)
    finite("warmup_epochs", 0.0, lo_open=False)
    if c.warmup_epochs > c.epochs:
        raise _err("warmup_epochs", f"{c.warmup_epochs} is longer than --epochs {c.epochs}")
    finite("temperature", 0.0)
    finite("tau_min", 0.0)
    finite("aug_strength", 0.0, lo_open=False)
    if c.temperature_mode != "fixed" and c.tau_min > c.temperature:
        raise _err("tau_min", f"{c.tau_min} is above --temperature {c.temperature}")
    if c.anneal_t0 != -1.0:
        finite("anneal_t0", 0.0)
    if c.dataset == "digits" and c.data_dir is not None:
        raise _err("data_dir", "not used by --dataset digits (bundled with scikit-learn)")
    if c.dataset != "digits" and c.data_dir is None:
        raise _err("data_dir", f"required for --dataset {c.dataset}")
    if c.overwrite and c.resume:
        raise _err("overwrite", "cannot be combined with --resume (which continues the run in --output-dir)")
    if c.stop_after_epochs is not None and c.stop_after_epochs > c.epochs:
        raise _err("stop_after_epochs", f"{c.stop_after_epochs} is beyond --epochs {c.epochs}")
    if c.hidden_dim is None:
        c.hidden_dim = 0  # 0 = the encoder's output width (set when the model is built)
    return c
