"""First-run correctness check: every backend x dtype against float64 on five cases (scripts/gpu_first_run).

    python scripts/gpu_correctness.py --out DIR [--device cuda] [--backends triton cuda] [--dtypes bf16 fp32]
    python scripts/gpu_correctness.py --out DIR --device cpu --backends cpu reference --shrink 8   # dry run

Each result is appended to DIR/correctness.jsonl the moment it exists (a run cut off keeps what it
did). Rule (the project's 2x same-precision rule): for every output (lse, dq, dk, dscale; CLIP:
loss, da, db, dscale)

    max |kernel - fp64|  <=  2 max |torch in the same precision - fp64|  +  rtol max |fp64|

on the same rounded inputs, rtol = 1e-3 (16-bit), 1e-5 (fp32), 1e-9 (fp64); fp64 is the materialised
loss in float64. Cases: symmetric NT-Xent with odd sizes (self excluded), general with d = 200 and
two exclusions, tau = 0.01, CLIP at d = 512, CLIP with an odd batch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import infonce_kernels as ik  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
RTOL = {"bf16": 1e-3, "fp16": 1e-3, "fp32": 1e-5, "fp64": 1e-9}

#: (name, M, N, d, symmetric, exclusions per row, scale); CLIP: (name, B, d)
LSE_CASES = [("symmetric_odd_E1", 1999, 1999, 128, True, 1, 1 / 0.1),
             ("general_d200_E2", 777, 1029, 200, False, 2, 1 / 0.07),
             ("general_tau0.01", 1024, 1536, 128, False, 0, 100.0)]
CLIP_CASES = [("clip_d512", 1024, 512), ("clip_odd_B999", 999, 128)]


class Sink:
    """Appends one JSON line per record to OUT/correctness.jsonl, flushed at once."""

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "correctness.jsonl")

    def __call__(self, rec: dict) -> None:
        rec["time"] = round(time.time(), 1)
        line = json.dumps(rec, default=str)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def _masked_lse(q, k, s, ex):
    """Materialised masked row LSE of s q k^T in q's dtype (16-bit: logits rounded like the GEMM's)."""
    logits = (q @ k.T).to(torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype)
    logits = (logits * s.to(logits.dtype)).to(q.dtype)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    rows = torch.arange(q.shape[0], device=q.device)
    for e in range(ex.shape[1]):
        ok = ex[:, e] >= 0
        mask[rows[ok], ex[ok, e]] = True
    return torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=1)


def _lse_outputs(fn, q, k, s, ex, g, symmetric):
    q = q.detach().clone().requires_grad_()
    k = q if symmetric else k.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    r = fn(q, k, s, ex)
    wrt = [q, s] if symmetric else [q, k, s]
    grads = torch.autograd.grad(r, wrt, g.to(r.dtype))
    return {"lse": r.detach(), "dq": grads[0], "dk": None if symmetric else grads[1], "dscale": grads[-1]}


def _clip_outputs(fn, a, b, s):
    a, b, s = (t.detach().clone().requires_grad_() for t in (a, b, s))
    loss = fn(a, b, s)
    da, db, ds = torch.autograd.grad(loss, [a, b, s])
    return {"loss": loss.detach(), "da": da, "db": db, "dscale": ds}


def _open_clip_formula(a, b, s):
    """open_clip's ClipLoss on normalised features, logits in the inputs' dtype."""
    labels = torch.arange(a.shape[0], device=a.device)
    ce = torch.nn.functional.cross_entropy
    logits = (s.to(a.dtype) * a) @ b.T
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return (ce(logits, labels) + ce(logits.T, labels)) / 2


def compare(got: dict, same: dict, ref: dict, rtol: float) -> dict:
    """Per output: err, the same-precision torch error, ok; and the overall status."""
    out, ok_all = {}, True
    for key, c in ref.items():
        if c is None:
            continue
        c = c.double()
        a = got[key].double()
        err = (a - c).abs().max().item()
        base = (same[key].double() - c).abs().max().item()
        ok = bool(torch.isfinite(a).all()) and err <= 2 * base + rtol * max(c.abs().max().item(), 1e-30)
        ok_all &= ok
        out[key] = {"err": float(f"{err:.3e}"), "torch_err": float(f"{base:.3e}"), "ok": ok}
    out["status"] = "ok" if ok_all else "FAIL"
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(device: torch.device, backends, dtypes, shrink: int, emit) -> int:
    """Run every case; -> number of failures and errors."""
    torch.set_float32_matmul_precision("highest")
    bad = 0
    nrm = torch.nn.functional.normalize
    for backend in backends:
        why = ik.ops.unavailable_reason(backend, device)
        if why:
            emit({"stage": "correctness", "backend": backend, "status": "UNAVAILABLE", "why": why})
            bad += 1
            continue
        for dname in dtypes:
            dt = DTYPES[dname]
            acc = torch.float64 if dt == torch.float64 else torch.float32
            for name, M, N, d, sym, E, scale in LSE_CASES:
                M, N = max(M // shrink, 33), max(N // shrink, 35)
                N = M if sym else N
                rec = {"stage": "correctness", "backend": backend, "dtype": dname, "case": name, "M": M, "N": N, "d": d}
                try:
                    gen = torch.Generator(device=device).manual_seed(1000 + M + N + d)
                    q = nrm(torch.randn(M, d, device=device, generator=gen), dim=1).to(dt)
                    k = q if sym else nrm(torch.randn(N, d, device=device, generator=gen), dim=1).to(dt)
                    s = torch.tensor(scale, device=device, dtype=acc)
                    ex = torch.full((M, E), -1, dtype=torch.int64, device=device)
                    if E >= 1:
                        ex[:, 0] = torch.arange(M, device=device) if sym else torch.randint(0, N, (M,), device=device,
                                                                                           generator=gen)
                    if E >= 2:
                        ex[:, 1] = torch.randint(-1, N, (M,), device=device, generator=gen)
                    g = torch.randn(M, device=device, generator=gen, dtype=torch.float64)
                    t0 = time.perf_counter()
                    got = _lse_outputs(lambda a, b, c, e: ik.lse(a, b, c, exclude=e, symmetric=sym, backend=backend),
                                       q, k, s, ex, g, sym)
                    _sync(device)
                    rec["first_call_s"] = round(time.perf_counter() - t0, 2)   # includes JIT compiles
                    same = _lse_outputs(_masked_lse, q, k, s, ex, g, sym)
                    ref = _lse_outputs(_masked_lse, q.double(), k.double(), s.double(), ex, g, sym)
                    rec.update(compare(got, same, ref, RTOL[dname]))
                except Exception as e:  # noqa: BLE001  (recorded, the next case runs)
                    rec.update(status="ERROR", error=f"{type(e).__name__}: {e}"[:800], tb=traceback.format_exc()[-2000:])
                bad += rec["status"] != "ok"
                emit(rec)
            for name, B, d in CLIP_CASES:
                B = max(B // shrink, 33) | (B & 1)          # keep the odd batch odd
                rec = {"stage": "correctness", "backend": backend, "dtype": dname, "case": name, "B": B, "d": d}
                try:
                    gen = torch.Generator(device=device).manual_seed(2000 + B + d)
                    a = nrm(torch.randn(B, d, device=device, generator=gen), dim=1).to(dt)
                    b = nrm(torch.randn(B, d, device=device, generator=gen), dim=1).to(dt)
                    s = torch.tensor(1 / 0.07, device=device, dtype=acc)
                    t0 = time.perf_counter()
                    got = _clip_outputs(lambda x, y, z: ik.clip_loss(x, y, z, normalize=False, backend=backend), a, b, s)
                    _sync(device)
                    rec["first_call_s"] = round(time.perf_counter() - t0, 2)
                    same = _clip_outputs(_open_clip_formula, a, b, s)
                    ref = _clip_outputs(_open_clip_formula, a.double(), b.double(), s.double())
                    rec.update(compare(got, same, ref, RTOL[dname]))
                except Exception as e:  # noqa: BLE001
                    rec.update(status="ERROR", error=f"{type(e).__name__}: {e}"[:800], tb=traceback.format_exc()[-2000:])
                bad += rec["status"] != "ok"
                emit(rec)
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", nargs="+", default=["triton", "cuda"])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--shrink", type=int, default=1, help="divide the case sizes (dry runs)")
    a = p.parse_args(argv)
    bad = run(torch.device(a.device), a.backends, a.dtypes, a.shrink, Sink(a.out))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
