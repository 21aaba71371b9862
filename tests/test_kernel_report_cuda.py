"""The kernel report's CUDA part (benchmarks/kernel_report/cuda_kernels.py and the CUDA section of
model.py) on hand-written SASS: which code of a tensor-core kernel's main loop is masked-tile code
(what an interior tile skips), the per-element figures of a resident kernel, and how the model
mixes masked and interior tiles. No nvcc needed (the compiled kernels are in
benchmarks/results/kernel_report_sm90.md; scripts/check_cuda_compile compiles them in CI).
"""
from __future__ import annotations

import pytest

from benchmarks.kernel_report import cuda_kernels, model, sass

# One main loop (0x10..0x120) of the shape the tensor-core kernels compile to: the next key tile's
# copy behind a branch (0x20: integer compares, not mask code), the product, the forward's mask pass
# (0x60 skips 0x70..0x80 on interior tiles), and the backward's if / else on the warp vote (0xa0:
# masked arm 0xb0..0xe0 with the exclusion compare, interior arm 0xf0..0x100).
_SASS = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P3, PT, R5, R6, PT ;
        /*0020*/               @P3 BRA 0x50 ;
        /*0030*/                   ISETP.NE.AND P4, PT, R5, R7, PT ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R8.64], P4 ;
        /*0050*/                   HMMA.16816.F32.BF16 R20, R12, R16, RZ ;
        /*0060*/               @P5 BRA 0x90 ;
        /*0070*/                   ISETP.NE.AND P6, PT, R5, R9, PT ;
        /*0080*/                   FSEL R21, R21, -INF , P6 ;
        /*0090*/                   VOTE.ANY P1, P1 ;
        /*00a0*/              @!P1 BRA 0xf0 ;
        /*00b0*/                   ISETP.NE.AND P2, PT, R5, R9, PT ;
        /*00c0*/                   FSEL R20, R20, -INF , P2 ;
        /*00d0*/                   MUFU.EX2 R20, R20 ;
        /*00e0*/                   BRA 0x110 ;
        /*00f0*/                   FFMA R20, R20, R10, -R11 ;
        /*0100*/                   MUFU.EX2 R20, R20 ;
        /*0110*/                   FADD R3, R3, R20 ;
        /*0120*/              @!P0 BRA 0x10 ;
        /*0130*/                   EXIT ;
"""

# the same if / else with the arms the other way round (masked arm second)
_SASS_SWAPPED = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R20, R12, R16, RZ ;
        /*0020*/               @P1 BRA 0x60 ;
        /*0030*/                   FFMA R20, R20, R10, -R11 ;
        /*0040*/                   MUFU.EX2 R20, R20 ;
        /*0050*/                   BRA 0x90 ;
        /*0060*/                   ISETP.NE.AND P2, PT, R5, R9, PT ;
        /*0070*/                   FSEL R20, R20, -INF , P2 ;
        /*0080*/                   MUFU.EX2 R20, R20 ;
        /*0090*/                   FADD R3, R3, R20 ;
        /*00a0*/              @!P0 BRA 0x10 ;
        /*00b0*/                   EXIT ;
"""

_CONSTS = dict(kFwdBM=128, kBM=64, kBN=64, kMmaThreads=128, kDK=128, kDV=128)


def test_masked_tile_code_is_the_mask_pass_and_the_masked_arm():
    ins = sass.split_functions(_SASS)["k"]
    body = sass.main_loop(ins)
    assert body == (0x10, 0x120)
    # the copy region (0x30..0x40) has integer compares too, but a global copy: not mask code
    assert (0x30, 0x40) in sass.mask_regions(ins, body)
    assert cuda_kernels.masked_tile_code(ins, body) == [(0x70, 0x80), (0xb0, 0xe0)]
    swapped = sass.split_functions(_SASS_SWAPPED)["k"]
    assert cuda_kernels.masked_tile_code(swapped, sass.main_loop(swapped)) == [(0x60, 0x80)]


def test_per_element_interior_and_resident_kernels():
    ins = sass.split_functions(_SASS)["k"]
    pe = cuda_kernels.per_element(ins, "lse_fwd_resident_mma_kernel<BF16Tag>", _CONSTS, 128)
    # 18 instructions per thread and iteration, 6 of them masked-tile code; 128 threads, 128 x 64 tile
    assert pe["instr"] == pytest.approx(round(18 * 128 / (128 * 64), 2))
    assert pe["instr_interior"] == pytest.approx(round(12 * 128 / (128 * 64), 2))
    assert pe["mufu"] == pytest.approx(round(2 * 128 / (128 * 64), 3))
    assert pe["mufu_interior"] == pytest.approx(round(1 * 128 / (128 * 64), 3))
    # a resident kernel is launched only for d <= kDK: no figures at d = 512
    assert "unavailable" in cuda_kernels.per_element(ins, "lse_fwd_resident_mma_kernel<BF16Tag>", _CONSTS, 512)
    # the general kernel at d = 512: its backward runs 4 programs per tile
    bwd = cuda_kernels.per_element(ins, "lse_bwd_mma_kernel<BF16Tag, 2, false, false>", _CONSTS, 512)
    assert bwd["programs_per_tile"] == 4
    assert bwd["instr"] == pytest.approx(round(18 * 128 * 4 / (64 * 64), 2))


def test_cuda_model_mixes_masked_and_interior_tiles():
    e = 2.0 ** 32
    case = model.HEADLINE["nt_xent_2B65536_d128_bf16"]
    # the self exclusion meets one 64-key tile of 1024 per 64-row block, two per 128-row block
    assert model.cuda_masked_fraction(case, dict(tile=[64, 64])) == pytest.approx(1 / 1024)
    assert model.cuda_masked_fraction(case, dict(tile=[128, 64])) == pytest.approx(2 / 1024)
    pe = dict(instr=40.0, instr_interior=20.0, mufu=4.0, mufu_interior=2.0, mma_flops=512.0, ldsm_bytes=0.0)
    f = 1 / 1024
    t = model.cuda_launch_time(pe, e, f)
    instr = f * 40 + (1 - f) * 20
    assert t["issue_ms"] == pytest.approx(instr * e / model.ISSUE_RATE * 1e3)
    assert t["mufu_ms"] == pytest.approx((f * 4 + (1 - f) * 2) * e / model.MUFU_RATE * 1e3)
    assert t["ms"] == pytest.approx((instr * e / model.ISSUE_RATE + 512 * e / model.TENSOR_RATE) * 1e3)
    # every tile masked (the default), or a kernel without an interior count: the full count
    assert model.cuda_launch_time(pe, e)["issue_ms"] == pytest.approx(40 * e / model.ISSUE_RATE * 1e3)
    plain = dict(instr=40.0, mufu=4.0, mma_flops=512.0)
    assert model.cuda_launch_time(plain, e, f)["issue_ms"] == pytest.approx(40 * e / model.ISSUE_RATE * 1e3)
    # the shared-memory bound: ldmatrix bytes at the smem rate
    smem = model.cuda_launch_time(dict(plain, ldsm_bytes=1e3), e)
    assert smem["ms"] == pytest.approx(1e3 * e / model.SMEM_RATE * 1e3)


def _doc(kernel: str, instr: float, ms: float) -> dict:
    """A kernel report document with one CUDA headline pass (sm_90 record of ``kernel``)."""
    rec = dict(regs=200, spill_stores=0, spill_loads=0,
               per_element_at={"128": dict(instr=instr, instr_interior=instr / 2)})
    head = dict(passes=[dict(name="forward", kernel=kernel, ms=ms)], modelled_ms=ms,
                triton_modelled_ms=5.0, ratio_to_triton=round(ms / 5.0, 2))
    return dict(commit="c0", label="before", cuda={"90": {kernel: rec}},
                cuda_headline_modelled={"nt_xent_2B65536_d128_bf16": head})


def test_cuda_before_after_pairs_the_headline_passes():
    from benchmarks.kernel_report import report  # noqa: PLC0415
    before, after = _doc("old_kernel<BF16Tag>", 20.0, 8.0), _doc("new_kernel<BF16Tag>", 10.0, 4.0)
    cmp = report.cuda_comparison(before, after, "old.json")
    case = cmp["cases"]["nt_xent_2B65536_d128_bf16"]
    assert (case["before_ms"], case["after_ms"], case["ratio_after"]) == (8.0, 4.0, 0.8)
    row = case["rows"][0]
    assert row["before"]["kernel"] == "old_kernel<BF16Tag>" and row["after"]["kernel"] == "new_kernel<BF16Tag>"
    assert (row["before"]["instr"], row["after"]["instr"], row["after"]["instr_interior"]) == (20.0, 10.0, 5.0)
    md = "\n".join(report._cuda_comparison_md(cmp))  # noqa: SLF001
    assert "`old_kernel<BF16Tag>` -> `new_kernel<BF16Tag>`" in md and "**8 -> 4 ms**" in md


def test_cuda_only_options():
    from benchmarks.kernel_report.__main__ import parse_args  # noqa: PLC0415
    a = parse_args(["--output", "x", "--cuda-only", "--cuda-before", "b.json"])
    assert a.cuda_only and a.cuda_before == "b.json"
    with pytest.raises(SystemExit):
        parse_args(["--output", "x", "--cuda-before", "b.json"])
