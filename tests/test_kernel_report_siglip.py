"""CI assertions on what the pairwise sigmoid (SigLIP) Triton kernels compile to for sm_90, and on
the SigLIP model of the kernel report (benchmarks/kernel_report/siglip.py), without a GPU.

Compiles the two launches of the fused training call, ``sigmoid_forward(with_grad=True)``, at
d = 128 in bf16 (the variant that runs: the runtime's divisibility specialisation) and asserts the
structural facts: no spills, wgmma, cp.async pipelining, S computed once per tile (one program per
tile at d <= 128), MUFU per unique element <= 3.1 in the row sweep (loss: ex2 + the series'
division; G: one rcp) and <= 2.1 in the column sweep (ex2 + rcp).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.kernel_report import model, siglip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# compiled in a child process without TRITON_INTERPRET (CI runs the suite under the interpreter)
_COMPILE = ("import json; from benchmarks.kernel_report import siglip; "
            "print(json.dumps(dict(records=siglip.collect([90], ['bf16'], [128], labels=(False,), phases=('fused',)), "
            "memory=siglip.extra_memory(65536, 768, 'bf16')), default=str))")


def _ptxas_missing():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415
        path = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001
        return f"triton's NVIDIA backend is unavailable: {type(e).__name__}: {e}"
    return None if path and os.path.exists(path) else "ptxas (bundled with triton) is absent"


@pytest.fixture(scope="module")
def compiled():
    why = _ptxas_missing()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "INFONCE_TRITON_AUTOTUNE")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fused(compiled):
    return {rec["sweep"]: rec for rec in compiled["records"]}


def test_fused_call_compiles_to_two_clean_sweeps(fused):
    assert set(fused) == {"row", "column"}
    for sweep, r in fused.items():
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (sweep, r["spill_stores"])
        assert r["tensor_core"] == "wgmma" and r["ptx"]["cp_async"] > 0, (sweep, r["tensor_core"], r["ptx"])
        assert r["programs_per_tile"] == 1, sweep            # no recomputed S at d <= 128
        assert r["grad"] and r["loss"] == (sweep == "row")
    assert fused["row"]["per_element"]["mufu"] <= 3.1, fused["row"]["per_element"]
    assert fused["column"]["per_element"]["mufu"] <= 2.1, fused["column"]["per_element"]
    # two products per element (S and the gradient dot), 2 d FLOPs each, and nothing replicated
    for r in fused.values():
        assert r["per_element"]["mma_flops"] == pytest.approx(4 * 128, rel=0.01), r["per_element"]


def test_siglip_model_and_memory(compiled):
    h = siglip.HEADLINE
    e = float(h["rows"]) ** 2
    rec = dict(cap=90, dtype="bf16", d=768, kernel="k", sweep="row", uses={"fused/nolabels": 1},
               per_element=dict(instr=20.0, mma_flops=4 * 768.0, mufu=3.0))
    out = siglip.headline([rec], memory=compiled["memory"])
    assert out["modelled_ms"] == pytest.approx(model.launch_time(rec["per_element"], e)["ms"], rel=1e-3)
    assert out["floor_ms"] == pytest.approx(6 * 768 * e / model.TENSOR_RATE * 1e3, rel=1e-3)
    mem = out["memory"]                                  # outputs only: no fp32 buffer, no M x N tensor
    assert mem["embeddings_bytes"] == 2 * 65536 * 768 * 2
    assert 1.0 <= mem["ratio"] <= 1.01 and out["meets_memory_target"], mem
