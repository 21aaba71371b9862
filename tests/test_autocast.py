"""Every loss and the op under ``torch.autocast("cpu")`` (bfloat16 and float16 regions), for float32
and bfloat16 inputs, on each backend that runs on CPU tensors (triton under the interpreter), as
users expect from PyTorch's own losses: the loss comes back float32, the gradients flow back in the
inputs' dtypes, and value and gradients match the float64 textbook formula on the same (rounded)
inputs by the 2x same-precision rule of the inputs' dtype (tests/harness.py). The module classes
give the functions' results under autocast too.
"""

import pytest
import torch
from harness import (
    ALL_CPU_BACKENDS,
    F64,
    assert_within,
    dense_lse,
    leaves,
    textbook_alignment,
    textbook_clip,
    textbook_dcl,
    textbook_dhel,
    textbook_hcl,
    textbook_info_nce_bank,
    textbook_info_nce_in_batch,
    textbook_kcl_rows,
    textbook_nt_xent,
    textbook_supcon,
    textbook_uniformity,
)

import infonce_kernels as ik

B, D = 6, 8
LABELS = torch.tensor([0, 1, 0, 2, 1, 3])
AUTOCAST = [torch.bfloat16, torch.float16]
INPUTS = [torch.float32, torch.bfloat16]


# name: (number of differentiable (B, D) inputs, or "views" for a (B, 2, D) tensor;
#        our call (inputs, backend) -> per-anchor losses (reduction="none") or the loss;
#        the textbook formula (inputs, dtype) -> the same)
LOSSES = {
    "nt_xent": (2, lambda x, be: ik.nt_xent(*x, 0.5, reduction="none", backend=be),
                lambda x, dt: textbook_nt_xent(*x, 0.5, dtype=dt)),
    "info_nce": (2, lambda x, be: ik.info_nce(*x, temperature=0.2, reduction="none", backend=be),
                 lambda x, dt: textbook_info_nce_in_batch(*x, 0.2, dtype=dt)),
    # the bank (a MoCo queue) is the third input, without gradient
    "info_nce_bank": (2, lambda x, be: ik.info_nce(*x[:2], negative_keys=x[2], temperature=0.2, reduction="none",
                                                   backend=be),
                      lambda x, dt: textbook_info_nce_bank(*x, 0.2, dtype=dt)),
    "clip_loss": (2, lambda x, be: ik.clip_loss(*x, 5.0, reduction="none", backend=be),
                  lambda x, dt: textbook_clip(*x, 5.0, dtype=dt, reduction="none")),
    "supcon": ("views", lambda x, be: ik.supcon(x[0], LABELS, 0.3, reduction="none", backend=be),
               lambda x, dt: textbook_supcon(x[0], LABELS, 0.3, dtype=dt)[0]),
    "dcl": (2, lambda x, be: ik.dcl(*x, 0.2, reduction="none", backend=be),
            lambda x, dt: textbook_dcl(*x, 0.2, dtype=dt)),
    "dclw": (2, lambda x, be: ik.dclw(*x, 0.3, sigma=0.7, reduction="none", backend=be),
             lambda x, dt: textbook_dcl(*x, 0.3, sigma=0.7, dtype=dt)),
    "dhel": (2, lambda x, be: ik.dhel(*x, 0.3, reduction="none", backend=be),
             lambda x, dt: textbook_dhel(*x, 0.3, dtype=dt)),
    "kcl": (2, lambda x, be: ik.kcl(*x, t=1.5, gamma=4.0, reduction="none", backend=be),
            lambda x, dt: textbook_kcl_rows(*x, 1.5, 4.0, dtype=dt)),
    "hard_negative_nt_xent": (2, lambda x, be: ik.hard_negative_nt_xent(*x, 0.5, 1.0, 0.1, reduction="none",
                                                                        backend=be),
                              lambda x, dt: textbook_hcl(*x, 0.5, 1.0, 0.1, dtype=dt)),
    "debiased_nt_xent": (2, lambda x, be: ik.debiased_nt_xent(*x, 0.5, 0.1, reduction="none", backend=be),
                         lambda x, dt: textbook_hcl(*x, 0.5, 0.0, 0.1, "debiased", dtype=dt)),
    "uniformity": (1, lambda x, be: ik.uniformity(x[0], 2.0, backend=be),
                   lambda x, dt: textbook_uniformity(x[0], 2.0, dtype=dt)),
    # alignment is plain O(N d) PyTorch (no fused op, no backend): run once
    "alignment": (2, lambda x, be: ik.alignment(*x, 2, reduction="none"),
                  lambda x, dt: textbook_alignment(*x, 2, dtype=dt)),
}

# The Triton interpreter (TRITON_INTERPRET=1) emulates bfloat16 wrongly, so the triton backend
# refuses bfloat16 there (test_triton_interpreter_refuses_bfloat16); 16-bit Triton is tested on a
# GPU (tests/gpu/).
def _runs(backend, in_dtype):
    return not (backend == "triton" and in_dtype == torch.bfloat16)


def _param(name, be, in_dtype, ac):
    return pytest.param(name, be, in_dtype, ac, id=f"{name}-{be}-{str(in_dtype)[6:]}-autocast_{str(ac)[6:]}")


CASES = [_param(name, be, in_dtype, ac) for name in LOSSES
         for be in (ALL_CPU_BACKENDS if name != "alignment" else [None])
         for in_dtype in INPUTS for ac in AUTOCAST if _runs(be, in_dtype)]


def _inputs(kind, dtype):
    if kind == "views":
        return [torch.randn(B, 2, D).to(dtype)]
    return [torch.randn(B, D).to(dtype) for _ in range(kind)]


def _weighted(out, w):
    """A scalar to differentiate: out itself, or sum_i w_i out_i for per-anchor losses."""
    return out if out.dim() == 0 else (out * w[: out.shape[0]].to(out.dtype)).sum()


def _value_and_grads(fn, xs, w):
    a = leaves(*xs)
    out = fn(a)
    _weighted(out, w).backward()
    return out.detach(), [x.grad for x in a]


def _check(what, got, grads, xs, oracle, in_dtype, w):
    """float32 result, gradients in the inputs' dtype, the 2x rule of the inputs' dtype."""
    assert got.dtype == torch.float32, f"{what}: the loss came back {got.dtype}"
    ref, rgrads = _value_and_grads(lambda a: oracle(a, F64), xs, w)
    base, bgrads = _value_and_grads(lambda a: oracle(a, in_dtype), xs, w)
    assert got.shape == ref.shape, what
    assert_within(got, ref, base, f"{what}: value", rtol=1e-5, atol=1e-6)
    for i, (g, r, b) in enumerate(zip(grads, rgrads, bgrads)):
        assert g is not None and g.dtype == in_dtype, f"{what}: grad {i} is {None if g is None else g.dtype}"
        assert_within(g, r, b, f"{what}: grad {i}", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,backend,in_dtype,ac", CASES)
def test_loss_under_autocast(name, backend, in_dtype, ac):
    kind, ours, oracle = LOSSES[name]
    xs = _inputs(kind, in_dtype)
    bank = [torch.randn(9, D).to(in_dtype)] if name == "info_nce_bank" else []
    w = torch.randn(2 * B)
    a = leaves(*xs)
    with torch.autocast("cpu", dtype=ac):
        loss = ours(a + bank, backend)
    _weighted(loss, w).backward()
    _check(f"{name} {in_dtype} under {ac}", loss.detach(), [x.grad for x in a], xs,
           lambda t, dt: oracle(t + bank, dt), in_dtype, w)


@pytest.mark.parametrize("backend,in_dtype", [
    pytest.param(be, dt, id=f"{be}-{str(dt)[6:]}") for be in ALL_CPU_BACKENDS for dt in INPUTS if _runs(be, dt)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["general", "symmetric"])
def test_lse_under_autocast(backend, in_dtype, symmetric):
    """ik.lse: (M,) float32 under autocast, dq/dk in the inputs' dtype, dscale float32."""
    m, n = 9, 13
    exclude = torch.arange(m)[:, None] if symmetric else torch.randint(-1, n, (m, 2))
    w = torch.randn(m)
    q = torch.randn(m, D).to(in_dtype)
    xs = [q] if symmetric else [q, torch.randn(n, D).to(in_dtype)]
    scale = torch.tensor(1.3)

    def call(t, dtype=None):
        k = t[0] if symmetric else t[1]
        if dtype is None:
            out = ik.lse(t[0], k, t[-1], exclude=exclude, symmetric=symmetric, backend=backend)
            assert out.dtype == torch.float32 and out.shape == (m,), out.dtype
        else:
            out = dense_lse(t[0], k, t[-1], exclude, dtype=dtype)
        return out

    for ac in AUTOCAST:
        a = leaves(*xs, scale)
        with torch.autocast("cpu", dtype=ac):
            out = call(a)
        _weighted(out, w).backward()
        what = f"lse {in_dtype} under {ac}"
        assert a[-1].grad.dtype == torch.float32, f"{what}: dscale is {a[-1].grad.dtype}"
        _check(what, out.detach(), [x.grad for x in a[:-1]], xs + [scale],
               lambda t, dt: call(t, dt), in_dtype, w)


# (the module, its function on (z1, z2, the two views stacked (B, 2, D) for SupCon))
MODULES = [
    (lambda: ik.NTXentLoss(temperature=0.3), lambda a, b, v: ik.nt_xent(a, b, 0.3)),
    (lambda: ik.InfoNCELoss(temperature=0.2), lambda a, b, v: ik.info_nce(a, b, temperature=0.2)),
    (lambda: ik.SupConLoss(0.2), lambda a, b, v: ik.supcon(v, LABELS, 0.2)),
    (lambda: ik.DCLLoss(0.2), lambda a, b, v: ik.dcl(a, b, 0.2)),
    (lambda: ik.DCLWLoss(0.2, 0.4), lambda a, b, v: ik.dclw(a, b, 0.2, 0.4)),
    (lambda: ik.DHELLoss(0.2, False), lambda a, b, v: ik.dhel(a, b, 0.2, False)),
    (lambda: ik.KCLLoss(1.0, 8.0), lambda a, b, v: ik.kcl(a, b, 1.0, 8.0)),
    (lambda: ik.HardNegativeNTXentLoss(0.3, 2.0, 0.05),
     lambda a, b, v: ik.hard_negative_nt_xent(a, b, 0.3, 2.0, 0.05)),
    (lambda: ik.DebiasedNTXentLoss(0.3, 0.05), lambda a, b, v: ik.debiased_nt_xent(a, b, 0.3, 0.05)),
]


@pytest.mark.parametrize("in_dtype", INPUTS, ids=str)
def test_modules_under_autocast(in_dtype):
    """Each module class under autocast: float32, the function's value, gradients in the inputs'
    dtype. ClipLoss takes the logit scale as a third argument."""
    z1, z2 = torch.randn(B, D).to(in_dtype), torch.randn(B, D).to(in_dtype)
    cases = MODULES + [(ik.ClipLoss, lambda a, b, v: ik.clip_loss(a, b, 10.0))]
    for make, fn in cases:
        module = make()
        for ac in AUTOCAST:
            a = leaves(z1, z2)
            # stacked outside the region: autocast's stack refuses bfloat16 under float16
            views = torch.stack(a, 1)
            with torch.autocast("cpu", dtype=ac):
                if isinstance(module, ik.SupConLoss):
                    loss = module(views, LABELS)
                elif isinstance(module, ik.ClipLoss):
                    loss = module(*a, 10.0)
                else:
                    loss = module(*a)
                want = fn(z1, z2, views.detach())
            assert loss.dtype == torch.float32, f"{module!r} under {ac}: {loss.dtype}"
            assert torch.equal(loss.detach(), want), f"{module!r} under {ac}: {loss.item()} != {want.item()}"
            loss.backward()
            for x in a:
                assert x.grad.dtype == in_dtype and torch.isfinite(x.grad.float()).all(), repr(module)


@pytest.mark.skipif("triton" not in ALL_CPU_BACKENDS, reason="triton is not installed")
def test_triton_interpreter_refuses_bfloat16():
    """Under TRITON_INTERPRET=1 bfloat16 would give wrong numbers (~1e10 for ~3): a clear error."""
    q = torch.randn(9, D).to(torch.bfloat16)
    with pytest.raises(TypeError, match="cannot run bfloat16 inputs under the Triton interpreter"):
        ik.lse(q, q, 1.0, backend="triton")
    with pytest.raises(TypeError, match="cannot run bfloat16 inputs under the Triton interpreter"):
        ik.nt_xent(q, q.flip(0), 0.5, backend="triton")
