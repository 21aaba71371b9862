"""CLIP's backward by G blocks and GEMMs (``infonce_kernels/triton/_pair_gemm.py``: d beyond one
output chunk of the paired kernel) under the Triton interpreter.

The memory budget is shrunk so that the interpreter's small cases cut into several row bands and
column groups (ragged last ones); float64 oracle, 2x same-precision rule, every gradient (da, db
and the scale's): the forward is unchanged (the one-pass pair forward)."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from infonce_kernels.triton import _config  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _config.interpret_mode(), reason="needs TRITON_INTERPRET=1 set before the process starts"
)

import infonce_kernels  # noqa: E402
import infonce_kernels.triton as tb  # noqa: E402
from harness import assert_within  # noqa: E402
from infonce_kernels.ops import fused_lse_pair  # noqa: E402
from infonce_kernels.triton import _pair_gemm  # noqa: E402

F64 = torch.float64
CPU = torch.device("cpu")
#: d beyond the interpreter's paired output chunk (2 x INTERPRET_BLOCK_D = 64), not a multiple of 16
D = 2 * 2 * _config.INTERPRET_BLOCK_D + 6


def pair_grads(a, b, s, g_r, g_t, fn):
    """(da, db, ds) of sum(g_r r) + sum(g_t t) for (r, t) = fn(a, b, s), on leaf copies."""
    leaves = [v.detach().clone().requires_grad_() for v in (a, b, s)]
    r, t = fn(*leaves)
    ((r * g_r.to(r.dtype)).sum() + (t * g_t.to(t.dtype)).sum()).backward()
    return [v.grad for v in leaves]


def plain(a, b, s):
    """PyTorch's CLIP log-sum-exps, materialised, in the inputs' precision."""
    logits = s.to(a.dtype) * (a @ b.T)
    return logits.logsumexp(1), logits.logsumexp(0)


class TestPairGemm:
    @staticmethod
    def force(monkeypatch, M, N, d, dtype, budget, wide_groups=True):
        plan = _pair_gemm.plan
        monkeypatch.setattr(_pair_gemm, "plan", lambda *a, **k: plan(*a, **dict(k, budget=budget)))
        monkeypatch.setattr(_pair_gemm, "TARGET_PROGRAMS", 2)       # programs that loop over column blocks
        calls = []
        run = _pair_gemm.pair_gradients
        monkeypatch.setattr(_pair_gemm, "pair_gradients", lambda *a: calls.append(a[-1]) or run(*a))
        p = _pair_gemm.plan(M, N, -(-d // 16) * 16, dtype, CPU)
        assert tb.uses_backward_pair(CPU, dtype, d)
        # several bands (the last one short) and column groups (of more than one column block)
        assert p.groups >= 2 and -(-M // p.band) >= 2 and M % p.band and (p.cols > p.BLOCK_N or not wide_groups), p
        return calls

    @pytest.mark.parametrize("M,N,dtype,budget,g_size", [
        (37, 37, torch.float16, 2.1, 1.0),          # odd square batch (CLIP), unit upstream gradients
        (37, 37, torch.float16, 2.1, 1e-6),         # a mean reduction's tiny g: no fp16 underflow of G
        (40, 45, torch.float32, 1.6, 1.0),          # tf32 products (fp32 inputs), rectangular
    ], ids=["fp16-odd", "fp16-tiny-g", "fp32-tf32-rect"])
    def test_against_float64(self, monkeypatch, M, N, dtype, budget, g_size):
        if dtype == torch.float32:      # tf32 products (the interpreter computes them in fp32)
            monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
        calls = self.force(monkeypatch, M, N, D, dtype, budget)
        gen = torch.Generator().manual_seed(M * N)
        a = torch.nn.functional.normalize(torch.randn(M, D, generator=gen, dtype=F64), dim=1)
        b = torch.nn.functional.normalize(torch.randn(N, D, generator=gen, dtype=F64), dim=1)
        s = torch.tensor(14.0, dtype=F64)
        g_r = torch.rand(M, generator=gen, dtype=F64) * g_size
        g_t = (torch.rand(N, generator=gen, dtype=F64) - 0.3) * g_size
        got = pair_grads(a.to(dtype), b.to(dtype), s.float(), g_r, g_t,
                         lambda *v: fused_lse_pair(*v, backend="triton"))
        assert len(calls) == 1
        want = pair_grads(a, b, s, g_r, g_t, plain)
        base = pair_grads(a.to(dtype), b.to(dtype), s.to(dtype), g_r, g_t, plain)
        for name, x, w, p in zip(("da", "db", "dscale"), got, want, base):
            assert x.dtype == (dtype if name != "dscale" else torch.float32) and x.shape == w.shape
            assert_within(x, w, p, name, rtol=1e-6, atol=1e-12 * g_size)

    def test_clip_loss_temperature_gradient(self, monkeypatch):
        """clip_loss on the path (fp16 features, a learnable scale): loss, both features' and the
        scale's gradients against float64, 2x rule."""
        B = 21
        calls = self.force(monkeypatch, B, B, D, torch.float16, 2.5, wide_groups=False)
        gen = torch.Generator().manual_seed(5)
        img, txt = torch.randn(B, D, generator=gen, dtype=F64), torch.randn(B, D, generator=gen, dtype=F64)

        def run(dtype, backend):
            leaves = [img.to(dtype, copy=True).requires_grad_(), txt.to(dtype, copy=True).requires_grad_(),
                      torch.tensor(20.0, dtype=torch.float32 if dtype == torch.float16 else dtype, requires_grad=True)]
            loss = infonce_kernels.clip_loss(*leaves, backend=backend)
            loss.backward()
            return [loss.detach()] + [v.grad for v in leaves]

        got = run(torch.float16, "triton")
        assert len(calls) == 1
        want = run(F64, "reference")
        base = run(torch.float16, "reference")
        for name, x, w, p in zip(("loss", "dimg", "dtxt", "dscale"), got, want, base):
            assert_within(x, w, p, name, rtol=1e-6)

    def test_routing(self):
        """The path takes 16-bit / tf32 inputs whose d spans several paired output chunks; exact
        fp32, fp64 and one-chunk d keep the paired kernel."""
        assert tb.uses_backward_pair(CPU, torch.float16, D)
        assert not tb.uses_backward_pair(CPU, torch.float16, 2 * _config.INTERPRET_BLOCK_D)
        assert not tb.uses_backward_pair(CPU, F64, D)
        if torch.get_float32_matmul_precision() == "highest":
            assert not tb.uses_backward_pair(CPU, torch.float32, D)

    def test_headline_plan_fits_half_the_embeddings(self, monkeypatch):
        """The headline shape's plan on sm_90 (B = 32,768, d = 512, bf16): scratch <= 0.5x the
        embeddings, bands of MIN_BAND_ROWS."""
        monkeypatch.setattr(_config, "interpret_mode", lambda: False)
        monkeypatch.setattr(_config, "_capability", lambda device: (9, 0))
        B, d = 32768, 512
        p = _pair_gemm.plan(B, B, d, torch.bfloat16, torch.device("meta"))
        emb = 2 * B * d * 2
        assert p.scratch_bytes(d, torch.bfloat16) <= 0.5 * emb
        assert (p.band, p.groups, p.cols) == (2048, 8, 4096), p

    def test_opcheck_pair_backward_op(self):
        """The one-call backward op (``_lse_pair_backward``): torch.library.opcheck (schema, fake
        tensor) on the path's inputs."""
        gen = torch.Generator().manual_seed(3)
        a, b = torch.randn(9, D, generator=gen).half(), torch.randn(7, D, generator=gen).half()
        s = torch.tensor(2.0)
        r, t = tb.forward_pair(a, b, s)
        g_r, g_t = torch.rand(9, generator=gen), torch.rand(7, generator=gen)
        torch.library.opcheck(torch.ops.infonce_kernels._lse_pair_backward.default, (a, b, s, r, t, g_r, g_t, "triton"),
                              test_utils=("test_schema", "test_faketensor"))
