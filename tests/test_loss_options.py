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
