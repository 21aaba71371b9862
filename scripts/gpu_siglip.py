"""SigLIP (pairwise sigmoid) GPU check: correctness against float64 on a small case, then the
headline case B = 65,536, d = 768, bf16, fwd+bwd: time and peak memory of each kernel backend
beside a materialising SigLIP loss (open_clip-style: bf16 B x B logits, autograd) and the fused
GPU package siglip-kernel (``siglip_kernel.fused_siglip_loss``, its default "auto" backend) where
it is installed.

    python scripts/gpu_siglip.py --out OUT                          # on a GPU: both parts
    python scripts/gpu_siglip.py --out OUT --install-from .gpu_wheels   # siglip-kernel first
    python scripts/gpu_siglip.py --out OUT --device cpu --rows 256  # the CPU dry run (CI)

siglip-kernel is a baseline, not part of the check: ``--install-from DIR`` installs it offline
from a wheel folder (``pip install --no-index --no-deps --find-links DIR siglip-kernel``; the
folder is filled beforehand by scripts/fetch_gpu_baselines.sh and carried with the checkout);
a missing wheel, a failed install or import, a failed comparison or a skipped timing is recorded
(``"not installed: <why>"``, ``"unavailable"``, ``"FAIL"``, ``"skipped"``) and never changes the
exit status. Its correctness is the loss and the gradients (x, y, t, b) against float64 on a
small square case (it takes the diagonal positives only); its timing is an autograd forward and
backward like the materialising loss's, and the record names the function its "auto" backend
ran (``backend_ran``).

Every result is appended to OUT/siglip.jsonl as soon as it exists (a run stopped by a timeout keeps
what it has). The backends are called through their backend functions (the contract of the
``_sigmoid_fwd`` / ``_sigmoid_bwd`` ops): ``infonce_kernels.triton.sigmoid_forward`` and the CUDA
extension's ``torch.ops.infonce_kernels._sigmoid_fwd``; a backend that cannot run here is recorded
with the reason. The timed call is ``sigmoid_forward(..., with_grad=True)``: the loss rows and every
gradient, what a training step with the mean reduction needs.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.cases.siglip import (  # noqa: E402
    open_clip_siglip_loss, siglip_kernel_backend_ran, siglip_kernel_dscale_rounding, siglip_kernel_loss)

START = time.monotonic()

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


def errors(names, got, ref, same, slack=None) -> dict:
    """The 2x same-precision rule per quantity: name -> {err, plain_err, ok}, where ``got``,
    ``ref`` (float64) and ``same`` (the plain computation in the precision under test) are
    parallel lists of tensors; ``ok`` when err <= 2 plain_err + slack[name] + 1e-6 max|ref|."""
    out = {}
    for k, a, r, c in zip(names, got, ref, same):
        err = (a.double() - r.double()).abs().max().item()
        base = (c.double() - r.double()).abs().max().item()
        tol = 2 * base + (slack or {}).get(k, 0.0) + 1e-6 * r.double().abs().max().item()
        out[k] = dict(err=err, plain_err=base, ok=math.isfinite(err) and err <= tol)
    return out


def install_siglip_kernel(out: str, wheels: str) -> None:
    """Install siglip-kernel offline from the wheel folder ``wheels`` (no index, no dependencies:
    torch and triton are the machine's); one "install" record either way."""
    rec = dict(part="install", package="siglip-kernel", wheels=wheels)
    found = sorted(glob.glob(os.path.join(wheels, "siglip_kernel-*.whl")))
    if not found:
        emit(out, dict(rec, status="not installed",
                       why=f"no siglip_kernel-*.whl in {wheels} (scripts/fetch_gpu_baselines.sh downloads it)"))
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", wheels,
           "--disable-pip-version-check", "siglip-kernel"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        emit(out, dict(rec, status="not installed", why=f"pip: {type(e).__name__}: {e}"[:500]))
        return
    if r.returncode != 0:
        emit(out, dict(rec, status="not installed",
                       why=f"pip exit {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}"))
        return
    importlib.invalidate_caches()
    emit(out, dict(rec, status="installed", wheel=os.path.basename(found[-1]),
                   version=importlib.metadata.version("siglip-kernel")))


def siglip_kernel_module(device: torch.device):
    """(the siglip_kernel package or None, why not)."""
    try:
        module = importlib.import_module("siglip_kernel")
    except ImportError as e:
        return None, f"not installed: {type(e).__name__}: {e}"[:500]
    except Exception as e:  # noqa: BLE001 - e.g. its import queries the CUDA device's architecture
        return None, f"not importable: {type(e).__name__}: {e}"[:500]
    if device.type != "cuda":
        return None, f"its kernels need CUDA tensors, not {device.type}"
    return module, f"siglip-kernel {importlib.metadata.version('siglip-kernel')}"


def check_leaves(x0, y0, device: torch.device, dt: str):
    """The correctness checks' inputs in dtype ``dt`` on ``device``: x, y and SigLIP's initial
    t = 10, b = -10."""
    dtype = DTYPES[dt]
    return (x0.to(device, dtype), y0.to(device, dtype), torch.tensor(10.0, device=device),
            torch.tensor(-10.0, device=device))


def correctness_siglip_kernel(out: str, device: torch.device, dtypes, rows: int, d: int) -> None:
    """siglip-kernel's default ("auto") backend through :func:`siglip_kernel_loss` (our convention:
    t, b, mean over B) against float64 on a square case (B = rows + 2, diagonal positives,
    t = 10, b = -10): the loss and the gradients of x, y, t, b under the 2x same-precision rule,
    the plain computation being the loss it replaces, open_clip's materialising formula in the
    inputs' dtype (a loss in that dtype, like the package's); its d/dt is formed from cancelling
    float32 sums of logits in the inputs' dtype, whose rounding (``siglip_kernel_dscale_rounding``)
    is allowed besides."""
    module, why = siglip_kernel_module(device)
    B = rows + 2
    gen = torch.Generator().manual_seed(2)
    x0 = F.normalize(torch.randn(B, d, generator=gen, dtype=F64), dim=1)
    y0 = F.normalize(torch.randn(B, d, generator=gen, dtype=F64), dim=1)
    for dt in dtypes:
        rec = dict(part="correctness", backend="siglip_kernel", option="auto", dtype=dt, case="diagonal",
                   M=B, N=B, d=d, device=str(device))
        if module is None:
            emit(out, dict(rec, status="unavailable", why=why))
            continue
        x, y, t, b = check_leaves(x0, y0, device, dt)

        def value_and_grads(loss_fn):
            xs, ys, ts, bs = (v.detach().clone().requires_grad_() for v in (x, y, t, b))
            loss = loss_fn(xs, ys, ts, bs)
            loss.backward()
            return [loss.detach(), xs.grad, ys.grad, ts.grad, bs.grad]

        try:
            t0 = time.time()
            ran, got = siglip_kernel_backend_ran(
                module, lambda: value_and_grads(lambda *v: siglip_kernel_loss(module.fused_siglip_loss, *v)))
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.time() - t0
            ref = dense(x, y, t, b, (), 0, F64)
            ref = [ref[0].sum() / B] + [g / B for g in ref[1:]]
            same = value_and_grads(lambda *v: open_clip_siglip_loss(*v, None))
            errs = errors(("loss", "dx", "dy", "dscale", "dbias"), got, ref, same,
                          slack={"dscale": siglip_kernel_dscale_rounding(x, y, t, b)})
            ok = all(v["ok"] for v in errs.values())
            emit(out, dict(rec, status="ok" if ok else "FAIL", backend_ran=ran, first_call_s=round(first, 3),
                           errors=errs))
        except Exception as e:  # noqa: BLE001
            emit(out, dict(rec, status="ERROR", error=f"{type(e).__name__}: {e}"[:500]))


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
                x, y, t, b = check_leaves(x0, y0, device, dt)
                labd = tuple(v.to(device) for v in lab)
                try:
                    t0 = time.time()
                    got = list(fn(x, y, t, b, labd, off, True))
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    first = time.time() - t0
                    ref = dense(x, y, t, b, labd, off, F64)
                    same = dense(x, y, t, b, labd, off, x.dtype)
                    errs = errors(("rows", "dx", "dy", "dscale", "dbias"), got, ref, same)
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


def bench(out: str, device: torch.device, rows: int, d: int, dt: str, reps: int,
          baseline_after: float | None = None) -> None:
    """fwd+bwd of the headline case: each backend's fused call, the materialising loss, then
    siglip-kernel (skipped when more than ``baseline_after`` seconds have passed since the start)."""
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

    sk, sk_why = siglip_kernel_module(device)

    def siglip_kernel():  # the same leaves and step as materialised(); the package's "auto" backend
        xs, ys = x.detach().requires_grad_(), y.detach().requires_grad_()
        ts, bs = t.detach().requires_grad_(), b.detach().requires_grad_()
        siglip_kernel_loss(sk.fused_siglip_loss, xs, ys, ts, bs).backward()

    providers = {k: (lambda fn=fn: fn(x, y, t, b, (), 0, True)) if fn else None
                 for k, (fn, _) in backends(device).items()}
    providers["materialised:" + dt] = materialised
    providers["siglip_kernel"] = siglip_kernel if sk is not None else None
    whys = {k: why for k, (_, why) in backends(device).items()}
    whys["siglip_kernel"] = sk_why
    for name, fn in providers.items():
        rec = dict(part="bench", provider=name, rows=rows, d=d, dtype=dt, device=str(device),
                   device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   embeddings_bytes=emb)
        if fn is None:
            emit(out, dict(rec, status="unavailable", why=whys.get(name)))
            continue
        if name == "siglip_kernel":
            elapsed = time.monotonic() - START
            if baseline_after is not None and elapsed > baseline_after:
                emit(out, dict(rec, status="skipped",
                               why=f"{elapsed:.0f} s passed, over --skip-baseline-after {baseline_after:g}"))
                continue
            xs, ys = x.detach().requires_grad_(), y.detach().requires_grad_()
            rec["option"] = "auto"
            try:  # one untimed call: which function "auto" routes to
                rec["backend_ran"], probe = siglip_kernel_backend_ran(
                    sk, lambda: siglip_kernel_loss(sk.fused_siglip_loss, xs, ys, t, b))
            except Exception as e:  # noqa: BLE001
                emit(out, dict(rec, status="ERROR", error=f"{type(e).__name__}: {e}"[:500]))
                continue
            rec["version"] = sk_why
            del xs, ys, probe
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
    p.add_argument("--correctness-backends", nargs="+", default=["triton", "cuda", "siglip_kernel"],
                   choices=["triton", "cuda", "siglip_kernel"],
                   help="backends of the correctness part (the first-run check runs triton and "
                        "siglip_kernel beside the build)")
    p.add_argument("--install-from", metavar="DIR",
                   help="first install siglip-kernel offline from this wheel folder (e.g. .gpu_wheels)")
    p.add_argument("--skip-baseline-after", type=float, metavar="S",
                   help="skip siglip-kernel's timing when more than S seconds have passed since the start")
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
    if a.install_from:
        install_siglip_kernel(a.out, a.install_from)
    bad = 0
    if "correctness" in a.parts:
        dts = a.dtypes if device.type == "cuda" else ["fp32"]
        bad += correctness(a.out, device, dts, a.small_rows, a.small_dim, a.correctness_backends)
        if "siglip_kernel" in a.correctness_backends:   # a baseline: never counted in the exit status
            correctness_siglip_kernel(a.out, device, dts, a.small_rows, a.small_dim)
    if "bench" in a.parts:
        bench(a.out, device, a.rows, a.dim, a.bench_dtype if device.type == "cuda" else "fp32", a.reps,
              a.skip_baseline_after)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
