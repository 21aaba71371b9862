"""CI assertions on what the Triton kernels compile to for sm_90 (issue 16), without a GPU.

Runs the small set of the kernel report (``python -m benchmarks.kernel_report --small``: sm_90,
bf16, d = 128, labels off, the NT-Xent and general losses' launches, compiled with the runtime's
specialisation: the variant that runs on a GPU) and asserts the structural facts of the report.
It supersedes the spill / shared-memory part of ``tests/test_triton_compile.py``, which compiles
the kernels without the divisibility specialisation (a different variant from the one that runs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.kernel_report import model, report as report_doc, sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas_missing() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415
        path = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001  (no triton, or a triton without the NVIDIA backend)
        return f"triton's NVIDIA backend is unavailable: {type(e).__name__}: {e}"
    return None if path and os.path.exists(path) else "ptxas (bundled with triton) is absent"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    why = _ptxas_missing()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("kernel_report")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "INFONCE_TRITON_AUTOTUNE")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", "--small", "--output", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    doc = json.loads((out / "kernel_report_sm90.json").read_text())
    doc["_md"] = (out / "kernel_report_sm90.md").read_text()
    return doc


def _used_by(doc, scenario, phase):
    return [r for r in doc["triton"] if any(u.startswith(f"{scenario}/{phase}/") for u in r["uses"])]


def test_report_records_every_launch(report):
    import triton  # noqa: PLC0415
    assert report["versions"]["triton"] == triton.__version__
    assert _used_by(report, "nt_xent", "forward") and _used_by(report, "nt_xent", "backward")
    assert _used_by(report, "general", "backward")
    for r in report["triton"]:
        assert r["cap"] == 90 and r["regs"] and r["smem"] > 0, r
        pe = r["per_element"]
        assert pe["instr"] > 0 and pe["mufu"] > 0 and pe["mma_flops"] > 0, r
    h = report["headline_modelled"]["nt_xent_2B65536_d128_bf16"]
    assert h["modelled_ms"] > h["floor_ms"] > 0          # a model of real kernels, never below the floor
    assert "modelled" in report["model"] and "Headline cases" in report["_md"]


def test_compiles_the_variant_that_runs(report):
    # The JIT gives 16-byte-aligned pointers and sizes % 16 == 0 tt.divisibility=16; only then does
    # Triton pipeline the tile loads with cp.async (the unspecialised variant has none).
    for r in report["triton"]:
        assert r["ptx"]["cp_async"] > 0, (r["kernel"], r["ptx"])


def test_no_spills_in_default_configurations(report):
    for r in report["triton"]:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (r["kernel"], r["spill_stores"], r["spill_loads"])


def test_wgmma_in_forward_and_symmetric_backward(report):
    for r in _used_by(report, "nt_xent", "forward") + _used_by(report, "nt_xent", "backward"):
        assert r["tensor_core"] == "wgmma" and r["ttgir_mma_versions"] == [3], (r["kernel"], r["tensor_core"])


def test_wgmma_in_every_product_kernel(report):
    for r in report["triton"]:
        if r["per_element"]["mma_flops"] > 0:
            assert r["tensor_core"] == "wgmma", (r["kernel"], r["tensor_core"])


def test_forward_mufu_per_unique_element(report):
    for r in _used_by(report, "nt_xent", "forward") + _used_by(report, "general", "forward"):
        assert r["per_element"]["mufu"] <= 1.1, (r["kernel"], r["per_element"]["mufu"])


def test_symmetric_backward_mufu_per_unique_element(report):
    for r in _used_by(report, "nt_xent", "backward"):
        assert r["per_element"]["mufu"] <= 2.1, (r["kernel"], r["per_element"]["mufu"])


# --- the counting method itself, on hand-written SASS -------------------------------------------

_SASS = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ ;
        /*0020*/                   MUFU.EX2 R2, R2 ;
        /*0030*/                   FFMA R3, R2, R2, R3 ;
        /*0040*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0050*/              @!P0 BRA 0x30 ;
        /*0060*/              @!P1 BRA 0x10 ;
        /*0070*/                   EXIT ;
"""


def test_sass_main_loop_and_counts():
    ins = sass.split_functions(_SASS)["k"]
    assert sass.loops(ins) == [(0x10, 0x60), (0x30, 0x50)]
    body = sass.main_loop(ins)
    assert body == (0x10, 0x60)                          # outermost loop holding MUFU.EX2
    c = sass.count_body(ins, body, inner_trips=3)
    # 0x10 HGMMA, 0x20 MUFU, 0x60 BRA once; 0x30..0x50 (FFMA, HMMA, BRA) three times
    assert c["total"] == 3 + 3 * 3
    assert c["by_class"]["mufu"] == 1 and c["by_class"]["tensor"] == 1 + 3
    assert c["mma_flops_per_warp"] == 2 * 64 * 128 * 16 / 4 + 3 * 2 * 16 * 8 * 16
    assert sass.tensor_kind(ins) == "wgmma"


# a loop (0x10..0xc0): a score product waited on at once, a per-tile mask branch, exps, and a second
# product left in flight across the back edge until the next iteration's wait
_SASS_OVERLAP = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R5, R5, 0x1, RZ ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, gsb0 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0040*/               @P0 BRA 0x70 ;
        /*0050*/                   ISETP.NE.U32.AND P1, PT, R5, R6, PT ;
        /*0060*/                   FSEL R24, R24, -INF , P1 ;
        /*0070*/                   MUFU.EX2 R2, R24 ;
        /*0080*/                   FFMA R3, R2, R2, R3 ;
        /*0090*/                   HGMMA.64x128x16.F32.BF16 R40, R2, gdesc[UR12], R40, gsb0 ;
        /*00a0*/                   FADD R7, R7, R3 ;
        /*00b0*/                   LOP3.LUT R8, R8, 0x1, RZ, 0x3c, !PT ;
        /*00c0*/              @!P2 BRA 0x10 ;
        /*00d0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00e0*/                   EXIT ;
"""


def test_sass_overlap_evidence_and_mask_regions():
    ins = sass.split_functions(_SASS_OVERLAP)["k"]
    body = sass.main_loop(ins)
    assert body == (0x10, 0xc0)
    groups = sass.wgmma_overlap(ins, body)
    # the score product: waited on right after its commit, nothing in flight
    assert groups[0]["commit"] == "0x20" and groups[0]["retire"] == "0x30" and groups[0]["in_flight"] == 0
    # the second product: FADD, LOP3, BRA (this iteration) and IADD3 (the next) issue before the wait
    assert groups[1]["commit"] == "0x90" and groups[1]["retire"] == "0x30" and groups[1]["in_flight"] == 4
    assert groups[1]["flops_per_warp"] == 2 * 64 * 128 * 16 / 4
    # the per-tile mask path: the ISETP/FSEL that the predicated branch at 0x40 skips
    assert sass.mask_regions(ins, body) == [(0x50, 0x60)]
    full, interior = sass.count_body(ins, body), sass.count_body(ins, body, skip=[(0x50, 0x60)])
    assert full["total"] - interior["total"] == 2


def test_overlap_and_tile_mix_in_the_model():
    e = 2.0 ** 32
    issue, tensor = 10 * e / model.ISSUE_RATE, 256 * e / model.TENSOR_RATE
    plain = dict(instr=10.0, mma_flops=256.0, mufu=0.0)
    # no in-flight instructions: the sum; every instruction in flight under the only product: the max
    assert model.launch_time(dict(plain, overlap=[dict(mma_flops=256.0, in_flight=0.0)]), e)["ms"] == \
        pytest.approx((issue + tensor) * 1e3)
    assert model.launch_time(dict(plain, overlap=[dict(mma_flops=256.0, in_flight=10.0)]), e)["ms"] == \
        pytest.approx(max(issue, tensor) * 1e3)
    # a group is credited at most its own tensor time
    part = model.launch_time(dict(plain, overlap=[dict(mma_flops=64.0, in_flight=10.0)]), e)
    assert part["overlap_ms"] == pytest.approx(64 * e / model.TENSOR_RATE * 1e3)
    # NT-Xent's self exclusion: one 128-key tile of 512 per row block takes the mask path
    case = model.HEADLINE["nt_xent_2B65536_d128_bf16"]
    f = model.masked_fraction(case, dict(BLOCK_M=128, BLOCK_N=128))
    assert f == pytest.approx(1 / 512)
    assert model.tile_mix(dict(instr=10.0, instr_interior=6.0), f)["instr"] == pytest.approx(6 + 4 * f)
    assert model.masked_fraction(model.HEADLINE["clip_B32768_d512_bf16"], dict(BLOCK_M=128, BLOCK_N=64)) == 0


def test_clip_kernels_compile_to_one_pass_without_spills():
    """CLIP's kernels as the CLIP op launches them (sm_90, bf16, d = 512), no spills, wgmma:

    * the one-pass forward: one product per unique element (2d FLOPs: no tile computed twice),
      MUFU per unique element <= 2 x 1.1 (an exponential per element for each LSE side) + 0.5: the
      key side's running sum is rescaled once per tile per key held, and the product's
      accumulator layout gives every thread BLOCK_N / 4 keys (256 threads x 16 keys / (128 x 64)
      = 0.5 per element);
    * the backward's G kernel (d spans two paired output chunks: G blocks + GEMMs): S once per
      tile (2d FLOPs), two exponentials per element (<= 2.1); at the headline shape its plan's
      scratch <= 0.5x the embeddings and the GEMMs do 4 B^2 d FLOPs (da and db once each)."""
    why = _ptxas_missing()
    if why:
        pytest.skip(why)
    code = (
        "import json\n"
        "from benchmarks.kernel_report import clip\n"
        "from benchmarks.kernel_report.triton_kernels import Scenario, record_scenario\n"
        "from benchmarks.kernel_report.triton_report import kernel_record\n"
        "ls = record_scenario(Scenario('clip', 'bf16', 512, False), 90)\n"
        "seen = {}\n"
        "for l in ls:\n"
        "    seen.setdefault((l.phase, l.name), l)\n"
        "recs = [dict(kernel_record(l, 90, 512), phase=ph) for (ph, _), l in seen.items()]\n"
        "print(json.dumps(dict(recs=recs, extras=clip.recorded_backward(32768, 512, 'bf16')), default=str))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "INFONCE_TRITON_AUTOTUNE")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    recs = {(x["phase"], x["kernel"]): x for x in out["recs"]}
    assert sorted(recs) == [("backward", "_gpair_kernel"), ("forward", "_lse_pair_fwd_kernel")]
    for x in recs.values():
        assert x["spill_stores"] == 0 and x["spill_loads"] == 0 and x["tensor_core"] == "wgmma", x["kernel"]
        assert x["per_element"]["mma_flops"] == 2 * 512, x["kernel"]
    assert recs[("forward", "_lse_pair_fwd_kernel")]["per_element"]["mufu"] <= 2 * 1.1 + 0.5
    assert recs[("backward", "_gpair_kernel")]["per_element"]["mufu"] <= 2.1
    ext = out["extras"]
    assert ext["memory"]["scratch_ratio"] <= 0.5 and ext["memory"]["outputs_bytes"] == ext["memory"]["embeddings_bytes"]
    assert ext["gemms"]["flops"] == 4 * 32768.0 ** 2 * 512


def test_block_kernel_launches_share_the_pairs():
    """A G kernel's launches share one pass over the pairs (model.BLOCK_KERNELS), bounded below by
    its G writes; the case adds the GEMMs and the elementwise passes."""
    case = model.HEADLINE["clip_B32768_d512_bf16"]
    pe = dict(instr=30.0, mma_flops=1024.0, mufu=2.0)
    rec = dict(kernel="_gpair_kernel", cap=90, dtype="bf16", d=512, config=dict(BLOCK_M=128, BLOCK_N=64),
               per_element=pe, uses={"clip/backward/nolabels": 4})
    ext = dict(plan=dict(band=2048, groups=8, cols=4096), gemms=dict(calls=2, tensor_ms=1.0, hbm_ms=0.5, ms=1.0),
               elementwise_ms=0.25, g_block_hbm_bytes=2.0 ** 31, hbm_rate=3.35e12)
    h = model.headline([rec], 90, {"clip_B32768_d512_bf16": ext})["clip_B32768_d512_bf16"]
    one_pass = model.launch_time(pe, float(case["rows"]) ** 2)["ms"]
    assert h["passes"][0]["launches"] == 8 * 16 and h["passes"][0]["ms"] == pytest.approx(one_pass, abs=1e-3)
    assert h["modelled_ms"] == pytest.approx(one_pass + 1.0 + 0.25, abs=0.01)


def test_model_is_the_stated_formula():
    pe = dict(instr=10.0, mma_flops=256.0, mufu=1.0)
    e = 2.0 ** 32
    t = model.launch_time(pe, e)
    assert t["ms"] == pytest.approx(max(10 * e / model.ISSUE_RATE + 256 * e / model.TENSOR_RATE,
                                        e / model.MUFU_RATE) * 1e3)
    # NT-Xent floor at 2B = 65,536, d = 128: forward 2N^2d FLOPs, backward 4N^2d FLOPs (tensor-bound)
    case = model.HEADLINE["nt_xent_2B65536_d128_bf16"]
    assert model.floor_ms(case) == pytest.approx(6 * 65536.0 ** 2 * 128 / model.TENSOR_RATE * 1e3)


def test_before_after_comparison_pairs_the_same_variants():
    def rec(kernel, dtype, cap=90, mufu=1.0, **cfg):
        return dict(kernel=kernel, cap=cap, dtype=dtype, d=128, labels=False, config=dict(BLOCK_M=64, BLOCK_N=64,
                    BLOCK_D=128, **cfg), num_warps=8, num_stages=2, programs_per_tile=1, regs=100, spill_stores=0,
                    spill_loads=0, tensor_core="wgmma", per_element=dict(mufu=mufu, instr=10.0, mma_flops=512.0))
    before = dict(commit="abc", label="before", headline_modelled={"case": dict(modelled_ms=15.0)},
                  triton=[rec("_k", "bf16", mufu=4.0, E=1), rec("_k", "fp16", E=1), rec("_k", "bf16", cap=80, E=1)])
    after = dict(headline_modelled={"case": dict(modelled_ms=9.0, floor_ms=4.0)},
                 triton=[rec("_k", "bf16", mufu=2.0, E=1), rec("_k", "bf16", E=2), rec("_k", "fp16", E=1),
                         rec("_k", "bf16", cap=80, E=1)])
    cmp = report_doc.comparison(before, after)
    assert cmp["headline"] == {"case": dict(before=15.0, after=9.0, floor=4.0)}
    # only sm_90 bf16 / fp32 variants present in both reports (E=2 is new, fp16 and sm_80 are not compared)
    assert [(r["dtype"], r["E"], r["mufu_before"], r["mufu_after"]) for r in cmp["rows"]] == [("bf16", 1, 4.0, 2.0)]
    assert "4.0 -> 2.0" in "\n".join(report_doc._comparison_md(cmp))
