"""Edge values of the cpu backend's kernels (csrc/cpu) against the reference backend.

Logits that overflow the accumulation dtype: a row whose logits reach +inf has r_i = +inf (the
reference's torch.logsumexp), never NaN; the other rows keep their finite values, and the
backward gives what the reference's formulas give (finite where they are finite, NaN exactly
where the reference's exp(inf - inf) is NaN).
"""
import pytest
import torch

import infonce_kernels as ik

pytestmark = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("infonce_kernels::_lse_fwd", "CPU"),
    reason="the C++ extension is not built",
)

# A dot product of two rows of `big` overflows the dtype: 3 * big^2 > max.
BIG = {torch.float32: 1e20, torch.float64: 1e200}


def _lse_and_grads(q, k, scale, backend, **kw):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    s = torch.tensor(scale, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                     requires_grad=True)
    r = ik.lse(q, k, s, backend=backend, **kw)
    weights = torch.linspace(0.5, 1.5, r.numel(), dtype=r.dtype)
    (r * weights).sum().backward()
    return r.detach(), q.grad, k.grad, s.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_logits_overflow_gives_inf_not_nan(dtype):
    q = torch.full((2, 3), BIG[dtype], dtype=dtype)
    r = ik.lse(q, q.clone(), 1.0, backend="cpu")
    ref = ik.lse(q, q.clone(), 1.0, backend="reference")
    assert torch.isinf(ref).all() and (ref > 0).all()
    torch.testing.assert_close(r, ref, rtol=0, atol=0)


def _mixed(dtype, M=5, N=7, d=4, seed=0):
    """Random rows, except row 0 of q and key 2 of k, whose dot product overflows."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(M, d, generator=g, dtype=dtype)
    k = torch.randn(N, d, generator=g, dtype=dtype)
    q[0] = BIG[dtype]
    k[2] = BIG[dtype]
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["plain", "exclude", "labels"])
def test_overflowing_row_forward_and_backward_match_reference(dtype, case):
    q, k = _mixed(dtype)
    kw = {}
    if case == "exclude":  # row 1 leaves the overflowing key out; row 0 keeps it
        kw["exclude"] = torch.tensor([[4], [2], [-1], [0], [1]])
    if case == "labels":
        kw = dict(row_labels=torch.tensor([0, 1, 1, 2, 0]), key_labels=torch.tensor([1, 0, 0, 2, 1, 0, 2]),
                  positive=torch.tensor([2, 0, -1, 3, 5]))
    got = _lse_and_grads(q, k, 0.5, "cpu", **kw)
    want = _lse_and_grads(q, k, 0.5, "reference", **kw)
    assert torch.isinf(want[0][0]) and torch.isfinite(want[0][1:]).all()
    for name, a, b in zip(("lse", "dq", "dk", "dscale"), got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), (name, a, b)
        assert torch.equal(torch.isinf(a), torch.isinf(b)), (name, a, b)
        fin = torch.isfinite(b)
        # Finite entries: the 2x same-precision rule is moot here (the overflowing terms are
        # exactly 0 or inf); the rest is an ordinary float comparison.
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(a[fin], b[fin], rtol=tol, atol=tol, msg=name)
    # The finite rows' gradient really is finite (no inf - inf leaked into them).
    assert torch.isfinite(got[1][1:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overflowing_row_symmetric_matches_reference(dtype):
    z, _ = _mixed(dtype, M=6)
    z[3] = BIG[dtype]
    got = ik.lse(z, None, 1.0, symmetric=True, exclude=torch.arange(6)[:, None], backend="cpu")
    want = ik.lse(z, None, 1.0, symmetric=True, exclude=torch.arange(6)[:, None], backend="reference")
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not torch.isnan(got).any()
    torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)])


def test_overflow_across_key_blocks():
    """The overflowing key sits in the second 1024-key block, after finite blocks: the running
    (max, sum) state moves from finite to +inf mid-row."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, generator=g)
    k = torch.randn(1500, 4, generator=g)
    q[1] = BIG[torch.float32]
    k[1200] = BIG[torch.float32]
    got = ik.lse(q, k, 1.0, backend="cpu")
    want = ik.lse(q, k, 1.0, backend="reference")
    assert torch.isinf(got[1]) and got[1] > 0
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]])
