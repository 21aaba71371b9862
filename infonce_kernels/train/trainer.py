"""The SimCLR reference training loop.

``train(config)`` runs self-supervised training with a loss of :mod:`infonce_kernels`, evaluates the
frozen encoder (kNN + linear probe) before training (the random-initialisation baseline, same seed
and architecture) and during/after it, writes metrics (CSV, JSON, optional TensorBoard), a PNG plot,
and verified atomic checkpoints (:mod:`.checkpoint`); ``resume`` continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from infonce_kernels.temperature import LearnableTemperature

from .augment import build_augmentation, build_eval_transform
from .checkpoint import LAST, CheckpointError, load_checkpoint, numpy_rng_state, save_checkpoint, set_numpy_rng_state
from .config import TrainConfig, resolve
from .data import load_dataset
from .evaluate import evaluate_encoder
from .extras import require_train_extra
from .losses import get_loss, loss_gathers, loss_needs_labels
from .models import SimCLRModel, build_encoder
from .optim import build_optimizer, warmup_cosine
from .outputs import (check_export_path, check_output_dir, clear_run, export_state_dict, plot_curves, summary_line,
                      write_metrics)
from .temperature import build_temperature

__all__ = ["train", "TrainingInterrupted"]


class _Stop(Exception):
    """Internal: stop cleanly (first Ctrl-C, --stop-after-*)."""


class TrainingInterrupted(Exception):
    """Raised by :func:`train` after an interrupt (Ctrl-C / --stop-after-*) once the checkpoint is written;
    ``requested`` is True for a stop asked by ``--stop-after-*`` (the command then exits 0, 130 after Ctrl-C)."""

    def __init__(self, checkpoint: str, summary: Dict[str, Any], requested: bool = False):
        super().__init__(f"training {'stopped as asked' if requested else 'interrupted'}; checkpoint written to "
                         f"{checkpoint}")
        self.checkpoint, self.summary, self.requested = checkpoint, summary, requested


# ----------------------------------------------------------------------------------------------
# distributed helpers


class Dist:
    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1

    def init(self, device_type: str):
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
        return self

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any_flag(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a tensor (itself with one process)."""
        if not self.enabled:
            return t
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t / self.world_size

    def gather_objects(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()


def _gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    # for the losses that do not gather themselves: an all_gather whose backward sums the gradients
    # back to their owners (reduce-scatter); every rank then computes the same global loss and DDP's
    # gradient averaging recovers the exact gradient.
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still correct
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(t))


def _grad_cached_loss(fwd, x1: torch.Tensor, x2: torch.Tensor, pair_loss, chunk: int,
                      amp_dtype: Optional[torch.dtype], device: torch.device) -> torch.Tensor:
    """--grad-cache-chunk: forward and backward of ``pair_loss(z1, z2)`` over the two views (B, ...)
    with the activations of ``chunk`` images at a time (:func:`infonce_kernels.grad_cache.cached_step`);
    returns the detached loss, the gradients accumulated in ``.grad``."""
    from ..grad_cache import cached_step

    b = x1.shape[0]
    # rows interleaved (image 0 view 1, image 0 view 2, image 1 view 1, ...): each chunk holds both
    # views of its images, as the plain step's BatchNorm batch holds both views of the batch
    x = torch.stack([x1, x2], 1).flatten(0, 1)

    def loss(z: torch.Tensor) -> torch.Tensor:
        z = z.view(b, 2, -1)
        with torch.autocast(device.type, enabled=False):  # the loss outside autocast, as in the plain step
            return pair_loss(z[:, 0], z[:, 1])

    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        return cached_step(fwd, x, loss, 2 * chunk).loss


# ----------------------------------------------------------------------------------------------
# RNG state


def _rng_state(device: torch.device) -> Dict[str, Any]:
    s = {"python": random.getstate(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def _set_rng_state(s: Dict[str, Any], device: torch.device) -> None:
    random.setstate(s["python"])
    set_numpy_rng_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: a function of (seed, epoch) only, so resuming reproduces it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


# ----------------------------------------------------------------------------------------------
# outputs


class _Tensorboard:
    def __init__(self, out: str, enabled: bool):
        self.w = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.w = SummaryWriter(os.path.join(out, "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.w = None

    def scalars(self, prefix: str, row: Dict[str, Any], step: int):
        if self.w is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.w.add_scalar(f"{prefix}/{k}", v, step)

    def close(self):
        if self.w is not None:
            self.w.close()


# ----------------------------------------------------------------------------------------------
# main entry


def _pick_device(cfg: TrainConfig, dist: Dist) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device: CUDA was requested but torch.cuda.is_available() is False")
        if dist.enabled and dev.index is None:
            dev = torch.device("cuda", dist.local_rank)
    return dev


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.precision == "bf16":
        return torch.bfloat16
    if cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _format_table(baseline: Dict[str, float], final: Dict[str, float], k: int, n_test: int) -> str:
    lines = [f"Final evaluation on frozen encoder features ({n_test} test images):",
             f"  {'metric':<26}{'random init':>12}{'trained':>10}{'gain':>9}"]
    names = [("knn", f"kNN (cosine, k={k})"), ("linear", "linear probe")]
    names += [(kk, f"linear, {kk.split('_')[1][:-4]} labels/class") for kk in final if kk.startswith("linear_")]
    for key, name in names:
        if key in final and key in baseline:
            lines.append(f"  {name:<26}{100 * baseline[key]:>11.1f}%{100 * final[key]:>9.1f}%"
                         f"{100 * (final[key] - baseline[key]):>+8.1f}")
    return "\n".join(lines)


def _preflight(cfg: TrainConfig, dist: Dist) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The checks made before any work: the output directory (writable, no other run in it unless
    --overwrite or --resume) and --export's folder on rank 0, then the checkpoint to resume, read and
    verified. Returns (path, checkpoint) or None."""
    problem: Optional[ValueError] = None
    if dist.main:
        try:
            check_output_dir(cfg.output_dir, resume=bool(cfg.resume), overwrite=cfg.overwrite)
            if cfg.export:
                check_export_path(cfg.export)
        except ValueError as e:
            problem = e
    if dist.any_flag(problem is not None):
        raise problem or ValueError("--output-dir: refused by rank 0 (see its message)")
    if not cfg.resume:
        return None
    path = os.path.join(cfg.output_dir, LAST) if cfg.resume == "auto" else cfg.resume
    if not os.path.isfile(path):
        raise ValueError(f"--resume: no checkpoint at {path!r}")
    try:
        return path, load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"--resume: {e}") from None


def train(config: TrainConfig, *, log=print) -> Dict[str, Any]:
    """Run (or resume) training; returns the summary dict also written to metrics.json."""
    t_start = time.time()
    cfg = resolve(config)
    require_train_extra(plot=cfg.plot)
    dist = Dist()
    device = _pick_device(cfg, dist)
    dist.init(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.main:
        log = lambda *a, **k: None  # noqa: E731
    loss_fn = get_loss(cfg.loss, cfg.backend)  # clear error for an unknown/unavailable loss, before any work
    amp_dtype = _autocast_dtype(cfg, device)
    out = cfg.output_dir
    resume = _preflight(cfg, dist)

    # ---- data
    bundle = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, image_size=cfg.image_size).subset(cfg.subset, cfg.seed)
    n = len(bundle.ssl_x)
    if cfg.batch_size > n:
        raise ValueError(f"--batch-size: {cfg.batch_size} is larger than the {n} training images")
    if cfg.batch_size % dist.world_size:
        raise ValueError(f"--batch-size: {cfg.batch_size} is not divisible by WORLD_SIZE={dist.world_size}")
    if loss_needs_labels(cfg.loss) and bool((bundle.ssl_y < 0).any()):
        raise ValueError(f"--loss {cfg.loss} needs labels, but {cfg.dataset} training images include unlabelled ones")
    steps_per_epoch = n // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    cfg.steps_per_epoch = steps_per_epoch
    if cfg.anneal_t0 == -1.0:
        cfg.anneal_t0 = float(steps_per_epoch)

    # ---- model, temperature, optimiser (random init fixed by the seed)
    _seed_all(cfg.seed)
    encoder = build_encoder(cfg.arch, bundle.channels, cfg.image_size, cfg.stem, cfg.width)
    model = SimCLRModel(encoder, cfg.hidden_dim or encoder.out_dim, cfg.proj_dim)
    sync_bn = (dist.enabled and device.type == "cuda") if cfg.sync_bn is None else cfg.sync_bn
    if sync_bn and dist.enabled and device.type != "cuda":
        raise ValueError("--sync-bn: SyncBatchNorm needs CUDA devices; use --no-sync-bn on the CPU")
    if sync_bn and dist.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        encoder = model.encoder
    model.to(device)
    temperature = build_temperature(cfg.temperature_mode, cfg.temperature, tau_min=cfg.tau_min, t0=cfg.anneal_t0,
                                    total_steps=total_steps)
    learnable = isinstance(temperature, LearnableTemperature)  # else a schedule, stepped with the optimiser
    params = nn.ModuleDict({"model": model, "temperature": temperature.to(device)} if learnable else {"model": model})
    optimizer = build_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay, cfg.momentum)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))
    train_model: nn.Module = model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(train_model) if cfg.compile else train_model
    augment = build_augmentation(cfg.dataset, cfg.image_size, bundle.channels, bundle.mean, bundle.std,
                                 cfg.aug_strength).to(device)
    eval_tf = build_eval_transform(cfg.image_size, bundle.mean, bundle.std).to(device)
    k = min(cfg.knn_k, len(bundle.train_y))

    def evaluate() -> Dict[str, float]:
        if not dist.main:
            return {}
        return evaluate_encoder(encoder, bundle, eval_tf, device, k=k, seed=cfg.seed, probe=cfg.probe,
                                probe_max_train=cfg.probe_max_train, few_shot=cfg.few_shot if cfg.probe else 0,
                                autocast_dtype=amp_dtype)

    # ---- state, resume
    history: Dict[str, Any] = {"steps": [], "epochs": []}
    baseline: Dict[str, float] = {}
    epoch, step_in_epoch, global_step = 0, 0, 0
    config_echo = {k: v for k, v in dataclasses.asdict(cfg).items()}
    log("infonce-train configuration:")
    log(json.dumps(config_echo, indent=1, default=str))
    log(f"data: {bundle.summary()}; {steps_per_epoch} steps/epoch; device {device}"
        f"{' bf16 autocast' if amp_dtype else ''}; world size {dist.world_size}; loss {cfg.loss} (backend {cfg.backend})")
    if cfg.grad_cache_chunk:
        per_rank = cfg.batch_size // dist.world_size
        log(f"batch {cfg.batch_size} (gradient caching: {-(-per_rank // cfg.grad_cache_chunk)} chunks of "
            f"<= {min(cfg.grad_cache_chunk, per_rank)} images{' per rank' if dist.enabled else ''}, both views each)")

    if resume:
        resume_path, ck = resume
        changed = [key for key in ("dataset", "arch", "loss", "seed", "batch_size", "epochs", "optimizer", "lr",
                                   "temperature", "temperature_mode", "subset", "image_size", "width", "proj_dim")
                   if ck["config"].get(key) != config_echo.get(key)]
        if changed:
            log(f"warning: resuming with changed options {changed}; the run will not match an uninterrupted one")
        try:
            model.load_state_dict(ck["model"])
            temperature.load_state_dict(ck["temperature"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"--resume: {resume_path} does not fit these options"
                                  f"{' (changed: ' + ', '.join(changed) + ')' if changed else ''}: {why}") from None
        epoch, step_in_epoch, global_step = ck["epoch"], ck["step_in_epoch"], ck["global_step"]
        history, baseline = ck["history"], ck["baseline"]
        rngs = ck["rng"]
        _set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0], device)
        log(f"resumed from {resume_path}: epoch {epoch}, step {global_step}")
    else:
        baseline = evaluate()
        if baseline:
            history["epochs"].append(dict(epoch=0, step=0, **baseline))
            log("random-init encoder: " + ", ".join(f"{kk} {100 * v:.1f}%" for kk, v in baseline.items()))
        # augmentation randomness starts from the seed (+ rank so ranks draw different crops)
        _seed_all(cfg.seed + 1 + dist.rank)
        if cfg.overwrite and dist.main:
            removed = clear_run(out)
            if removed:
                log(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}")

    saved_at = {"step": None}  # the global step of the last checkpoint written by this process

    def checkpoint() -> str:
        path = os.path.join(out, LAST)
        if saved_at["step"] == global_step:  # already written here: keep previous.pt one checkpoint back
            return path
        saved_at["step"] = global_step
        rngs = dist.gather_objects(_rng_state(device))
        if dist.main:
            save_checkpoint(dict(config=config_echo, model=model.state_dict(), temperature=temperature.state_dict(),
                                 optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=epoch,
                                 step_in_epoch=step_in_epoch, global_step=global_step, history=history,
                                 baseline=baseline, rng=rngs), path)
        dist.barrier()
        return path

    def summary(final: Dict[str, float]) -> Dict[str, Any]:
        return dict(dataset=cfg.dataset, arch=cfg.arch, loss=cfg.loss, epochs_done=epoch, global_step=global_step,
                    knn_k=k, n_test=len(bundle.test_y), random_init=baseline, trained=final,
                    wall_time_s=time.time() - t_start, output_dir=out)

    # ---- Ctrl-C: finish the current step, checkpoint, exit; a second Ctrl-C aborts at once.
    # "asked": --stop-after-* was reached (the same on every rank)
    stop = {"signal": False, "asked": False}
    prev_handler = None

    def on_sigint(signum, frame):
        if stop["signal"]:
            raise KeyboardInterrupt
        stop["signal"] = True
        log("\ninterrupt: finishing the current step and writing a checkpoint (Ctrl-C again to abort)",
            file=sys.stderr)

    try:
        prev_handler = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        prev_handler = None

    tb = _Tensorboard(out, dist.main)
    labels_needed, gathering_loss = loss_needs_labels(cfg.loss), loss_gathers(cfg.loss)
    try:
        from tqdm.auto import tqdm

        model.train()
        while epoch < cfg.epochs:
            perm = epoch_permutation(n, cfg.seed, epoch)
            bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}"
                       + (f" batch {cfg.batch_size} (grad cache)" if cfg.grad_cache_chunk else ""),
                       disable=not (cfg.progress and dist.main), dynamic_ncols=True, leave=True)
            losses_epoch = [r["loss"] for r in history["steps"] if r["epoch"] == epoch + 1]
            t_epoch = time.time()
            while step_in_epoch < steps_per_epoch:
                t0 = time.time()
                idx = perm[step_in_epoch * cfg.batch_size:(step_in_epoch + 1) * cfg.batch_size]
                idx = idx[dist.rank::dist.world_size]
                x = bundle.ssl_x[idx].to(device, non_blocking=True)
                x1, x2 = augment(x), augment(x)
                tau = temperature() if learnable else temperature.temperature
                y = bundle.ssl_y[idx].to(device) if labels_needed else None

                def pair_loss(z1, z2):
                    y_all = y
                    if dist.enabled and not gathering_loss:
                        z1, z2 = _gather_with_grad(z1), _gather_with_grad(z2)
                        if y is not None:
                            y_all = _gather_with_grad(y)
                    return loss_fn(z1, z2, tau, y_all, gather_distributed=dist.enabled and gathering_loss)

                if cfg.grad_cache_chunk:  # forward and backward here, chunk by chunk
                    optimizer.zero_grad(set_to_none=True)
                    loss = _grad_cached_loss(fwd, x1, x2, pair_loss, cfg.grad_cache_chunk, amp_dtype, device)
                else:
                    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                        z = fwd(torch.cat([x1, x2]))
                    loss = pair_loss(*z.chunk(2))
                batch_loss = dist.mean(loss.detach())  # every rank's loss; their mean is the batch's
                if not torch.isfinite(batch_loss):
                    raise FloatingPointError(f"loss is {batch_loss.item()} at step {global_step}; "
                                             "lower --lr or raise --temperature")
                if not cfg.grad_cache_chunk:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                if dist.enabled and learnable and temperature.log_scale.grad is not None:
                    torch.distributed.all_reduce(temperature.log_scale.grad)
                    temperature.log_scale.grad /= dist.world_size
                optimizer.step()
                scheduler.step()
                if learnable:
                    temperature.clamp_()
                else:
                    temperature.step()
                step_in_epoch += 1
                global_step += 1
                dt = time.time() - t0
                row = dict(step=global_step, epoch=epoch + 1, loss=float(batch_loss),
                           temperature=float(tau.detach()) if learnable else tau, lr=optimizer.param_groups[0]["lr"],
                           samples_per_s=cfg.batch_size / max(dt, 1e-9))
                history["steps"].append(row)
                losses_epoch.append(row["loss"])
                tb.scalars("step", row, global_step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tau=f"{row['temperature']:.3f}",
                                samples_s=f"{row['samples_per_s']:.0f}")
                bar.update(1)
                if cfg.stop_after_steps is not None and global_step >= cfg.stop_after_steps:
                    stop["asked"] = True
                if dist.any_flag(stop["signal"] or stop["asked"]):
                    break
            bar.close()
            if step_in_epoch < steps_per_epoch:  # interrupted mid-epoch
                raise _Stop
            epoch += 1
            step_in_epoch = 0
            erow = dict(epoch=epoch, step=global_step, loss=float(np.mean(losses_epoch)) if losses_epoch else float("nan"),
                        temperature=temperature.value, lr=optimizer.param_groups[0]["lr"],
                        epoch_time_s=time.time() - t_epoch)
            if epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0):
                erow.update(evaluate())
            history["epochs"].append(erow)
            tb.scalars("epoch", erow, epoch)
            log(f"epoch {epoch}/{cfg.epochs}: loss {erow['loss']:.4f}, tau {erow['temperature']:.3f}"
                + "".join(f", {kk} {100 * v:.1f}%" for kk, v in erow.items() if kk == "knn" or kk.startswith("linear")))
            checkpoint()
            if dist.main:
                write_metrics(out, history, summary({}))
            if cfg.stop_after_epochs is not None and cfg.stop_after_epochs <= epoch:
                stop["asked"] = True
            if dist.any_flag(stop["signal"] or stop["asked"]) and epoch < cfg.epochs:
                raise _Stop
    except _Stop:
        path = checkpoint()
        s = summary({})
        if dist.main:
            write_metrics(out, history, s)
        requested = not dist.any_flag(stop["signal"])
        how = ("stopped as asked by --stop-after-" + ("steps" if cfg.stop_after_steps is not None else "epochs")
               if requested else "interrupted")
        log(f"{how} at epoch {epoch} step {global_step}; checkpoint {path}; continue with --resume")
        raise TrainingInterrupted(path, s, requested=requested) from None
    finally:
        tb.close()
        if prev_handler is not None:
            signal.signal(signal.SIGINT, prev_handler)

    final = {kk: v for kk, v in history["epochs"][-1].items() if kk == "knn" or kk.startswith("linear")}
    s = summary(final)
    if dist.main:
        write_metrics(out, history, s)
        if cfg.plot:
            plot_curves(os.path.join(out, "curves.png"), history, baseline)
        if cfg.export:
            export_state_dict(encoder.state_dict(), cfg.export)
        log(_format_table(baseline, final, k, len(bundle.test_y)))
        log(f"{summary_line(out, cfg.plot, cfg.export)}; wall time {s['wall_time_s']:.1f} s")
    return s
