#!/usr/bin/env python
"""GPU benchmark of the fused LSE op and NT-Xent, forward+backward, per backend.

Backends: reference (materialising PyTorch), triton, and cuda when built.
Shapes: 2B in {8192, 65536} (override with --sizes), d = 128, bf16.
Timings: ``triton.testing.do_bench`` (median ms). Memory: peak
``torch.cuda.max_memory_allocated`` during one fwd+bwd minus what was
allocated before it (the inputs). Out-of-memory is recorded as such.

    python scripts/gpu_bench.py --out result.json [--sizes 8192,65536] [--dim 128]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _env() -> dict:
    import triton

    info = {
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    return info


def _cases(n: int, d: int, dtype, backend: str):
    """name -> (setup() -> inputs, run(inputs) -> None) for one fwd+bwd of each workload."""
    import infonce_kernels

    def lse_setup():
        z = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=1).to(dtype).requires_grad_()
        ex = torch.arange(n, device="cuda")[:, None]
        return z, ex

    def lse_run(inp):
        z, ex = inp
        r = infonce_kernels.lse(z, z, 10.0, exclude=ex, symmetric=True, backend=backend)
        r.mean().backward()
        z.grad = None

    def lse_fwd_run(inp):
        z, ex = inp
        with torch.no_grad():
            infonce_kernels.lse(z, z, 10.0, exclude=ex, symmetric=True, backend=backend)

    def ntx_setup():
        b = n // 2
        z1 = torch.randn(b, d, device="cuda", dtype=dtype, requires_grad=True)
        z2 = torch.randn(b, d, device="cuda", dtype=dtype, requires_grad=True)
        return z1, z2

    def ntx_run(inp):
        z1, z2 = inp
        loss = infonce_kernels.nt_xent(z1, z2, 0.1, backend=backend)
        loss.backward()
        z1.grad = z2.grad = None

    return {
        "lse_symmetric_fwd": (lse_setup, lse_fwd_run),
        "lse_symmetric_fwd_bwd": (lse_setup, lse_run),
        "nt_xent_fwd_bwd": (ntx_setup, ntx_run),
    }


def bench_one(setup, run, warmup_ms=25, rep_ms=200):
    from triton.testing import do_bench

    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    inp = setup()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(inp)                      # first call: compile + correctness of the launch
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(lambda: run(inp), warmup=warmup_ms, rep=rep_ms)
    del inp
    return {"ms": float(ms), "peak_extra_bytes": int(peak), "peak_extra_gib": peak / 2**30}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON output path (default: stdout only)")
    ap.add_argument("--sizes", default="8192,65536", help="comma-separated 2B values")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--backends", default="reference,triton,cuda")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 2
    import infonce_kernels

    dtype = getattr(torch, args.dtype)
    avail = infonce_kernels.available_backends("cuda")
    result = {"env": _env(), "dtype": args.dtype, "dim": args.dim, "available_backends": list(avail),
              "results": []}
    for n in [int(x) for x in args.sizes.split(",") if x]:
        for backend in args.backends.split(","):
            if backend not in avail:
                result["results"].append({"backend": backend, "n": n, "status": "unavailable"})
                continue
            for name, (setup, run) in _cases(n, args.dim, dtype, backend).items():
                row = {"backend": backend, "n": n, "d": args.dim, "workload": name}
                try:
                    row.update(bench_one(setup, run), status="ok")
                except torch.OutOfMemoryError as e:
                    row.update(status="oom", error=str(e).splitlines()[0])
                except Exception as e:  # record, keep going
                    row.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
                torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                result["results"].append(row)
    text = json.dumps(result, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
