"""Loss options shared by every loss: temperature modules, info_nce's third positional argument,
the temperature-overflow message, deterministic SupCon, and degenerate rows in kcl/uniformity."""

import warnings

import pytest
import torch
from conftest import CPU_BACKENDS

import infonce_kernels as ik

BACKEND = "cpu" if "cpu" in CPU_BACKENDS else "reference"


def _views(b=6, d=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------- temperature modules
@pytest.mark.parametrize("fn", [ik.nt_xent, ik.dcl, ik.dhel, ik.debiased_nt_xent, ik.hard_negative_nt_xent])
def test_learnable_temperature_accepted_by_functions(fn):
    z1, z2 = _views(dtype=torch.float32)
    tau = ik.LearnableTemperature(0.3)
    loss = fn(z1, z2, tau, backend=BACKEND)
    torch.testing.assert_close(loss, fn(z1, z2, tau().detach(), backend=BACKEND), rtol=0, atol=0)
    loss.backward()
    assert tau.log_scale.grad is not None and tau.log_scale.grad.abs() > 0


def test_schedule_accepted_as_temperature():
    z1, z2 = _views()
    sched = ik.LinearTemperature(0.5, 0.1, 10)
    for _ in range(3):
        sched.step()
    assert ik.nt_xent(z1, z2, sched, backend=BACKEND).item() == ik.nt_xent(z1, z2, sched.temperature,
                                                                            backend=BACKEND).item()
    assert ik.info_nce(z1, z2, sched, backend=BACKEND).item() == ik.info_nce(z1, z2, temperature=sched.temperature,
                                                                             backend=BACKEND).item()


@pytest.mark.parametrize("cls", [ik.NTXentLoss, ik.InfoNCELoss, ik.SupConLoss, ik.DCLLoss, ik.DCLWLoss, ik.DHELLoss,
                                 ik.DebiasedNTXentLoss, ik.HardNegativeNTXentLoss])
def test_module_registers_learnable_temperature(cls):
    tau = ik.LearnableTemperature(0.2)
    module = cls(temperature=tau, backend=BACKEND)
    assert any(p is tau.log_scale for p in module.parameters())
    z1, z2 = _views(dtype=torch.float32)
    loss = module(torch.stack([z1, z2], 1)) if cls is ik.SupConLoss else module(z1, z2)
    loss.backward()
    assert tau.log_scale.grad is not None and tau.log_scale.grad.abs() > 0


# ----------------------------------------------------------------------------- info_nce's third argument
def test_info_nce_third_positional_is_the_temperature():
    q, k = _views()
    assert ik.info_nce(q, k, 0.3, backend=BACKEND).item() == ik.info_nce(q, k, temperature=0.3,
                                                                         backend=BACKEND).item()
    t = torch.tensor(0.3, dtype=torch.float64)
    assert ik.info_nce(q, k, t, backend=BACKEND).item() == ik.info_nce(q, k, temperature=0.3, backend=BACKEND).item()
    with pytest.raises(TypeError, match="temperature both"):
        ik.info_nce(q, k, 0.3, temperature=0.2)
    with pytest.raises(TypeError, match="at most 3 positional"):
        ik.info_nce(q, k, 0.3, 0.2)


def test_info_nce_positional_bank_is_deprecated():
    q, k = _views()
    bank = torch.randn(9, 5, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="negative_keys="):
        old = ik.info_nce(q, k, bank, temperature=0.2, backend=BACKEND)
    assert old.item() == ik.info_nce(q, k, temperature=0.2, negative_keys=bank, backend=BACKEND).item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(TypeError, match="both"):
            ik.info_nce(q, k, bank, negative_keys=bank)


# ----------------------------------------------------------------------------- temperature overflow
@pytest.mark.parametrize("tau", [1e-39, torch.tensor(1e-39)])
def test_temperature_whose_inverse_overflows(tau):
    z1, z2 = _views(dtype=torch.float32)
    for fn in (ik.nt_xent, ik.dcl, ik.supcon):
        args = (torch.stack([z1, z2], 1), None) if fn is ik.supcon else (z1, z2)
        with pytest.raises(ValueError, match="too small: 1/temperature overflows float32"):
            fn(*args, tau, backend=BACKEND)
    with pytest.raises(ValueError, match="too small: 1/temperature overflows float32"):
        ik.info_nce(z1, z2, temperature=tau, backend=BACKEND)


def test_tiny_temperature_fine_in_float64_and_negative_still_refused():
    z1, z2 = _views()
    assert torch.isfinite(ik.nt_xent(z1, z2, 1e-39, normalize=True, backend=BACKEND))
    with pytest.raises(ValueError, match="must be positive and finite"):
        ik.nt_xent(z1, z2, -0.5)


# ----------------------------------------------------------------------------- deterministic SupCon
def test_supcon_bitwise_reproducible_across_runs_and_threads():
    def run(threads):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            g = torch.Generator().manual_seed(0)
            z = torch.randn(2048, 64, generator=g).requires_grad_()
            y = torch.randint(0, 3, (2048,), generator=g)
            loss = ik.supcon(z, y, 0.1, backend=BACKEND)
            loss.backward()
            return loss.detach(), z.grad
        finally:
            torch.set_num_threads(old)

    one, two, again = run(1), run(2), run(2)
    for a, b in ((one, two), (two, again)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- degenerate rows
def _wang_isola_uniformity(x, t):
    return torch.pdist(torch.nn.functional.normalize(x, dim=1), p=2).pow(2).mul(-t).exp().mean().log()


def _kcl_formula(x, y, t, gamma):
    u, w = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    align = torch.exp(-t * (u - w).pow(2).sum(1)).mean()
    energy = sum(torch.pdist(a, p=2).pow(2).mul(-t).exp().mean() for a in (u, w))
    return -2 * align + gamma * energy


@pytest.mark.parametrize("size", [0.0, 1e-20], ids=["zero-row", "tiny-row"])
def test_uniformity_and_kcl_with_degenerate_rows_equal_their_formulas(size):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    x[3] *= size
    y[6] *= size
    for backend in CPU_BACKENDS:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = ik.uniformity(a, 2.0, backend=backend), _wang_isola_uniformity(b, 2.0)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(got, a)[0], torch.autograd.grad(want, b)[0],
                                   rtol=1e-9, atol=1e-9)
        a, b = (x.clone().requires_grad_(), y.clone()), (x.clone().requires_grad_(), y.clone())
        got, want = ik.kcl(*a, 2.0, 16.0, backend=backend), _kcl_formula(*b, 2.0, 16.0)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(got, a[0])[0], torch.autograd.grad(want, b[0])[0],
                                   rtol=1e-9, atol=1e-9)
        per_row = ik.kcl(x, y, 2.0, 16.0, reduction="none", backend=backend)
        torch.testing.assert_close(per_row.mean(), want.detach(), rtol=1e-12, atol=1e-12)
