"""SigLIP (pairwise sigmoid) GPU check: correctness against float64 on a small case, then the
headline case B = 65,536, d = 768, bf16, fwd+bwd: time and peak memory of each kernel backend
beside a materialising SigLIP loss (open_clip-style: bf16 B x B logits, autograd).

    python scripts/gpu_siglip.py --out OUT                          # on a GPU: both parts
    python scripts/gpu_siglip.py --out OUT --device cpu --rows 256  # the CPU dry run (CI)

Every result is appended to OUT/siglip.jsonl as soon as it exists (a run stopped by a timeout keeps
what it has). The backends are called through their backend functions (the contract of the
``_sigmoid_fwd`` / ``_sigmoid_bwd`` ops): ``infonce_kernels.triton.sigmoid_forward`` and the CUDA
extension's ``torch.ops.infonce_kernels._sigmoid_fwd``; a backend that cannot run here is recorded
with the reason. The timed call is ``sigmoid_forward(..., with_grad=True)``: the loss rows and every
gradient, what a training step with the mean reduction needs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

F64 = torch.float64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def emit(out: str, rec: dict) -> None:
    with open(os.path.join(out, "siglip.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def dense(x, y, t, b, labels, offset, dtype):
    """Materialised loss rows and gradients (unit upstream gradient) in ``dtype`` (float64: the oracle)."""
    acc = F64 if dtype == F64 else torch.float32
    xs, ys, ts, bs = (v.detach().to(w, copy=True).requires_grad_() for v, w in
                      ((x, dtype), (y, dtype), (t, acc), (b, acc)))
    M, N = x.shape[0], y.shape[0]
    if labels:
        pos = labels[0][:, None] == labels[1][None, :]
    else:
        pos = (torch.arange(N, device=x.device)[None, :] - torch.arange(M, device=x.device)[:, None]) == offset
    logits = (xs @ ys.T) * ts.to(dtype) + bs.to(dtype)
    rows = F.softplus(-torch.where(pos, 1.0, -1.0).to(dtype) * logits).to(acc).sum(1)
    rows.sum().backward()
    return [rows.detach(), xs.grad, ys.grad, ts.grad, bs.grad]


def backends(device: torch.device) -> dict:
    """name -> (fused call or None, why not)."""
    out = {}
    try:
        import infonce_kernels.triton as tb  # noqa: PLC0415
        ok, why = tb.available(device)
        out["triton"] = (tb.sigmoid_forward if ok else None, why)
    except Exception as e:  # noqa: BLE001
        out["triton"] = (None, f"{type(e).__name__}: {e}")
    try:
        import infonce_kernels  # noqa: F401, PLC0415  (loads the extension)
        op = torch.ops.infonce_kernels._sigmoid_fwd
        has_cuda = device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
        out["cuda"] = ((lambda *a: op(*a)) if has_cuda else None,
                       "the CUDA extension" if has_cuda else f"no CUDA kernel registered for {device.type} tensors")
    except Exception as e:  # noqa: BLE001
        out["cuda"] = (None, f"{type(e).__name__}: {e}")
    return out


def correctness(out: str, device: torch.device, dtypes, rows: int, d: int, names=("triton", "cuda")) -> int:
    """Each backend x dtype on a small rectangular case (odd sizes, d = 200 by default, labels off/on, offset),
    under the 2x same-precision rule. Returns the number of failures."""
    bad = 0
    gen = torch.Generator().manual_seed(0)
    M, N = rows + 45, rows + 2
    cases = [("offset_-3", (), -3), ("labels", (torch.randint(0, 7, (M,), generator=gen),
                                                 torch.randint(0, 7, (N,), generator=gen)), 0)]
    x0 = F.normalize(torch.randn(M, d, generator=gen, dtype=F64), dim=1)
    y0 = F.normalize(torch.randn(N, d, generator=gen, dtype=F64), dim=1)
    for name, (fn, why) in backends(device).items():
        if name not in names:
            continue
        for dt in dtypes:
            for case, lab, off in cases:
                rec = dict(part="correctness", backend=name, dtype=dt, case=case, M=M, N=N, d=d, device=str(device))
                if fn is None:
                    emit(out, dict(rec, status="unavailable", why=why))
                    continue
                dtype = DTYPES[dt]
                x, y = x0.to(device, dtype), y0.to(device, dtype)
                t = torch.tensor(10.0, device=device)
                b = torch.tensor(-10.0, device=device)
                labd = tuple(v.to(device) for v in lab)
                try:
                    t0 = time.time()
                    got = list(fn(x, y, t, b, labd, off, True))
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    first = time.time() - t0
                    ref = dense(x, y, t, b, labd, off, F64)
                    same = dense(x, y, t, b, labd, off, dtype)
                    errs = {}
                    for k, a, r, c in zip(("rows", "dx", "dy", "dscale", "dbias"), got, ref, same):
                        err = (a.double() - r.double()).abs().max().item()
                        base = (c.double() - r.double()).abs().max().item()
                        tol = 2 * base + 1e-6 * r.double().abs().max().item()
                        errs[k] = dict(err=err, plain_err=base, ok=math.isfinite(err) and err <= tol)
                    ok = all(v["ok"] for v in errs.values())
                    bad += not ok
                    emit(out, dict(rec, status="ok" if ok else "FAIL", first_call_s=round(first, 3), errors=errs))
                except Exception as e:  # noqa: BLE001
                    bad += 1
                    emit(out, dict(rec, status="ERROR", error=f"{type(e).__name__}: {e}"[:500]))
    return bad


def _time(fn, device, reps: int) -> float:
    """Median seconds of fn() (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(out: str, device: torch.device, rows: int, d: int, dt: str, reps: int) -> None:
    """fwd+bwd of the headline case: each backend's fused call, and the materialising loss."""
    dtype = DTYPES[dt]
    gen = torch.Generator(device=device).manual_seed(1)
    x = F.normalize(torch.randn(rows, d, device=device, generator=gen), dim=1).to(dtype)
    y = F.normalize(torch.randn(rows, d, device=device, generator=gen), dim=1).to(dtype)
    t = torch.tensor(10.0, device=device)
    b = torch.tensor(-10.0, device=device)
    emb = 2 * x.numel() * x.element_size()

    def materialised():
        xs, ys = x.detach().requires_grad_(), y.detach().requires_grad_()
        ts, bs = t.detach().requires_grad_(), b.detach().requires_grad_()
        logits = ts.to(dtype) * (xs @ ys.T) + bs.to(dtype)
        z = 2 * torch.eye(rows, device=device, dtype=dtype) - 1
        loss = -F.logsigmoid(z * logits).sum() / rows
        loss.backward()

    providers = {k: (lambda fn=fn: fn(x, y, t, b, (), 0, True)) if fn else None
                 for k, (fn, _) in backends(device).items()}
    providers["materialised:" + dt] = materialised
    whys = {k: why for k, (_, why) in backends(device).items()}
    for name, fn in providers.items():
        rec = dict(part="bench", provider=name, rows=rows, d=d, dtype=dt, device=str(device),
                   device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   embeddings_bytes=emb)
        if fn is None:
            emit(out, dict(rec, status="unavailable", why=whys.get(name)))
            continue
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            sec = _time(fn, device, reps)
            peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
            emit(out, dict(rec, status="ok", ms=round(sec * 1e3, 3), peak_extra_bytes=peak,
                           peak_extra_over_embeddings=round(peak / emb, 3) if peak is not None else None))
        except torch.cuda.OutOfMemoryError as e:
            emit(out, dict(rec, status="OOM", error=str(e)[:300]))
        except Exception as e:  # noqa: BLE001
            emit(out, dict(rec, status="ERROR", error=f"{type(e).__name__}: {e}"[:500]))
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", nargs="+", default=["correctness", "bench"], choices=["correctness", "bench"])
    p.add_argument("--correctness-backends", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"],
                   help="backends of the correctness part (the first-run check runs triton beside the build)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=list(DTYPES))
    p.add_argument("--small-rows", type=int, default=300, help="rows of the correctness case (plus 45 / 2)")
    p.add_argument("--small-dim", type=int, default=200, help="d of the correctness case")
    p.add_argument("--rows", type=int, default=65536, help="B of the benchmark")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--bench-dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    device = torch.device(a.device)
    bad = 0
    if "correctness" in a.parts:
        dts = a.dtypes if device.type == "cuda" else ["fp32"]
        bad += correctness(a.out, device, dts, a.small_rows, a.small_dim, a.correctness_backends)
    if "bench" in a.parts:
        bench(a.out, device, a.rows, a.dim, a.bench_dtype if device.type == "cuda" else "fp32", a.reps)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
