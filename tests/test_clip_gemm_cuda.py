"""CLIP's backward on the cuda backend by G blocks (csrc/cuda/pair_gblock_mma.cuh, private op
``infonce_kernels::_lse_pair_gblock``) and GEMMs (``infonce_kernels/ops/pair_gemm.py``).

On any machine: the routing rule, the headline plan, the driver on meta tensors (every G block a
whole number of the kernel's tiles, the op's fake implementation) and the op's schema. With a
CUDA device and the CUDA kernels built: values and gradients against float64 (2x same-precision
rule), several bands and column groups with ragged last ones, both tile-load paths, a mean
reduction's tiny upstream gradients, clip_loss end to end, bad arguments and determinism."""
from __future__ import annotations

import pytest
import torch

from harness import assert_within
from infonce_kernels._extension import EXTENSION_ERROR
from infonce_kernels.ops import _cpp, gblock_gemm, pair_gemm

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension not built: {EXTENSION_ERROR}")

F64 = torch.float64
META = torch.device("meta")


def _gpu_ready():
    return torch.cuda.is_available() and _cpp.has_cuda_kernels()


gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA device and infonce_kernels built with CUDA")


class TestRoutingAndPlan:
    def test_routing(self):
        """fp16 / bf16 on CUDA (or meta) with d beyond the 128-wide output chunk take the path;
        CPU, fp32 / fp64 and d <= 128 keep two paired backwards."""
        for dev in ("cuda", "meta"):
            assert _cpp.uses_backward_pair(torch.device(dev), torch.bfloat16, 129)
            assert _cpp.uses_backward_pair(torch.device(dev), torch.float16, 512)
            assert not _cpp.uses_backward_pair(torch.device(dev), torch.bfloat16, 128)
            assert not _cpp.uses_backward_pair(torch.device(dev), torch.float32, 512)
            assert not _cpp.uses_backward_pair(torch.device(dev), F64, 512)
        assert not _cpp.uses_backward_pair(torch.device("cpu"), torch.bfloat16, 512)

    def test_headline_plan(self):
        """B = 32,768, d = 512, bf16: the Triton backend's blocking (2,048-row bands, 8 groups of
        4,096 columns), scratch under half the embeddings, whole G-kernel tiles."""
        B, d = 32768, 512
        p = _cpp.pair_plan(B, B, d, torch.bfloat16)
        assert (p.band, p.groups, p.cols) == (2048, 8, 4096), p
        assert p.scratch_bytes(d, torch.bfloat16) <= 0.5 * (2 * B * d * 2)
        assert p.band % _cpp.PAIR_GBLOCK_TILES[0] == 0 and p.cols % _cpp.PAIR_GBLOCK_TILES[1] == 0

    @pytest.mark.parametrize("M,N,d,budget,min_band", [(4100, 2500, 200, 1.45, 1024), (300, 211, 136, 2.0, 128)])
    def test_driver_on_meta(self, monkeypatch, M, N, d, budget, min_band):
        """The driver on meta tensors: one G-kernel call per (group, band) whose buffer holds the
        block rounded up to whole 128 x 64 tiles with an even row stride (the kernel's unmasked
        stores), partial sums for every program, outputs of the inputs' shapes and dtypes."""
        calls = []
        run = pair_gemm.pair_gradients

        def logged(*args):
            write_block = args[8]

            def checked(gblk, gs, r0, r1, c0, c1, gm, col_progs):
                calls.append((r0, r1, c0, c1))
                assert gblk.shape[0] >= -(-(r1 - r0) // 128) * 128 and gblk.shape[1] >= -(-(c1 - c0) // 64) * 64
                assert gblk.stride(1) == 1 and gblk.stride(0) % 2 == 0 and gblk.dtype == torch.bfloat16
                assert gs.numel() >= -(-(r1 - r0) // 128) * col_progs and gs.dtype == torch.float32
                return write_block(gblk, gs, r0, r1, c0, c1, gm, col_progs)

            return run(*args[:8], checked, *args[9:])

        monkeypatch.setattr(pair_gemm, "pair_gradients", logged)
        monkeypatch.setattr(_cpp, "pair_plan",
                            lambda *a: gblock_gemm.plan(*a, _cpp.PAIR_GBLOCK_TILES, budget, min_band, 0))
        a = torch.empty(M, d, dtype=torch.bfloat16, device=META)
        b = torch.empty(N, d, dtype=torch.bfloat16, device=META)
        s, r, t = torch.empty((), device=META), torch.empty(M, device=META), torch.empty(N, device=META)
        da, db, ds = _cpp.backward_pair(a, b, s, r, t, r, t)
        p = _cpp.pair_plan(M, N, d, torch.bfloat16)
        assert len(calls) == p.groups * -(-M // p.band) and p.groups * -(-M // p.band) > 1
        assert sorted({c[:2] for c in calls})[-1][1] == M and sorted({c[2:] for c in calls})[-1][1] == N
        assert (da.shape, db.shape, ds.shape) == (a.shape, b.shape, ()) and da.dtype == db.dtype == torch.bfloat16

    def test_schema(self):
        """The op's schema: gblk and gs mutated, nothing returned."""
        schema = torch.ops.infonce_kernels._lse_pair_gblock.default._schema
        assert [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] == ["gblk", "gs"]
        assert len(schema.returns) == 0


def _pair_grads(a, b, s, g_r, g_t, fn):
    leaves = [v.detach().clone().requires_grad_() for v in (a, b, s)]
    r, t = fn(*leaves)
    ((r * g_r.to(r.dtype)).sum() + (t * g_t.to(t.dtype)).sum()).backward()
    return [v.grad for v in leaves]


def _plain(a, b, s):
    logits = s.to(a.dtype) * (a @ b.T)
    return logits.logsumexp(1), logits.logsumexp(0)


@gpu
class TestCudaPairBackward:
    @staticmethod
    def small_plan(monkeypatch):
        """Bands of 128 rows and 64-column groups for the small cases (several of each)."""
        monkeypatch.setattr(_cpp, "pair_plan",
                            lambda M, N, d, dt: gblock_gemm.GemmPlan(128, -(-N // 64), 64, *_cpp.PAIR_GBLOCK_TILES))

    @pytest.mark.parametrize("M,N,d,dtype,g_size", [
        (300, 211, 200, torch.float16, 1.0),       # d % 8 == 0: cp.async tiles; ragged band and group
        (300, 211, 203, torch.bfloat16, 1.0),      # d % 8 != 0: element loads
        (257, 257, 520, torch.float16, 1e-6),      # square, d over 5 chunks, a mean reduction's tiny g
    ], ids=["fp16-vec", "bf16-scalar", "fp16-tiny-g"])
    def test_against_float64(self, monkeypatch, M, N, d, dtype, g_size):
        from infonce_kernels.ops import fused_lse_pair  # noqa: PLC0415
        self.small_plan(monkeypatch)
        calls = []
        run = pair_gemm.pair_gradients
        monkeypatch.setattr(pair_gemm, "pair_gradients", lambda *a: calls.append(a[7]) or run(*a))
        gen = torch.Generator().manual_seed(M + d)
        a = torch.nn.functional.normalize(torch.randn(M, d, generator=gen, dtype=F64), dim=1).cuda()
        b = torch.nn.functional.normalize(torch.randn(N, d, generator=gen, dtype=F64), dim=1).cuda()
        s = torch.tensor(14.0, dtype=F64, device="cuda")
        g_r = (torch.rand(M, generator=gen, dtype=F64) * g_size).cuda()
        g_t = ((torch.rand(N, generator=gen, dtype=F64) - 0.3) * g_size).cuda()
        got = _pair_grads(a.to(dtype), b.to(dtype), s.float(), g_r, g_t, lambda *v: fused_lse_pair(*v, backend="cuda"))
        assert len(calls) == 1 and calls[0].groups > 1
        want = _pair_grads(a, b, s, g_r, g_t, _plain)
        base = _pair_grads(a.to(dtype), b.to(dtype), s.to(dtype), g_r, g_t, _plain)
        for name, x, w, p in zip(("da", "db", "dscale"), got, want, base):
            assert x.dtype == (dtype if name != "dscale" else torch.float32) and x.shape == w.shape
            assert_within(x, w, p, name, rtol=1e-6, atol=1e-12 * g_size)

    def test_clip_loss(self):
        """clip_loss at d = 512, bf16, learnable scale: loss and every gradient against float64."""
        import infonce_kernels  # noqa: PLC0415
        B, d = 333, 512
        gen = torch.Generator().manual_seed(7)
        img, txt = torch.randn(B, d, generator=gen, dtype=F64), torch.randn(B, d, generator=gen, dtype=F64)

        def run(dtype, backend):
            leaves = [img.to("cuda", dtype, copy=True).requires_grad_(), txt.to("cuda", dtype, copy=True).requires_grad_(),
                      torch.tensor(20.0, dtype=torch.float32 if dtype != F64 else F64, device="cuda", requires_grad=True)]
            loss = infonce_kernels.clip_loss(*leaves, backend=backend)
            loss.backward()
            return [loss.detach()] + [v.grad for v in leaves]

        got, want, base = run(torch.bfloat16, "cuda"), run(F64, "reference"), run(torch.bfloat16, "reference")
        for name, x, w, p in zip(("loss", "dimg", "dtxt", "dscale"), got, want, base):
            assert_within(x, w, p, name, rtol=1e-6)

    def test_deterministic(self, monkeypatch):
        from infonce_kernels.ops import fused_lse_pair  # noqa: PLC0415
        self.small_plan(monkeypatch)
        gen = torch.Generator().manual_seed(3)
        a, b = (torch.randn(n, 256, generator=gen).cuda().half() for n in (200, 150))
        s = torch.tensor(5.0, device="cuda")
        r, t = fused_lse_pair(a, b, s, backend="cuda")
        g_r, g_t = torch.rand(200, device="cuda"), torch.rand(150, device="cuda")
        one, two = _cpp.backward_pair(a, b, s, r, t, g_r, g_t), _cpp.backward_pair(a, b, s, r, t, g_r, g_t)
        for x, y in zip(one, two):
            assert torch.equal(x, y)

    def test_bad_arguments_name_the_argument(self):
        op = torch.ops.infonce_kernels._lse_pair_gblock
        a, b = torch.randn(130, 256, device="cuda").half(), torch.randn(70, 256, device="cuda").half()
        s, gm = torch.tensor(2.0, device="cuda"), torch.tensor(1.0, device="cuda")
        r, t = torch.zeros(130, device="cuda"), torch.zeros(70, device="cuda")
        gblk, gs = torch.empty(256, 128, device="cuda", dtype=torch.half), torch.zeros(4, device="cuda")
        ok = [a, b, s, r, t, r, t, gm, gblk, gs, 0, 130, 0, 70, 2]
        op(*ok)
        for i, bad, word in [(0, a.float(), "a must be"), (8, gblk[:, :100], "gblk"), (8, gblk[:128], "gblk"),
                             (3, r[:5], "r must"), (9, gs[:1], "gs must"), (12, -1, "columns"), (11, 131, "rows"),
                             (14, 0, "col_progs"), (2, s.double(), "scale")]:
            args = list(ok)
            args[i] = bad
            with pytest.raises((ValueError, TypeError), match=word):
                op(*args)



class TestKernelReport:
    def test_recorded_backward_on_the_cuda_backend(self):
        """The kernel report's record of the cuda backend's backward at the headline shape: the
        plan, 4 B^2 d GEMM FLOPs (da and db once each), scratch under half the embeddings."""
        from benchmarks.kernel_report import clip  # noqa: PLC0415
        rec = clip.recorded_backward(32768, 512, "bf16", backend="cuda")
        assert rec["plan"] == dict(band=2048, groups=8, cols=4096)
        assert rec["gemms"]["flops"] == 4 * 32768.0 ** 2 * 512 and rec["gemms"]["calls"] == 2 * 8 * 16
        assert rec["memory"]["scratch_ratio"] <= 0.5 and rec["memory"]["outputs_bytes"] == rec["memory"]["embeddings_bytes"]
        assert clip.recorded_backward(32768, 128, "bf16", backend="cuda") is None     # d <= 128: paired kernels

    def test_cuda_headline_counts_the_g_kernel_once_with_its_gemms(self):
        """CUDA CLIP: the G kernel's launches are one pass over the pairs (at least its G writes at
        the HBM rate), plus the GEMMs and elementwise passes; the two forward row passes as before."""
        from benchmarks.kernel_report import model  # noqa: PLC0415
        case = model.HEADLINE["clip_B32768_d512_bf16"]
        e = float(case["rows"]) ** 2
        fwd, g = dict(instr=30.0, mma_flops=1024.0, mufu=1.0, ldsm_bytes=40.0), dict(instr=1.0, mma_flops=1.0, mufu=0.1)
        kernels = {"lse_fwd_mma_kernel<BF16Tag, false, false>": dict(per_element_at={"512": fwd}),
                   "pair_gblock_mma_kernel<BF16Tag, true>": dict(per_element_at={"512": g})}
        ext = dict(plan=dict(band=2048, groups=8, cols=4096), gemms=dict(calls=256, tensor_ms=2.0, hbm_ms=1.0, ms=2.5),
                   elementwise_ms=0.5, g_block_hbm_bytes=2.0 ** 31, hbm_rate=3.35e12)
        h = model.cuda_headline(kernels, {"clip_B32768_d512_bf16": dict(modelled_ms=10.0)},
                                {"clip_B32768_d512_bf16": ext})["clip_B32768_d512_bf16"]
        hbm = 2.0 ** 31 / 3.35e12 * 1e3
        assert [p["launches"] for p in h["passes"]] == [2, 128, 256, "-"]
        assert h["passes"][1]["ms"] == pytest.approx(hbm, abs=1e-3)       # the G writes bound this toy kernel
        want = 2 * model.cuda_launch_time(fwd, e)["ms"] + hbm + 2.5 + 0.5
        assert h["modelled_ms"] == pytest.approx(want, abs=0.01) and h["ratio_to_triton"] == round(h["modelled_ms"] / 10, 2)
        no_ext = model.cuda_headline(kernels, {}, {})["clip_B32768_d512_bf16"]
        assert no_ext["modelled_ms"] is None and no_ext["not_modelled"]
