"""The loss family (SupCon, DCL, DCLW, DHEL, KCL, hard-negative and debiased NT-Xent, alignment,
uniformity) against the papers' formulas written out in tests/harness.py (materialised, float64, loops
where the paper has a sum), values and gradients; fp64 gradchecks; a peer (pytorch-metric-learning) where
importable; bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from harness import (
    ALL_CPU_BACKENDS,
    CPU_BACKENDS,
    F64,
    grads_close,
    leaves,
    textbook_alignment,
    textbook_dcl,
    textbook_dhel,
    textbook_hcl,
    textbook_kcl,
    textbook_kcl_rows,
    textbook_supcon,
    textbook_uniformity,
)

import infonce_kernels as ik

# The Triton backend runs on CPU tensors only under TRITON_INTERPRET=1: tiny shapes there.
BACKENDS = ALL_CPU_BACKENDS
_leaves = leaves


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _grads_close(ours, theirs, tol=1e-9):
    grads_close(ours, theirs, tol, tol)


def _check_value_and_grad(ours_fn, ref_fn, inputs, tol=1e-10):
    """ours_fn(*leaves) and ref_fn(*leaves) agree in value ('none' reduction) and in the gradient
    of a random weighting of the per-element values."""
    a, t = _leaves(*inputs), _leaves(*inputs)
    ours, ref = ours_fn(*a), ref_fn(*t)
    _close(ours, ref, tol)
    w = torch.randn(ref.shape, dtype=F64)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    _grads_close(a, t, 100 * tol)


def _pair(b, d):
    return torch.randn(b, d, dtype=F64), torch.randn(b, d, dtype=F64)


# ------------------------------------------------------------------------------------------ SupCon
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("views", [1, 2, 3])
def test_supcon_matches_textbook(backend, views):
    b, d = (6, 4) if backend == "triton" else (10, 7)
    feats = torch.randn(b, views, d, dtype=F64)
    labels = torch.tensor([0, 1, 2, 0, 1, 5, 0, 7, 7, 9][:b])  # label 2/5/9 occur once
    ref, has = textbook_supcon(feats, labels, 0.3)
    _check_value_and_grad(lambda f: ik.supcon(f, labels, 0.3, reduction="none", backend=backend),
                          lambda f: textbook_supcon(f, labels, 0.3)[0], [feats])
    _close(ik.supcon(feats, labels, 0.3, backend=backend), ref[has].mean())
    _close(ik.supcon(feats, labels, 0.3, reduction="sum", backend=backend), ref.sum())
    # (N, d) input with per-row labels is the same loss
    flat = torch.cat(torch.unbind(feats, 1))
    _close(ik.supcon(flat, labels.repeat(views), 0.3, reduction="none", backend=backend), ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_supcon_base_temperature_and_learnable_tau(backend):
    feats = torch.randn(8, 2, 5, dtype=F64)
    labels = torch.randint(0, 3, (8,))
    tau = torch.tensor(0.2, dtype=F64)
    a, t = _leaves(feats, tau), _leaves(feats, tau)
    ours = ik.supcon(a[0], labels, a[1], base_temperature=0.07, backend=backend)
    ref, has = textbook_supcon(t[0], labels, t[1], base_tau=0.07)
    ref = ref[has].mean()
    _close(ours, ref)
    ours.backward()
    ref.backward()
    _grads_close(a, t)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_supcon_without_labels_is_simclr(backend):
    z1, z2 = _pair(9, 6)
    _close(ik.supcon(torch.stack([z1, z2], 1), temperature=0.4, reduction="none", backend=backend),
           ik.nt_xent(z1, z2, 0.4, reduction="none", backend=backend))


def test_supcon_matches_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    feats = torch.randn(12, 2, 8, dtype=F64)
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 6, 7])
    flat, flat_labels = torch.cat(torch.unbind(feats, 1)), labels.repeat(2)
    a, t = _leaves(feats), _leaves(flat)
    ours = ik.supcon(a[0], labels, 0.1)
    theirs = pml.SupConLoss(temperature=0.1)(t[0], flat_labels)
    _close(ours, theirs, 1e-8)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(torch.cat(torch.unbind(a[0].grad, 1)), t[0].grad, rtol=1e-7, atol=1e-9)
    # one view: labels 1, 2, 4, 5, 7 have no positive; both average over the anchors that have one
    single = torch.randn(12, 8, dtype=F64)
    _close(ik.supcon(single, labels, 0.1), pml.SupConLoss(temperature=0.1)(single, labels), 1e-8)


def test_supcon_bad_input():
    feats = torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match="no anchor has a positive"):
        ik.supcon(torch.randn(5, 3))
    with pytest.raises(ValueError, match="no anchor has a positive"):
        ik.supcon(torch.randn(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match="labels"):
        ik.supcon(feats, torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        ik.supcon(feats, torch.zeros(4))
    with pytest.raises(ValueError, match="features"):
        ik.supcon(torch.randn(2, 2, 2, 2))
    with pytest.raises(TypeError, match="features"):
        ik.supcon(feats.long())
    with pytest.raises(ValueError, match="temperature"):
        ik.supcon(feats, temperature=0.0)
    with pytest.raises(ValueError, match="base_temperature"):
        ik.supcon(feats, base_temperature=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        ik.supcon(feats, reduction="avg")
    bad = feats.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="features"):
        ik.supcon(bad)


def test_supcon_anchor_without_positive_is_zero_not_nan():
    feats = torch.randn(5, 1, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2, 2])
    loss = ik.supcon(feats, labels, reduction="none")
    assert loss[2] == 0 and torch.isfinite(loss).all()
    ik.supcon(feats, labels).backward()
    assert torch.isfinite(feats.grad).all()


# ------------------------------------------------------------------------------- DCL / DCLW / DHEL
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [2, 7])
def test_dcl_matches_textbook(backend, b):
    z1, z2 = _pair(b, 5)
    _check_value_and_grad(lambda x, y: ik.dcl(x, y, 0.2, reduction="none", backend=backend),
                          lambda x, y: textbook_dcl(x, y, 0.2), [z1, z2])
    ref = textbook_dcl(z1, z2, 0.2)
    _close(ik.dcl(z1, z2, 0.2, backend=backend), ref.mean())
    _close(ik.dcl(z1, z2, 0.2, reduction="sum", backend=backend), ref.sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("detach", [True, False])
def test_dclw_matches_textbook(backend, detach):
    z1, z2 = _pair(6, 5)
    _check_value_and_grad(
        lambda x, y: ik.dclw(x, y, 0.3, sigma=0.7, detach_weights=detach, reduction="none", backend=backend),
        lambda x, y: textbook_dcl(x, y, 0.3, sigma=0.7, detach=detach), [z1, z2])


def test_dcl_matches_lightly_convention_mean_over_both_views():
    """lightly's DCLLoss = 0.5 (loss0 + loss1); with its per-view negative terms merged into one
    log-sum-exp (paper Eq. 6), ours equals that mean."""
    z1, z2 = _pair(8, 6)
    u, v = F.normalize(z1, dim=1), F.normalize(z2, dim=1)

    def one_side(a, c, tau=0.1):
        eye = torch.eye(a.shape[0], dtype=torch.bool)
        s00, s01 = a @ a.T / tau, a @ c.T / tau
        neg = torch.cat([s00[~eye].view(a.shape[0], -1), s01[~eye].view(a.shape[0], -1)], 1)
        return (-s01[eye] + torch.logsumexp(neg, 1)).mean()

    _close(ik.dcl(z1, z2), 0.5 * (one_side(u, v) + one_side(v, u)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("include_augs", [True, False])
def test_dhel_matches_textbook(backend, include_augs):
    z1, z2 = _pair(6, 4)
    _check_value_and_grad(lambda x, y: ik.dhel(x, y, 0.3, include_augs, reduction="none", backend=backend),
                          lambda x, y: textbook_dhel(x, y, 0.3, include_augs), [z1, z2])
    _close(ik.dhel(z1, z2, 0.3, include_augs, backend=backend), textbook_dhel(z1, z2, 0.3, include_augs).mean())


# ------------------------------------------------------------------------------------------- KCL
@pytest.mark.parametrize("backend", BACKENDS)
def test_kcl_matches_textbook(backend):
    z1, z2 = _pair(7, 5)
    for reduction, scale in (("mean", 1), ("sum", 7)):
        a, t = _leaves(z1, z2), _leaves(z1, z2)
        ours = ik.kcl(*a, t=1.5, gamma=4.0, reduction=reduction, backend=backend)
        ref = scale * textbook_kcl(*t, 1.5, 4.0)
        _close(ours, ref)
        ours.backward()
        ref.backward()
        _grads_close(a, t)
    _check_value_and_grad(lambda x, y: ik.kcl(x, y, 1.5, 4.0, reduction="none", backend=backend),
                          lambda x, y: textbook_kcl_rows(x, y, 1.5, 4.0), [z1, z2])
    _close(textbook_kcl_rows(z1, z2, 1.5, 4.0).mean(), textbook_kcl(z1, z2, 1.5, 4.0))


def test_kcl_bad_input():
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="only the Gaussian kernel is LSE-shaped"):
        ik.kcl(z1, z2, kernel="riesz")
    with pytest.raises(ValueError, match="LSE-shaped"):
        ik.KCLLoss(kernel="imq")
    with pytest.raises(ValueError, match="unit-norm"):
        ik.kcl(z1, z2, normalize=False)
    with pytest.raises(ValueError, match="gamma"):
        ik.kcl(z1, z2, gamma=-1.0)
    with pytest.raises(ValueError, match="t must be positive"):
        ik.kcl(z1, z2, t=0.0)
    # already-normalised rows are accepted with normalize=False
    u, v = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    _close(ik.kcl(u, v, normalize=False), ik.kcl(z1, z2), 1e-6)


# -------------------------------------------------------------------- hard-negative and debiased
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau,beta,tau_plus", [(0.5, 1.0, 0.1), (0.3, 0.5, 0.0), (1.0, 2.0, 0.3)])
def test_hard_negative_matches_reference_code(backend, tau, beta, tau_plus):
    z1, z2 = _pair(6, 5)
    _check_value_and_grad(
        lambda x, y: ik.hard_negative_nt_xent(x, y, tau, beta, tau_plus, reduction="none", backend=backend),
        lambda x, y: textbook_hcl(x, y, tau, beta, tau_plus), [z1, z2], tol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau,tau_plus", [(0.5, 0.1), (0.2, 0.05), (1.0, 0.4)])
def test_debiased_matches_reference_code(backend, tau, tau_plus):
    z1, z2 = _pair(6, 5)
    _check_value_and_grad(
        lambda x, y: ik.debiased_nt_xent(x, y, tau, tau_plus, reduction="none", backend=backend),
        lambda x, y: textbook_hcl(x, y, tau, 0.0, tau_plus, "debiased"), [z1, z2], tol=1e-9)


def test_debiased_clamp_is_active_and_finite():
    """Aligned positives with a large tau_plus: (R - tau+ N pos) goes negative, the clamp holds."""
    z1 = torch.randn(6, 4, dtype=F64)
    z2 = z1 + 0.01 * torch.randn(6, 4, dtype=F64)
    ref = textbook_hcl(z1, z2, 1.0, 0.0, 0.9, "debiased")
    n = 10
    pos = torch.exp((F.normalize(z1, dim=1) * F.normalize(z2, dim=1)).sum(1))
    assert torch.allclose(ref[:6], torch.log1p(n * math.exp(-1) / pos)), "the clamp must be active here"
    a = _leaves(z1, z2)
    ours = ik.debiased_nt_xent(*a, 1.0, 0.9, reduction="none")
    _close(ours, ref)
    ours.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in a)
    # hard negatives at small tau: large logits stay finite in the log domain
    z1, z2 = torch.randn(32, 16, requires_grad=True), torch.randn(32, 16, requires_grad=True)
    loss = ik.hard_negative_nt_xent(z1, z2, 0.02, beta=3.0, tau_plus=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()


def test_debiased_with_zero_prior_is_nt_xent():
    z1, z2 = _pair(8, 5)
    # clamp N e^{-1/tau} is far below the negatives' sum at tau = 0.5 with random data
    _close(ik.debiased_nt_xent(z1, z2, 0.5, tau_plus=0.0), ik.nt_xent(z1, z2, 0.5))
    _close(ik.hard_negative_nt_xent(z1, z2, 0.5, beta=0.0, tau_plus=0.2), ik.debiased_nt_xent(z1, z2, 0.5, 0.2))


def test_hard_negative_bad_input():
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="tau_plus"):
        ik.debiased_nt_xent(z1, z2, tau_plus=1.0)
    with pytest.raises(ValueError, match="beta"):
        ik.hard_negative_nt_xent(z1, z2, beta=-0.5)
    with pytest.raises(TypeError, match="tau_plus"):
        ik.hard_negative_nt_xent(z1, z2, tau_plus="0.1")
    with pytest.raises(ValueError, match="at least 2 pairs"):
        ik.debiased_nt_xent(z1[:1], z2[:1])


# ---------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("backend", BACKENDS)
def test_uniformity_matches_wang_isola(backend):
    x = torch.randn(9, 5, dtype=F64)
    for t in (2.0, 0.5):
        a, r = _leaves(x), _leaves(x)
        ours, ref = ik.uniformity(a[0], t, backend=backend), textbook_uniformity(r[0], t)
        _close(ours, ref)
        ours.backward()
        ref.backward()
        _grads_close(a, r)


@pytest.mark.parametrize("alpha", [2, 1, 0.5, 3])
def test_alignment_matches_wang_isola(alpha):
    x, y = _pair(9, 5)
    _check_value_and_grad(lambda p, q: ik.alignment(p, q, alpha, reduction="none"),
                          lambda p, q: textbook_alignment(p, q, alpha), [x, y])
    _close(ik.alignment(x, y, alpha), textbook_alignment(x, y, alpha).mean())
    same = _leaves(x)[0]
    ik.alignment(same, same.detach(), alpha).backward()
    assert torch.isfinite(same.grad).all()


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        ik.alignment(torch.randn(3, 2), torch.randn(3, 2), alpha=0)
    with pytest.raises(ValueError, match="same number of rows"):
        ik.alignment(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2 rows"):
        ik.uniformity(torch.randn(1, 2))
    with pytest.raises(ValueError, match="unit-norm"):
        ik.uniformity(torch.randn(5, 2), normalize=False)


# -------------------------------------------------------------------------------------- gradchecks
def _gradcheck_case(loss, backend):
    def x(n=4, d=3):
        return torch.randn(n, d, dtype=F64, requires_grad=True)

    tau = torch.tensor(0.5, dtype=F64, requires_grad=True)
    if loss == "supcon":
        labels = torch.tensor([0, 1, 0, 2])
        return (lambda f, t: ik.supcon(f, labels, t, base_temperature=0.3, backend=backend)), (
            torch.randn(4, 2, 3, dtype=F64, requires_grad=True), tau)
    if loss == "dcl":
        return (lambda a, b, t: ik.dcl(a, b, t, backend=backend)), (x(), x(), tau)
    if loss == "dclw":
        return (lambda a, b, t: ik.dclw(a, b, t, detach_weights=False, backend=backend)), (x(), x(), tau)
    if loss == "dhel":
        return (lambda a, b, t: ik.dhel(a, b, t, backend=backend)), (x(), x(), tau)
    if loss == "kcl":
        return (lambda a, b, t: ik.kcl(a, b, t, 3.0, backend=backend)), (x(), x(), tau)
    if loss == "hard_negative":
        return (lambda a, b, t: ik.hard_negative_nt_xent(a, b, t, 1.5, 0.1, backend=backend)), (x(), x(), tau)
    if loss == "debiased":
        return (lambda a, b, t: ik.debiased_nt_xent(a, b, t, 0.1, backend=backend)), (x(), x(), tau)
    if loss == "uniformity":
        return (lambda a, t: ik.uniformity(a, t, backend=backend)), (x(5), tau)
    if loss == "alignment":
        return (lambda a, b: ik.alignment(a, b, 1.5)), (x(), x())
    raise AssertionError(loss)


LOSSES = ["supcon", "dcl", "dclw", "dhel", "kcl", "hard_negative", "debiased", "uniformity"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck(backend, loss):
    fn, args = _gradcheck_case(loss, backend)
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_alignment():
    """alignment is O(N d) PyTorch (no fused op), so it has no backend to vary."""
    fn, args = _gradcheck_case("alignment", BACKENDS[0])
    assert torch.autograd.gradcheck(fn, args)


# ------------------------------------------------------------------------------ common conventions
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_returns_float32(dtype):
    z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    a = _leaves(z1.to(dtype), z2.to(dtype))
    cases = [
        (ik.supcon(torch.stack(a, 1), temperature=0.5), textbook_supcon(torch.stack([z1, z2], 1).to(dtype),
                                                                        torch.arange(16), 0.5)[0].mean()),
        (ik.dcl(*a, 0.5), textbook_dcl(z1.to(dtype), z2.to(dtype), 0.5).mean()),
        (ik.dhel(*a), textbook_dhel(z1.to(dtype), z2.to(dtype), 0.3).mean()),
        (ik.kcl(*a), textbook_kcl(z1.to(dtype), z2.to(dtype), 2.0, 16.0)),
        (ik.hard_negative_nt_xent(*a), textbook_hcl(z1.to(dtype), z2.to(dtype), 0.5, 1.0, 0.1).mean()),
        (ik.uniformity(a[0]), textbook_uniformity(z1.to(dtype), 2.0)),
    ]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    total = 0
    for ours, ref in cases:
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
        total = total + ours
    total.backward()
    assert a[0].grad.dtype == dtype and torch.isfinite(a[0].grad.float()).all()


def test_modules_call_the_functions():
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.equal(ik.SupConLoss(0.2)(z1, labels), ik.supcon(z1, labels, 0.2))
    assert torch.equal(ik.DCLLoss(0.2)(z1, z2), ik.dcl(z1, z2, 0.2))
    assert torch.equal(ik.DCLWLoss(0.2, 0.4)(z1, z2), ik.dclw(z1, z2, 0.2, 0.4))
    assert torch.equal(ik.DHELLoss(0.2, False)(z1, z2), ik.dhel(z1, z2, 0.2, False))
    assert torch.equal(ik.KCLLoss(1.0, 8.0, reduction="sum")(z1, z2), ik.kcl(z1, z2, 1.0, 8.0, reduction="sum"))
    assert torch.equal(ik.HardNegativeNTXentLoss(0.3, 2.0, 0.05)(z1, z2),
                       ik.hard_negative_nt_xent(z1, z2, 0.3, 2.0, 0.05))
    assert torch.equal(ik.DebiasedNTXentLoss(0.3, 0.05)(z1, z2), ik.debiased_nt_xent(z1, z2, 0.3, 0.05))
    assert "sigma=0.4" in repr(ik.DCLWLoss(0.2, 0.4))
    with pytest.raises(ValueError, match="reduction"):
        ik.DHELLoss(reduction="avg")


@pytest.mark.parametrize("fn", [ik.dcl, ik.dclw, ik.dhel, ik.kcl, ik.hard_negative_nt_xent, ik.debiased_nt_xent])
def test_pair_losses_bad_input(fn):
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same number of rows"):
        fn(z, torch.randn(5, 3))
    with pytest.raises(TypeError, match="z2"):
        fn(z, z.double())
    with pytest.raises(TypeError, match="z1"):
        fn(z.numpy(), z)
    with pytest.raises(ValueError, match="z1"):
        fn(z[0], z)
    with pytest.raises(ValueError, match="reduction"):
        fn(z, z, reduction="avg")
    bad = z.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="z2 contains NaN or inf"):
        fn(z, bad)


def test_trainer_calling_convention():
    """The trainer calls fn(z1, z2, temperature=..., backend=...) and supcon(z, labels, temperature=...)."""
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    for fn in (ik.dcl, ik.dclw, ik.dhel, ik.hard_negative_nt_xent, ik.debiased_nt_xent):
        assert torch.isfinite(fn(z1, z2, temperature=0.3, backend="auto"))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.isfinite(ik.supcon(torch.cat([z1, z2]), torch.cat([labels, labels]), temperature=0.3))
