"""Ahead-of-time compile of the Triton kernels for sm80 and sm90, no GPU needed.

``triton.compile(..., target=GPUTarget("cuda", cap, 32))`` runs the whole
NVIDIA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas bundled
in the triton wheel) on the CPU: it catches type/shape errors in the GPU code
path that the interpreter does not see (tl.dot minimum sizes, dtype rules,
shared-memory limits of the chosen tiles). Triton decorates kernels as
interpreter functions when TRITON_INTERPRET is set, so the compile runs in a
subprocess without it.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# (capability, dtype, d, E, label rule)  -- keep short: ~2 s per kernel
CASES = [
    (90, "bfloat16", 128, 2, False),
    (90, "bfloat16", 128, 1, True),      # label rule
    (80, "float16", 200, 1, False),      # chunked d (d > 128), two output chunks
    (80, "float32", 20, 0, True),
    (90, "float64", 33, 2, False),
]

_SCRIPT = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from infonce_kernels.triton import _backward, _config, _forward
from infonce_kernels.triton._common import acc_dtype, input_precision

SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}

def build(fn, ptrs, consts, cap, cfg):
    sig = {n: ("constexpr" if n in consts else ptrs[n] if n.endswith("_ptr") else "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))

for case in eval(sys.argv[1]):
    cap, dt, d, E, has_labels = case
    dt = getattr(torch, dt)
    _config._capability = lambda dev, cap=cap: (cap // 10, cap % 10)
    s, a = "*" + SHORT[dt], "*" + ("fp64" if dt == torch.float64 else "fp32")
    cpu = torch.device("cpu")
    fc = _config.forward_config(cpu, dt, 1, 1, d)
    bc = _config.backward_config(cpu, dt, 1, 1, d)
    common = dict(E=E, HAS_LABELS=has_labels, ACC_DTYPE=acc_dtype(dt), INPUT_PRECISION=input_precision(dt))
    def consts(cfg, **extra):
        m = cfg.meta(); m.pop("num_warps"); m.pop("num_stages"); return {**common, **m, **extra}
    base = dict(scale_ptr=a, ex_ptr="*i64", rlab_ptr="*i64", klab_ptr="*i64", pos_ptr="*i64", lse_ptr=a)
    key_side = dict(kex_ptr="*i64", krlab_ptr="*i64", kklab_ptr="*i64", kpos_ptr="*i64", klse_ptr=a, kg_ptr=a)
    jobs = [
        (_forward._lse_fwd_kernel, dict(base, q_ptr=s, k_ptr=s), fc, {}),
        (_backward._dq_kernel, dict(base, q_ptr=s, k_ptr=s, g_ptr=a, dq_ptr=s, part_ptr=a), bc, {}),
        (_backward._dk_kernel, dict(base, q_ptr=s, k_ptr=s, g_ptr=a, gmax_ptr=a, dk_ptr=s),
         _config.dk_config(bc), {}),
        # paired / symmetric dq kernel; the key side's exclusion width differs from the rows' (KE = 2 - E)
        (_backward._dq_paired_kernel, dict(base, **key_side, q_ptr=s, k_ptr=s, g_ptr=a, gmax_ptr=a, dq_ptr=s,
                                           part_ptr=a), bc, dict(KE=2 - E)),
    ]
    for fn, ptrs, cfg, extra in jobs:
        k = build(fn, ptrs, consts(cfg, **extra), cap, cfg)
        assert k.asm.get("cubin"), fn.__name__
        print(f"sm{cap} {SHORT[dt]} d={d} E={E} labels={has_labels} {fn.__name__}: ok, smem={k.metadata.shared}", flush=True)
"""


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"sm{c[0]}-{c[1]}-d{c[2]}-E{c[3]}" + ("-labels" if c[4] else ""))
def test_kernels_compile_for_gpu(case):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _SCRIPT, repr([case])], env=env, capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr.lower()):
        pytest.skip("no ptxas available to triton")
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    assert res.stdout.count(": ok") == 4, res.stdout
