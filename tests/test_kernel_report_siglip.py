"""CI assertions on what the pairwise sigmoid (SigLIP) Triton kernels compile to for sm_90, and on
the SigLIP model of the kernel report (benchmarks/kernel_report/siglip.py), without a GPU.

Compiles the two launches of the fused training call, ``sigmoid_forward(with_grad=True)``, at
d = 128 in bf16 (the variant that runs: the runtime's divisibility specialisation) and asserts the
structural facts: no spills, wgmma, cp.async pipelining, S computed once per tile (one program per
tile at d <= 128), MUFU per unique element <= 3.1 in the row sweep (loss: ex2 + the series'
division; G: one rcp) and <= 2.1 in the column sweep (ex2 + rcp). At the headline size (B = 65,536,
d = 768) the same call takes the G-block path: its kernel (one compiled variant for all its
launches) is checked the same way (S over all of d once per tile: 2 d MMA FLOPs per element), and
the path's GEMM calls and peak memory feed the model's test.
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
            "from benchmarks.kernel_report.triton_kernels import launch_key; "
            "from benchmarks.kernel_report.triton_report import kernel_record; "
            "_, rec, gemms, mem = siglip._recorded_call(65536, 768, 'bf16', 90); "
            "print(json.dumps(dict(records=siglip.collect([90], ['bf16'], [128], labels=(False,), phases=('fused',)), "
            "gblock=kernel_record(rec[0], 90, 768), variants=len({launch_key(r, 90) for r in rec}), "
            "kernels=sorted({r.name for r in rec}), launches=len(rec), memory=mem, gemms=gemms), default=str))")


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


def test_headline_takes_the_g_block_path(compiled):
    # d = 768: no sweep with a gradient (they would need 6 programs per tile); one G-block kernel
    # variant, S once per tile over all of d, no spills, wgmma, pipelined loads
    assert compiled["kernels"] == ["_gblock_kernel"] and compiled["variants"] == 1, compiled["kernels"]
    r = compiled["gblock"]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (r["regs"], r["spill_stores"])
    assert r["tensor_core"] == "wgmma" and r["ptx"]["cp_async"] > 0, (r["tensor_core"], r["ptx"])
    assert r["programs_per_tile"] == 1
    pe = r["per_element"]
    assert pe["mma_flops"] == pytest.approx(2 * 768, rel=0.01), pe
    assert pe["mufu"] <= 3.1, pe
    # two GEMMs per (band, column group): G^T x into the fp32 dy_c, G y into the fp32 dx product
    g = compiled["gemms"]
    assert len(g) == 2 * compiled["launches"] and sum(2 * c["m"] * c["n"] * c["k"] for c in g) == 4 * 65536 ** 2 * 768


def test_siglip_model_and_memory(compiled):
    h = siglip.HEADLINE
    e = float(h["rows"]) ** 2
    rec = dict(cap=90, dtype="bf16", d=768, kernel="k", sweep="row", uses={"fused/nolabels": 1},
               per_element=dict(instr=20.0, mma_flops=4 * 768.0, mufu=3.0))
    out = siglip.headline([rec], memory=compiled["memory"], gemms=[])
    assert out["modelled_ms"] == pytest.approx(model.launch_time(rec["per_element"], e)["ms"], rel=1e-3)
    assert out["floor_ms"] == pytest.approx(6 * 768 * e / model.TENSOR_RATE * 1e3, rel=1e-3)
    # the G-block path: its launches share the pairs, the GEMMs add their roofline time
    gb = dict(rec, sweep="G block", uses={"fused/nolabels": compiled["launches"]},
              per_element=dict(instr=20.0, mma_flops=2 * 768.0, mufu=3.0))
    out = siglip.headline([gb], memory=compiled["memory"], gemms=compiled["gemms"])
    gt = siglip.gemm_time(compiled["gemms"])
    assert gt["tensor_ms"] == pytest.approx(4 * 768 * e / model.TENSOR_RATE * 1e3, rel=1e-3)
    assert out["modelled_ms"] == pytest.approx(model.launch_time(gb["per_element"], e)["ms"] + gt["ms"], rel=1e-3)
    mem = out["memory"]                                  # outputs + G block + fp32 dy_c + dx product
    assert mem["embeddings_bytes"] == 2 * 65536 * 768 * 2
    assert 1.3 <= mem["ratio"] <= 1.5 and out["meets_memory_target"], mem
