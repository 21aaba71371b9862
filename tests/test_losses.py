"""NT-Xent, InfoNCE and CLIP against the textbook formulas of tests/harness.py (materialised, float64),
gradchecks, extreme temperatures, non-contiguous inputs and stride-0 upstream gradients."""

import pytest
import torch
from harness import (
    CPU_BACKENDS,
    grads_close,
    leaves,
    textbook_clip,
    textbook_info_nce_bank,
    textbook_info_nce_in_batch,
    textbook_nt_xent,
)

import infonce_kernels as ik

_leaves, _grads_close = leaves, grads_close


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("b,d", [(2, 3), (9, 5), (70, 33)])
def test_nt_xent_matches_textbook(backend, b, d):
    z1, z2 = torch.randn(b, d, dtype=torch.float64), torch.randn(b, d, dtype=torch.float64)
    a = _leaves(z1, z2)
    t = _leaves(z1, z2)
    ours = ik.nt_xent(*a, 0.3, reduction="none", backend=backend)
    ref = textbook_nt_xent(*t, 0.3)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(2 * b, dtype=torch.float64)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    _grads_close(a, t)
    torch.testing.assert_close(ik.nt_xent(z1, z2, 0.3, backend=backend), ref.mean())
    torch.testing.assert_close(ik.nt_xent(z1, z2, 0.3, reduction="sum", backend=backend), ref.sum())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_matches_textbook(backend):
    img, txt = torch.randn(23, 16, dtype=torch.float64), torch.randn(23, 16, dtype=torch.float64)
    scale = torch.tensor(14.0, dtype=torch.float64)
    a, t = _leaves(img, txt, scale), _leaves(img, txt, scale)
    ours = ik.clip_loss(*a, backend=backend)
    ref = textbook_clip(*t)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    ours.backward()
    ref.backward()
    _grads_close(a, t)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_info_nce_bank_matches_textbook(backend):
    q, k, bank = (torch.randn(n, 12, dtype=torch.float64) for n in (19, 19, 40))
    a, t = _leaves(q, k, bank), _leaves(q, k)
    ours = ik.info_nce(a[0], a[1], negative_keys=a[2], temperature=0.2, reduction="none", backend=backend)
    ref = textbook_info_nce_bank(t[0], t[1], bank, 0.2)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    ours.sum().backward()
    ref.sum().backward()
    _grads_close(a[:2], t)
    assert a[2].grad is None, "the bank of negatives must get no gradient"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_info_nce_in_batch_matches_textbook(backend):
    q, k = torch.randn(31, 7, dtype=torch.float64), torch.randn(31, 7, dtype=torch.float64)
    a, t = _leaves(q, k), _leaves(q, k)
    ours = ik.info_nce(*a, temperature=0.07, reduction="none", backend=backend)
    ref = textbook_info_nce_in_batch(*t, 0.07)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    ours.mean().backward()
    ref.mean().backward()
    _grads_close(a, t)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "info_nce_bank", "clip"])
def test_loss_gradcheck(backend, loss):
    def x(n):
        return torch.randn(n, 4, dtype=torch.float64, requires_grad=True)

    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    if loss == "nt_xent":
        args, fn = (x(5), x(5), tau), lambda a, b, t: ik.nt_xent(a, b, t, backend=backend)
    elif loss == "info_nce":
        args, fn = (x(6), x(6), tau), lambda a, b, t: ik.info_nce(a, b, temperature=t, backend=backend)
    elif loss == "info_nce_bank":
        bank = torch.randn(9, 4, dtype=torch.float64)
        args = (x(6), x(6), tau)
        fn = lambda a, b, t: ik.info_nce(a, b, negative_keys=bank, temperature=t, backend=backend)  # noqa: E731
    else:
        args, fn = (x(6), x(6), tau * 10), lambda a, b, s: ik.clip_loss(a, b, s, backend=backend)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_learnable_temperature_gets_its_gradient(backend):
    z1, z2 = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    tau_ref = tau.detach().clone().requires_grad_()
    ik.nt_xent(z1, z2, tau, backend=backend).backward()
    textbook_nt_xent(z1, z2, tau_ref).mean().backward()
    torch.testing.assert_close(tau.grad, tau_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_temperatures_are_finite(backend):
    z1, z2 = torch.randn(64, 32, requires_grad=True), torch.randn(64, 32, requires_grad=True)
    loss = ik.nt_xent(z1, z2, 0.01, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    torch.testing.assert_close(loss.double(), textbook_nt_xent(z1.detach(), z2.detach(), 0.01).mean(), rtol=1e-4, atol=1e-4)
    img, txt = torch.randn(64, 32, requires_grad=True), torch.randn(64, 32, requires_grad=True)
    scale = torch.tensor(100.0, requires_grad=True)
    loss = ik.clip_loss(img, txt, scale, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()
    assert torch.isfinite(scale.grad)
    torch.testing.assert_close(loss.double(), textbook_clip(img.detach(), txt.detach(), 100.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_and_stride0_gradient(backend):
    base1, base2 = torch.randn(20, 24), torch.randn(24, 20)
    z1, z2 = base1[:, ::2], base2.T[:, 1::2]  # non-contiguous views
    assert not z1.is_contiguous() and not z2.is_contiguous()
    a = _leaves(z1, z2)
    c = _leaves(z1.contiguous(), z2.contiguous())
    # loss_none.sum(): the upstream gradient of the (2B,) losses is an expanded, stride-0 tensor
    la = ik.nt_xent(a[0].T.contiguous().T, a[1][:, :], 0.5, reduction="none", backend=backend)
    lc = ik.nt_xent(*c, 0.5, reduction="none", backend=backend)
    torch.testing.assert_close(la, lc)
    la.sum().backward()
    lc.sum().backward()
    _grads_close(a, c, rtol=1e-6, atol=1e-6)
    a2 = _leaves(z1, z2)
    ik.clip_loss(a2[0][::1], a2[1], 3.0, reduction="none", backend=backend).sum().backward()
    c2 = _leaves(z1.contiguous(), z2.contiguous())
    ik.clip_loss(*c2, 3.0, reduction="none", backend=backend).sum().backward()
    _grads_close(a2, c2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_views_reach_the_op(backend):
    """Non-contiguous views reach the op and a loss unnormalised, with gradients flowing back into
    their bases: the same values and gradients as contiguous copies."""
    bq, bk, bt = (torch.randn(s, requires_grad=True) for s in ((17, 24), (20, 13), (12, 20)))
    q = bq[:, ::2]  # (17, 12), column stride 2
    ex = torch.randint(0, 20, (17, 1))
    for keys, base in ((bk[:, :12], bk), (bt.T, bt)):  # row stride 13; column-major
        assert not q.is_contiguous() and not keys.is_contiguous()
        out = ik.lse(q, keys, 2.0, exclude=ex, backend=backend)
        gq, gk = torch.autograd.grad(out.square().sum(), [bq, base])
        qc, kc = q.detach().contiguous().requires_grad_(), keys.detach().contiguous().requires_grad_()
        want = ik.lse(qc, kc, 2.0, exclude=ex, backend=backend)
        wq, wk = torch.autograd.grad(want.square().sum(), [qc, kc])
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(gq[:, ::2], wq)
        assert not gq[:, 1::2].any()
        torch.testing.assert_close(gk[:, :12] if base is bk else gk.T, wk)
    z1, z2 = bq[:8, ::2], bq[9:, 1::2]  # two (8, 12) strided views of one base
    loss = ik.nt_xent(z1, z2, 0.5, normalize=False, backend=backend)
    (g,) = torch.autograd.grad(loss, [bq])
    c1, c2 = (z.detach().contiguous().requires_grad_() for z in (z1, z2))
    want = ik.nt_xent(c1, c2, 0.5, normalize=False, backend=backend)
    w1, w2 = torch.autograd.grad(want, [c1, c2])
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(g[:8, ::2], w1)
    torch.testing.assert_close(g[9:, 1::2], w2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_losses(dtype):
    z1, z2 = torch.randn(40, 32), torch.randn(40, 32)
    a = _leaves(z1.to(dtype), z2.to(dtype))
    loss = ik.nt_xent(*a, 0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and a[0].grad.dtype == dtype
    ref = textbook_nt_xent(z1.to(dtype), z2.to(dtype), 0.1).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-2, atol=1e-2)


def test_zero_row_normalises_without_nan():
    """A zero embedding in float16: the normalisation eps keeps it finite."""
    z1, z2 = torch.randn(4, 8).half(), torch.randn(4, 8).half()
    z1[0] = 0
    z1.requires_grad_()
    loss = ik.nt_xent(z1, z2, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad.float()).all()


def test_modules_call_the_functions():
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert torch.equal(ik.NTXentLoss(temperature=0.3)(z1, z2), ik.nt_xent(z1, z2, 0.3))
    assert torch.equal(ik.InfoNCELoss(temperature=0.2)(z1, z2), ik.info_nce(z1, z2, temperature=0.2))
    assert torch.equal(ik.ClipLoss(reduction="sum")(z1, z2, 10.0), ik.clip_loss(z1, z2, 10.0, reduction="sum"))
    assert "temperature=0.3" in repr(ik.NTXentLoss(temperature=0.3))


def test_compiled_loss_equals_eager():
    z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    tau = torch.tensor(0.3)
    labels = torch.randint(0, 5, (16,))

    def step(a, b, t):
        return (ik.nt_xent(a, b, t) + ik.clip_loss(a, b, 1.0 / t) + ik.info_nce(a, b, temperature=t)
                + ik.supcon(torch.stack([a, b], 1), labels, t))

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    a, c = _leaves(z1, z2, tau), _leaves(z1, z2, tau)
    out_c = compiled(*a)
    out_e = step(*c)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    out_c.backward()
    out_e.backward()
    _grads_close(a, c, rtol=1e-5, atol=1e-6)
