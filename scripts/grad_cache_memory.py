"""Peak memory and time of one SimCLR trainer step, plain against gradient caching, on the CPU.

    python scripts/grad_cache_memory.py                      # batch 8,192, chunks of 512 images
    python scripts/grad_cache_memory.py --batch 512 --chunk 64 --repeats 1 --out quick.json  # quick

One step is the trainer's: two on-device augmentations of the batch, the forward of the trainer's
model (small CNN + projection head, width 32, digits images 8x8 repeated up to the batch), NT-Xent,
backward, AdamW step. "plain" is the trainer's plain step (one forward over the 2B views, one
backward); "cached" is its --grad-cache-chunk step (infonce_kernels.grad_cache.cached_step).

Each measurement runs in a fresh process: a warm-up step at the chunk size, then the peak resident
set size is reset (/proc/self/clear_refs) and ``peak_extra_bytes`` is the peak resident size during
the first full-size step minus the resident size just before it (the model, optimiser state and
the images already allocated). Times are the median and the minimum over --repeats steps, both
wall-clock (``seconds_*``) and the process's CPU time (``cpu_seconds_*``: on a shared machine the
wall clock measures the other users' load as much as the step; with --threads 1, the default, the
CPU time is the step's own work).
Then each mode runs once more under the same address-space limit (RLIMIT_AS: the address space
before the step plus --limit-factor x the cached step's peak): the plain step fails there, the
cached one trains. Writes one JSON file (--out) with the machine, the command and every figure.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.worker import _status_kib as status_kib  # noqa: E402  (a /proc/self/status field in KiB)

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "cpu_grad_cache_smallcnn.json")


def worker(a) -> dict:
    """One mode in this (fresh) process: the figures of one measured step, as a dict."""
    import torch

    from infonce_kernels.train.augment import build_augmentation
    from infonce_kernels.train.data import load_dataset
    from infonce_kernels.train.losses import get_loss
    from infonce_kernels.train.models import SimCLRModel, build_encoder
    from infonce_kernels.train.optim import build_optimizer
    from infonce_kernels.train.trainer import _grad_cached_loss

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bundle = load_dataset("digits", None, seed=0, image_size=8)
    images = bundle.ssl_x.repeat(-(-a.batch // len(bundle.ssl_x)), 1, 1, 1)[:a.batch].contiguous()
    model = SimCLRModel(build_encoder("smallcnn", bundle.channels, 8, width=a.width), 4 * a.width, 128)
    augment = build_augmentation("digits", 8, bundle.channels, bundle.mean, bundle.std, 1.0)
    optimizer = build_optimizer("adamw", model, 1e-3, 1e-4)
    loss_fn = get_loss("nt_xent", "auto")
    model.train()

    def step(x):
        x1, x2 = augment(x), augment(x)
        pair_loss = lambda z1, z2: loss_fn(z1, z2, 0.1)  # noqa: E731
        if a.mode == "cached":
            optimizer.zero_grad(set_to_none=True)
            loss = _grad_cached_loss(model, x1, x2, pair_loss, a.chunk, None, torch.device("cpu"))
        else:
            loss = pair_loss(*model(torch.cat([x1, x2])).chunk(2))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        return float(loss)

    step(images[:a.chunk])  # warm-up: thread pool, optimiser state, kernels
    res = {"mode": a.mode, "threads": torch.get_num_threads()}
    if a.limit_bytes:
        limit = status_kib("VmSize") * 1024 + a.limit_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            res["loss"] = step(images)
            res["status"] = "trained"
        except (RuntimeError, MemoryError) as e:
            res["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return res
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = status_kib("VmRSS")
    seconds, cpu_seconds = [], []
    for i in range(a.repeats):
        t, c = time.perf_counter(), time.process_time()
        loss = step(images)
        seconds.append(time.perf_counter() - t)
        cpu_seconds.append(time.process_time() - c)
        if i == 0:
            res["peak_extra_bytes"] = (status_kib("VmHWM") - before) * 1024
    res.update(loss=loss, seconds_median=statistics.median(seconds), seconds_min=min(seconds), seconds=seconds,
               cpu_seconds_median=statistics.median(cpu_seconds), cpu_seconds_min=min(cpu_seconds),
               cpu_seconds=cpu_seconds)
    return res


def run_worker(a, mode, limit_bytes=0) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--batch", str(a.batch), "--chunk",
           str(a.chunk), "--width", str(a.width), "--repeats", str(a.repeats), "--threads", str(a.threads),
           "--limit-bytes", str(limit_bytes)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(res), flush=True)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8192, help="images per step (2x rows: two views)")
    p.add_argument("--chunk", type=int, default=512, help="images per chunk (--grad-cache-chunk)")
    p.add_argument("--width", type=int, default=32, help="small CNN width (the trainer's default)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per mode")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the measured processes")
    p.add_argument("--limit-factor", type=float, default=2.0,
                   help="the address-space limit: this many times the cached step's peak")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--worker", choices=("plain", "cached"), help=argparse.SUPPRESS)
    p.add_argument("--limit-bytes", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.mode = a.worker
        print(json.dumps(worker(a)))
        return
    for name in ("batch", "chunk", "width", "repeats", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    from benchmarks.machine import describe

    res = {"command": "python scripts/grad_cache_memory.py " + " ".join(sys.argv[1:]), "machine": describe("cpu"),
           "loadavg_before": open("/proc/loadavg").read().split()[:3],
           "config": {"batch": a.batch, "chunk": a.chunk, "width": a.width, "repeats": a.repeats,
                      "threads": a.threads, "model": "trainer SimCLRModel(smallcnn) on digits 8x8, AdamW, nt_xent tau 0.1"}}
    plain, cached = run_worker(a, "plain"), run_worker(a, "cached")
    res.update(plain=plain, cached=cached,
               memory_ratio=cached["peak_extra_bytes"] / plain["peak_extra_bytes"],
               time_ratio_median=cached["seconds_median"] / plain["seconds_median"],
               time_ratio_min=cached["seconds_min"] / plain["seconds_min"],
               cpu_time_ratio_median=cached["cpu_seconds_median"] / plain["cpu_seconds_median"],
               cpu_time_ratio_min=cached["cpu_seconds_min"] / plain["cpu_seconds_min"])
    limit = int(a.limit_factor * cached["peak_extra_bytes"])
    res["under_limit"] = {"limit_extra_bytes": limit, "plain": run_worker(a, "plain", limit)["status"],
                          "cached": run_worker(a, "cached", limit)["status"]}
    res["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: res[k] for k in ("memory_ratio", "time_ratio_median", "cpu_time_ratio_median", "under_limit")}))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
