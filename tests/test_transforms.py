"""Autograd modes beyond reverse mode: forward-mode AD, torch.func transforms, double backward.

Every public loss and the op give exact forward-mode tangents (checked against float64 central
finite differences), work under ``torch.func.grad``/``vmap``/``jacrev``/``jacfwd``, and refuse
second-order derivatives with one clear error instead of a silently constant gradient.
"""

import pytest
import torch
from torch.autograd import forward_ad

import infonce_kernels as ik

BACKENDS = ik.available_backends("cpu")
F64 = torch.float64


def _rand(*shape, seed):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
EXCLUDE = torch.tensor([[0], [3], [-1], [6], [2], [1], [0], [5]])
KEYS, PAIRS, BANK, TEXTS = _rand(7, 5, seed=1), _rand(8, 5, seed=2), _rand(6, 5, seed=3), _rand(8, 5, seed=4)

# name -> loss of one (8, 5) float64 tensor x (the variable) on a backend; the other inputs fixed.
LOSSES = {
    "lse": lambda x, b: ik.lse(x, KEYS, 1.7, exclude=EXCLUDE, backend=b).sum(),
    "lse_symmetric_labels": lambda x, b: ik.lse(x, x, 1.3, symmetric=True, exclude=torch.arange(8)[:, None],
                                                row_labels=LABELS, positive=(torch.arange(8) + 3) % 8,
                                                backend=b).sum(),
    "nt_xent": lambda x, b: ik.nt_xent(x[:4], x[4:], 0.5, backend=b),
    "info_nce": lambda x, b: ik.info_nce(x, PAIRS, temperature=0.3, backend=b),
    "info_nce_bank": lambda x, b: ik.info_nce(x, PAIRS, negative_keys=BANK,
                                              temperature=0.3, backend=b),
    "clip_loss": lambda x, b: ik.clip_loss(x, TEXTS, 4.0, backend=b),
    "supcon": lambda x, b: ik.supcon(x, LABELS, temperature=0.4, backend=b),
    "dcl": lambda x, b: ik.dcl(x[:4], x[4:], 0.5, backend=b),
    "dclw": lambda x, b: ik.dclw(x[:4], x[4:], 0.5, detach_weights=False, backend=b),
    "dhel": lambda x, b: ik.dhel(x[:4], x[4:], 0.5, backend=b),
    "kcl": lambda x, b: ik.kcl(x[:4], x[4:], backend=b),
    "hard_negative_nt_xent": lambda x, b: ik.hard_negative_nt_xent(x[:4], x[4:], 0.5, beta=0.7, backend=b),
    "debiased_nt_xent": lambda x, b: ik.debiased_nt_xent(x[:4], x[4:], 0.5, tau_plus=0.1, backend=b),
    "uniformity": lambda x, b: ik.uniformity(x, backend=b),
}


def _finite_difference(f, x, v, h=1e-6):
    return (f(x + h * v) - f(x - h * v)) / (2 * h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_forward_mode_tangent_is_exact(name, backend):
    """torch.func.jvp and torch.autograd.forward_ad give the directional derivative."""
    loss = LOSSES[name]
    x, v = _rand(8, 5, seed=10), _rand(8, 5, seed=11)
    expected = _finite_difference(lambda y: loss(y, backend), x, v)
    _, tangent = torch.func.jvp(lambda y: loss(y, backend), (x,), (v,))
    torch.testing.assert_close(tangent, expected, rtol=1e-6, atol=1e-8)
    with forward_ad.dual_level():
        dual = loss(forward_ad.make_dual(x, v), backend)
        torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_tangent_of_the_scale(backend):
    """A tangent on the (learnable) temperature and on the keys, not only on the rows."""
    q, k = _rand(6, 4, seed=20), _rand(9, 4, seed=21)
    dq, dk = _rand(6, 4, seed=22), _rand(9, 4, seed=23)
    scale, dscale = torch.tensor(1.9, dtype=F64), torch.tensor(-0.6, dtype=F64)

    def f(q, k, s):
        return ik.lse(q, k, s, backend=backend)

    _, tangent = torch.func.jvp(f, (q, k, scale), (dq, dk, dscale))
    h = 1e-6
    expected = (f(q + h * dq, k + h * dk, scale + h * dscale) - f(q - h * dq, k - h * dk, scale - h * dscale)) / (2 * h)
    torch.testing.assert_close(tangent, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacfwd_equals_jacrev_and_the_dense_formula(backend):
    q, k = _rand(5, 4, seed=30), _rand(6, 4, seed=31)
    dense = torch.func.jacrev(lambda a: torch.logsumexp(2.0 * a @ k.T, dim=1))(q)
    fwd = torch.func.jacfwd(lambda a: ik.lse(a, k, 2.0, backend=backend))(q)
    rev = torch.func.jacrev(lambda a: ik.lse(a, k, 2.0, backend=backend))(q)
    torch.testing.assert_close(fwd, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rev, dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["nt_xent", "clip_loss", "supcon", "lse_symmetric_labels"])
def test_func_grad_equals_backward(name, backend):
    loss = LOSSES[name]
    x = _rand(8, 5, seed=40)
    y = x.clone().requires_grad_()
    loss(y, backend).backward()
    torch.testing.assert_close(torch.func.grad(lambda a: loss(a, backend))(x), y.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["lse", "nt_xent", "clip_loss", "supcon"])
def test_vmap_equals_a_loop(name, backend):
    loss = LOSSES[name]
    xs = torch.stack([_rand(8, 5, seed=50 + i) for i in range(3)])
    torch.testing.assert_close(torch.func.vmap(lambda a: loss(a, backend))(xs),
                               torch.stack([loss(a, backend) for a in xs]), rtol=1e-12, atol=1e-14)
    grads = torch.func.vmap(torch.func.grad(lambda a: loss(a, backend)))(xs)
    torch.testing.assert_close(grads, torch.stack([torch.func.grad(lambda a: loss(a, backend))(a) for a in xs]),
                               rtol=1e-12, atol=1e-14)


SECOND_ORDER = "second-order derivatives .* are not supported"


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend):
    """The gradient taken with create_graph=True is right; differentiating it again raises
    (before, the fused backward silently counted as a constant)."""
    x = _rand(8, 5, seed=60).requires_grad_()
    (g,) = torch.autograd.grad(ik.nt_xent(x[:4], x[4:], 0.5, backend=backend), x, create_graph=True)
    (expected,) = torch.autograd.grad(ik.nt_xent(x[:4], x[4:], 0.5, backend=backend), x)
    torch.testing.assert_close(g, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        g.pow(2).sum().backward()
    y = _rand(8, 5, seed=61).requires_grad_()
    (g,) = torch.autograd.grad(ik.clip_loss(y, _rand(8, 5, seed=62), 3.0, backend=backend), y, create_graph=True)
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        g.sum().backward()
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        torch.func.hessian(lambda a: LOSSES["nt_xent"](a, backend))(_rand(8, 5, seed=63))
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        torch.func.grad(lambda a: torch.func.grad(lambda b: LOSSES["lse"](b, backend))(a).sum())(_rand(8, 5, seed=64))


def test_sparse_inputs_are_refused_by_name():
    x = _rand(6, 4, seed=70)
    with pytest.raises(TypeError, match="q must be a dense"):
        ik.lse(x.to_sparse(), x, 1.0)
    with pytest.raises(TypeError, match="z2 must be a dense"):
        ik.nt_xent(x[:3], x[3:].to_sparse(), 0.5)


_DISTRIBUTED = """
import sys, torch, torch.distributed as dist, infonce_kernels as ik
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
x = torch.randn(8, 5, dtype=torch.float64)
for name, run in [("grad", lambda: torch.func.grad(lambda a: ik.nt_xent(a[:4], a[4:], 0.5, gather_distributed=True))(x)),
                  ("jvp", lambda: torch.func.jvp(lambda a: ik.clip_loss(a, x, 2.0, gather_distributed=True), (x,), (x,))),
                  ("vmap", lambda: torch.func.vmap(lambda a: ik.info_nce(a, x, gather_distributed=True))(x[None]))]:
    try:
        run()
    except RuntimeError as exc:
        assert "gather_distributed=True supports ordinary (reverse-mode) autograd only" in str(exc), (name, exc)
    else:
        raise AssertionError(name + " was not refused")
loss = ik.nt_xent(x[:4].requires_grad_(), x[4:], 0.5, gather_distributed=True)  # plain autograd still works
loss.backward()
dist.destroy_process_group()
print("refused")
"""


def test_distributed_losses_refuse_transforms(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _DISTRIBUTED, str(tmp_path / "store")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "refused" in out.stdout, out.stderr[-2000:]
