"""Triton pairwise sigmoid (SigLIP) kernels under the Triton interpreter (CPU tensors; fp32 and fp16).

The backend functions ``infonce_kernels.triton.sigmoid_forward`` / ``sigmoid_backward`` (the
contract of the ``_sigmoid_fwd`` / ``_sigmoid_bwd`` ops) against a float64 dense oracle written
here, under the 2x same-precision rule: the loss rows, dx, dy, dscale and dbias; with and without
labels; positive and negative offsets; rectangular inputs; shapes around the interpreter's tiles
(16 rows, d chunks of 32, so both the one-chunk and the d-chunked paths run); the fused forward
(``with_grad=True``) against the general backward with a uniform upstream gradient; the extremes
t = 100, b = -10.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from infonce_kernels.triton import _config  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _config.interpret_mode(), reason="needs TRITON_INTERPRET=1 set before the process starts"
)

import infonce_kernels as ik  # noqa: E402
import infonce_kernels.triton as tb  # noqa: E402
from infonce_kernels.triton import _sigmoid, _sigmoid_gemm  # noqa: E402
from harness import assert_within  # noqa: E402

F64 = torch.float64


def dense_sigmoid(x, y, t, b, labels, offset, g, dtype):
    """Oracle (dtype float64) or plain PyTorch computation (the inputs' dtype), materialised:
    (rows, dx, dy, dt, db) with rows_i = sum_j softplus(-z_ij l_ij), l = t x y^T + b, and the
    gradients of sum_i g_i rows_i by autograd."""
    acc = F64 if dtype == F64 else torch.float32
    xs, ys, ts, bs = (v.to(w, copy=True).requires_grad_() for v, w in ((x, dtype), (y, dtype), (t, acc), (b, acc)))
    M, N = x.shape[0], y.shape[0]
    if labels:
        pos = labels[0][:, None] == labels[1][None, :]
    else:
        pos = (torch.arange(N)[None, :] - torch.arange(M)[:, None]) == offset
    logits = (xs @ ys.T) * ts.to(dtype) + bs.to(dtype)
    z = torch.where(pos, 1.0, -1.0).to(dtype)
    rows = F.softplus(-z * logits).to(acc).sum(1)
    rows.backward(g.to(acc))
    return rows.detach(), xs.grad, ys.grad, ts.grad, bs.grad


def make(M, N, d, dtype, *, t=3.0, b=-0.5, labels=False, classes=3, seed=0, unit=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, d, generator=gen, dtype=F64)
    y = torch.randn(N, d, generator=gen, dtype=F64)
    if unit:
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    else:
        x, y = x / d ** 0.5, y / d ** 0.5
    x, y = x.to(dtype), y.to(dtype)
    lab = (torch.randint(0, classes, (M,), generator=gen), torch.randint(0, classes, (N,), generator=gen)) \
        if labels else ()
    g = torch.rand(M, generator=gen, dtype=F64) + 0.5
    return x, y, torch.tensor(t), torch.tensor(b), lab, g


def check_all(got, x, y, t, b, lab, off, g, what, rtol):
    ref = dense_sigmoid(x, y, t, b, lab, off, g, F64)
    same = dense_sigmoid(x, y, t, b, lab, off, g, x.dtype)
    wants = (torch.float32, x.dtype, y.dtype, torch.float32, torch.float32)
    for name, a, r, c, want in zip(("rows", "dx", "dy", "dscale", "dbias"), got, ref, same, wants):
        assert a.dtype == want and a.shape == r.shape, (what, name, a.dtype, a.shape)
        assert_within(a, r, c, f"{what} {name}", rtol=rtol)


# (M, N, d): ragged rectangles around the 16-row tiles; d = 20: one d chunk (the sweeps),
# d = 40: two chunks of 32 (the loss-only sweep's chunked S; the gradients' G-block + GEMM path)
CASES = [
    # M, N, d, labels, offset
    (37, 29, 20, False, 0),
    (33, 47, 40, False, 5),
    (40, 21, 20, False, -7),
    (31, 35, 40, True, 0),
]


@pytest.mark.parametrize("M,N,d,labels,offset", CASES)
def test_fused_forward_and_backward_match_float64(M, N, d, labels, offset):
    x, y, t, b, lab, g = make(M, N, d, torch.float32, labels=labels, seed=M + N + d)
    ones = torch.ones(M, dtype=F64)
    fused = tb.sigmoid_forward(x, y, t, b, lab, offset, True)
    check_all(fused, x, y, t, b, lab, offset, ones, "with_grad", rtol=1e-6)
    (rows,) = tb.sigmoid_forward(x, y, t, b, lab, offset, False)
    if _sigmoid.uses_gemm_path(x.device, x.dtype, d):       # loss terms summed per column program
        torch.testing.assert_close(rows, fused[0], rtol=1e-6, atol=0)
    else:
        assert torch.equal(rows, fused[0])                   # the same sweep, the same rounding
    bwd = tb.sigmoid_backward(g.float(), x, y, t, b, lab, offset)
    check_all((rows,) + tuple(bwd), x, y, t, b, lab, offset, g, "backward", rtol=1e-6)
    # the fused gradients are the general backward's for a uniform upstream gradient
    uni = tb.sigmoid_backward(torch.ones(M), x, y, t, b, lab, offset)
    for name, a, c in zip(("dx", "dy", "dscale", "dbias"), fused[1:], uni):
        assert torch.equal(a, c), name


def test_extremes_and_half_precision():
    # t = 100, b = -10 on unit rows: logits in [-110, 90]; positives far from the negatives
    x, y, t, b, lab, g = make(35, 26, 40, torch.float32, t=100.0, b=-10.0, unit=True, seed=3)
    got = tb.sigmoid_forward(x, y, t, b, lab, 2, True)
    check_all(got, x, y, t, b, lab, 2, torch.ones(35, dtype=F64), "t=100 b=-10", rtol=1e-6)
    # fp16 inputs (fp32 accumulation): against the plain fp16 computation
    x, y, t, b, lab, g = make(34, 19, 20, torch.float16, t=10.0, b=-10.0, unit=True, seed=4)
    got = tb.sigmoid_forward(x, y, t, b, lab, -3, True)
    check_all(got, x, y, t, b, lab, -3, torch.ones(34, dtype=F64), "fp16", rtol=1e-3)


def test_bfloat16_refused_under_the_interpreter():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        tb.sigmoid_forward(x, x, torch.tensor(1.0), torch.tensor(0.0), (), 0, False)


class TestGemmPath:
    """The G-block + GEMM path (``_sigmoid_gemm``: d beyond one sweep chunk), its memory budget
    shrunk so that the interpreter's small cases cut into several row bands and column groups
    (ragged last ones): float64 oracle, 2x rule, values and every gradient."""

    @staticmethod
    def force(monkeypatch, M, N, d, dtype, budget, wide_groups=True):
        plan = _sigmoid_gemm.plan
        monkeypatch.setattr(_sigmoid_gemm, "plan", lambda *a, **k: plan(*a, **dict(k, budget=budget)))
        monkeypatch.setattr(_sigmoid_gemm, "TARGET_PROGRAMS", 2)    # programs that loop over column blocks
        p = _sigmoid_gemm.plan(M, N, d, dtype, torch.device("cpu"))
        assert _sigmoid.uses_gemm_path(torch.device("cpu"), dtype, d)
        # several bands (the last one short) and column groups (of more than one ragged column block)
        assert p.groups >= 2 and -(-M // p.band) >= 2 and M % p.band and (p.cols > p.BLOCK_N or not wide_groups), p
        return p

    @pytest.mark.parametrize("M,N,labels,offset,dtype,budget", [
        (20, 40, False, 0, torch.float32, 1.8),
        (20, 36, True, 0, torch.float32, 1.8),
        (20, 40, False, -4, torch.float16, 2.4),
    ], ids=["fp32", "fp32-labels-rect", "fp16-offset"])
    def test_against_float64(self, monkeypatch, M, N, labels, offset, dtype, budget):
        d = 40
        self.force(monkeypatch, M, N, d, dtype, budget)
        x, y, t, b, lab, g = make(M, N, d, dtype, t=10.0, b=-10.0, labels=labels, unit=True, seed=M + N)
        rtol = 1e-6 if dtype == torch.float32 else 1e-3
        fused = tb.sigmoid_forward(x, y, t, b, lab, offset, True)
        check_all(fused, x, y, t, b, lab, offset, torch.ones(M, dtype=F64), "gemm with_grad", rtol=rtol)
        bwd = tb.sigmoid_backward(g.float(), x, y, t, b, lab, offset)
        check_all((fused[0],) + tuple(bwd), x, y, t, b, lab, offset, g, "gemm backward", rtol=rtol)

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_loss_reductions(self, monkeypatch, reduction):
        # the op and loss layers on top of the path: fused gradients ("mean", "sum") and the
        # recomputing backward ("none", a per-row upstream gradient)
        B, d = 20, 40
        self.force(monkeypatch, B, B, d, torch.float32, 1.8, wide_groups=False)
        x, y, t, b, _, g = make(B, B, d, torch.float32, t=10.0, b=-10.0, unit=True, seed=7)
        lab = torch.randint(0, 4, (B,), generator=torch.Generator().manual_seed(7))

        def run(dtype, fn):
            leaves = [v.detach().to(w, copy=True).requires_grad_() for v, w in ((x, dtype), (y, dtype), (t, dtype), (b, dtype))]
            out = fn(*leaves)
            (out * g.to(out.dtype)).sum().backward() if reduction == "none" else out.backward()
            return [out.detach()] + [v.grad for v in leaves]

        def oracle(dtype):
            def fn(xs, ys, ts, bs):
                logits = ts * xs @ ys.T + bs
                z = (lab[:, None] == lab[None, :]).to(dtype) * 2 - 1
                rows = F.softplus(-z * logits).sum(1)
                return {"mean": rows.sum() / B, "sum": rows.sum(), "none": rows}[reduction]
            return run(dtype, fn)

        got = run(torch.float32, lambda *a: ik.siglip_loss(*a, labels=lab, reduction=reduction, backend="triton"))
        for name, a, r, c in zip(("loss", "dx", "dy", "dt", "db"), got, oracle(F64), oracle(torch.float32)):
            assert_within(a, r, c, f"{reduction} {name}", rtol=1e-6)
