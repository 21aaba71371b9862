"""The reference trainer on a GPU: accuracy and samples/s with the fused loss against the
materialising reference, and the largest batch each fits.

    python3 scripts/gpu_train_bench.py --out DIR              # a CUDA machine (kornia importable)
    python3 scripts/gpu_train_bench.py --device cpu --quick   # the same code path on the CPU, tiny

1. digits, the default recipe (300 steps of batch 256), with bf16 autocast and the fused backend:
   the kNN / linear-probe accuracies beside the random encoder, and samples/s;
2. a synthetic ImageFolder (class-dependent colour textures, 32 px PNGs written to a temporary
   folder; no dataset is downloaded) at a global batch of --batch (4,096), ResNet-18 with the CIFAR
   stem (the small CNN with --quick), bf16: median samples/s over --steps steps for the fused loss
   and for the reference;
3. the largest batch that trains, per backend: doubling from --batch up to --max-batch with the
   small CNN (so that the loss, not the encoder, sets the limit), a few steps each, until the
   device runs out of memory;
4. the largest SimCLR batch of ResNet-18 at 32x32 (CIFAR stem, fused loss) that trains on the one
   device, plain and with gradient caching (--grad-cache-chunk, chunks of --chunk images): the
   same doubling search (the small CNN with --quick).

--sections picks some of them (e.g. ``--sections grad_cache`` runs section 4 only, as
scripts/gpu_check's gradcache step does).

Writes DIR/gpu_train_bench.json: the machine (device, torch/triton/CUDA versions, commit; set
INFONCE_COMMIT where the tree has no .git) and every figure. samples/s is the trainer's own
per-step figure (global batch / step wall time), median over the steps after the first five.
On the device machines kornia is not installed: carry its wheels (kornia, kornia_rs).
"""

import argparse
import csv
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.machine import describe  # noqa: E402
from infonce_kernels.train import TrainConfig, TrainingInterrupted, train  # noqa: E402

WARMUP_STEPS = 5


def write_imagefolder(root: str, images: int, classes: int = 16, size: int = 32, seed: int = 0) -> str:
    """root/{train,test}/<class>/<i>.png: each class a colour and a stripe frequency, with noise,
    so that augmented views of one image resemble each other more than other classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(classes, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    for split, count in (("train", images), ("test", max(classes * 4, images // 8))):
        for i in range(count):
            c = i % classes
            folder = os.path.join(root, split, f"class{c:02d}")
            os.makedirs(folder, exist_ok=True)
            phase = rng.uniform(0, 2 * np.pi)
            stripes = np.sin((xx * np.cos(c) + yy * np.sin(c)) * (0.3 + 0.05 * c) + phase)[..., None]
            img = colours[c] + 35 * stripes + rng.normal(0, 20, size=(size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return root


def run(cfg: TrainConfig, steps=None):
    """Train; returns the summary (or None when stopped after ``steps``), the per-step samples/s
    and the peak memory allocated on a CUDA device (bytes)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    summary = None
    try:
        summary = train(cfg if steps is None else dataclasses.replace(cfg, stop_after_steps=steps),
                        log=lambda *a, **k: None)
    except TrainingInterrupted:
        pass
    with open(os.path.join(cfg.output_dir, "steps.csv")) as f:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(f)]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return summary, rates, peak


def out_of_memory(error: BaseException) -> bool:
    """torch's OOM, or a library's allocation failure at the memory limit (cuBLAS, cuDNN)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in ("out of memory", "ALLOC_FAILED")))


def median_rate(rates):
    steady = rates[WARMUP_STEPS:] or rates
    return statistics.median(steady)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--fused", default=None, help="the fused backend (default: triton on CUDA, cpu on the CPU)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--max-batch", type=int, default=65536)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--chunk", type=int, default=512, help="section 4: images per gradient-caching chunk")
    p.add_argument("--sections", default="digits,imagefolder,largest_batch,grad_cache",
                   help="comma-separated sections to run (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the code path")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_train_bench_out"))
    a = p.parse_args()
    if a.quick:
        a.batch, a.max_batch, a.steps, a.chunk = 16, 32, 6, 8
    sections = set(a.sections.split(","))
    unknown = sections - {"digits", "imagefolder", "largest_batch", "grad_cache"}
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}")
    cuda = a.device.startswith("cuda")
    fused = a.fused or ("triton" if cuda else "cpu")
    precision = "bf16" if cuda else "fp32"
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu_train_bench_")
    res = {"machine": describe(a.device), "args": vars(a), "fused_backend": fused, "precision": precision}

    # 1. digits, the default recipe
    if "digits" in sections:
        t = time.time()
        digits = TrainConfig(device=a.device, backend=fused, precision=precision, progress=False, plot=False,
                             output_dir=os.path.join(work, "digits"),
                             **({"epochs": 1, "subset": 512, "few_shot": 0} if a.quick else {}))
        summary, rates, peak = run(digits)
        res["digits"] = {"random_init": summary["random_init"], "trained": summary["trained"],
                         "samples_per_s": median_rate(rates), "steps": len(rates), "wall_s": time.time() - t,
                         "peak_allocated_bytes": peak}
        print("digits", json.dumps(res["digits"]), flush=True)

    # 2. synthetic ImageFolder at --batch: fused vs reference
    images = max(a.max_batch, a.batch)
    t = time.time()
    root = write_imagefolder(os.path.join(work, "folder"), images)
    res["imagefolder"] = {"images": images, "write_s": time.time() - t, "batch": a.batch}
    steps_per_epoch = images // a.batch
    arch = "smallcnn" if a.quick else "resnet18"
    for backend in (fused, "reference") if "imagefolder" in sections else ():
        cfg = TrainConfig(dataset="imagefolder", data_dir=root, image_size=32, arch=arch, device=a.device,
                          backend=backend, precision=precision, batch_size=a.batch,
                          epochs=a.steps // steps_per_epoch + 1, eval_every=0, probe=False, few_shot=0,
                          progress=False, plot=False, output_dir=os.path.join(work, f"folder_{backend}"))
        try:
            _, rates, peak = run(cfg, steps=a.steps)
            res["imagefolder"][backend] = {"samples_per_s": median_rate(rates), "steps": len(rates),
                                           "peak_allocated_bytes": peak}
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            res["imagefolder"][backend] = {"status": "OOM"}
        print("imagefolder", backend, json.dumps(res["imagefolder"][backend]), flush=True)

    def largest_batch(name: str, **options):
        """Double the batch from --batch to --max-batch until a 3-step run runs out of memory."""
        tried = {}
        batch = a.batch
        while batch <= a.max_batch:
            cfg = TrainConfig(dataset="imagefolder", data_dir=root, image_size=32, device=a.device,
                              precision=precision, batch_size=batch, epochs=4, eval_every=0, probe=False,
                              few_shot=0, progress=False, plot=False,
                              output_dir=os.path.join(work, f"{name}_{batch}"), **options)
            try:
                _, rates, peak = run(cfg, steps=3)
                tried[batch] = {"samples_per_s": rates[-1], "peak_allocated_bytes": peak}
            except RuntimeError as e:
                if not out_of_memory(e):
                    raise
                tried[batch] = {"status": "OOM"}
                break
            batch *= 2
        fits = [b for b, r in tried.items() if "status" not in r]
        # "limit": whether the search hit the device's memory (else --max-batch capped it)
        return {"largest": max(fits) if fits else None,
                "limit": "out of memory" if len(fits) < len(tried) else "--max-batch", "tried": tried}

    # 3. the largest batch that trains, per backend (small CNN: the loss sets the limit)
    if "largest_batch" in sections:
        res["largest_batch"] = {}
        for backend in (fused, "reference"):
            res["largest_batch"][backend] = largest_batch(f"largest_{backend}", arch="smallcnn", backend=backend)
            print("largest batch", backend, res["largest_batch"][backend]["largest"], flush=True)

    # 4. the largest ResNet-18 batch, plain and with gradient caching (the encoder sets the limit)
    if "grad_cache" in sections:
        res["grad_cache"] = {"arch": arch, "backend": fused, "chunk": a.chunk}
        for mode, chunk in (("plain", None), ("grad_cache", a.chunk)):
            res["grad_cache"][mode] = largest_batch(f"grad_cache_{mode}", arch=arch, backend=fused,
                                                    grad_cache_chunk=chunk)
            print("largest batch", arch, mode, res["grad_cache"][mode]["largest"], flush=True)

    path = os.path.join(a.out, "gpu_train_bench.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
