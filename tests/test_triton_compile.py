"""Ahead-of-time compile of the Triton kernels for sm80 and sm90, no GPU needed: the variant that runs.

The backend's public functions are called with meta tensors (contiguous, 16-byte aligned: what
the wrappers hand the kernels after their alignment/padding step) and the GPU generation pinned;
every ``kernel[grid](...)`` launch they make is recorded and specialised by Triton's own binder
(16-byte-aligned pointers and sizes divisible by 16 get ``tt.divisibility = 16``), then compiled
with ``triton.compile`` for ``GPUTarget("cuda", cap, 32)`` (the recording and specialising are the
kernel report's, benchmarks/kernel_report/triton_kernels.py). That runs the whole NVIDIA pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas bundled in the triton wheel) on the CPU: it
catches type/shape errors in the GPU code path that the interpreter does not see (tl.dot minimum
sizes, dtype rules, shared-memory limits of the chosen tiles), on exactly the code a GPU would
run (an unspecialised compile is a different kernel: no cp.async pipelining, other registers).
Triton decorates kernels as interpreter functions when TRITON_INTERPRET is set, so the compile
runs in a subprocess without it.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (capability, dtype, d, E, label rule)  -- keep short: ~2 s per kernel
CASES = [
    (90, "bf16", 128, 2, False),
    (90, "bf16", 128, 1, True),      # label rule
    (80, "fp16", 200, 1, False),     # chunked d (d > 128), padded to 208
    (80, "fp32", 20, 0, True),       # d padded to 32
    (90, "fp64", 33, 2, False),
]

_SCRIPT = r"""
import re, sys, torch
from benchmarks.kernel_report.triton_kernels import DTYPES, compile_launch, recording, specialise
from infonce_kernels.ops import Exclusion
import infonce_kernels.triton as tb

for cap, dt, d, E, has_labels in eval(sys.argv[1]):
    dtype, precision = DTYPES[dt]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    meta = lambda *shape, dtype=dtype: torch.empty(*shape, dtype=dtype, device="meta")
    M = N = 512
    lab = (meta(M, dtype=torch.int64),) * 3 if has_labels else (meta(0, dtype=torch.int64),) * 3
    spec = Exclusion.from_tensors(meta(M, E, dtype=torch.int64), *lab)
    # the key side's exclusion width differs from the rows' (KE = 2 - E)
    key_spec = spec.keys_as_rows(meta(N, 2 - E, dtype=torch.int64), lab[2] if has_labels else None)
    with recording(cap, precision) as rec:
        q, k, scale, g = meta(M, d), meta(N, d), meta((), dtype=acc), meta(M, dtype=acc)
        lse = tb.forward(q, k, scale, spec)
        tb.backward(g, q, k, scale, spec, lse)
        tb.backward_paired(g, q, k, scale, spec, lse, g, lse, key_spec, 0)
    for launch in rec:
        attrs = specialise(launch, cap)[5]
        names = launch.kernel.arg_names
        div16 = sorted(names[i[0]] for i, a in attrs.items() if ["tt.divisibility", 16] in a)
        ck, log = compile_launch(launch, cap)
        assert ck.asm.get("cubin"), launch.name
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores", log)
        print(f"sm{cap} {dt} d={d} E={E} labels={has_labels} {launch.name}: ok, regs={regs and regs.group(1)} "
              f"spill_stores={spill and spill.group(1)} smem={ck.metadata.shared} divisible16={','.join(div16)}",
              flush=True)
"""


@pytest.fixture(scope="module")
def compiled():
    """Every case compiled in one subprocess (one start-up of torch and triton, not one per case)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "INFONCE_TRITON_AUTOTUNE")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _SCRIPT, repr(CASES)], env=env, capture_output=True,
                         text=True, timeout=900, cwd=ROOT)
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr.lower()):
        pytest.skip("no ptxas available to triton")
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    return res


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"sm{c[0]}-{c[1]}-d{c[2]}-E{c[3]}" + ("-labels" if c[4] else ""))
def test_kernels_compile_for_gpu(case, compiled):
    res = compiled
    cap, dt, d, E, has_labels = case
    prefix = f"sm{cap} {dt} d={d} E={E} labels={has_labels} "
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(prefix) and ": ok" in ln]
    # forward, dq, dk, paired dq: each compiled as the runtime specialises it, i.e. with every
    # pointer and D (padded to a multiple of 16 by the wrappers) marked divisible by 16
    assert sorted(ln.split(": ok")[0].split()[-1] for ln in lines) == \
        ["_dk_kernel", "_dq_kernel", "_dq_paired_kernel", "_lse_fwd_kernel"], res.stdout
    for ln in lines:
        div = ln.split("divisible16=")[1].split(",")
        assert "q_ptr" in div and "k_ptr" in div and "D" in div, ln
