"""LearnableTemperature (gradient through the fused op's d(scale), clamp) and the temperature
schedules (values, monotonicity, state round-trip, bad settings)."""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS

import infonce_kernels as ik


def textbook_nt_xent(z1, z2, tau):
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return (torch.logsumexp(sim, 1) - sim[torch.arange(2 * n), pos]).mean()


# ------------------------------------------------------------------------------ LearnableTemperature
def test_learnable_temperature_value_and_parameter():
    lt = ik.LearnableTemperature(0.07, max_scale=100.0)
    params = list(lt.parameters())
    assert len(params) == 1 and params[0] is lt.log_scale
    torch.testing.assert_close(lt.log_scale.detach(), torch.tensor(math.log(1 / 0.07)))
    torch.testing.assert_close(lt(), torch.tensor(0.07))
    torch.testing.assert_close(lt.scale, torch.tensor(1 / 0.07))
    assert abs(lt.value - 0.07) < 1e-7 and lt.temperature == lt.value
    assert "max_scale=100.0" in repr(lt)
    assert set(lt.state_dict()) == {"log_scale"}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_learnable_temperature_gradient_reaches_parameter(backend):
    """d loss / d log(1/tau) through the op's dscale equals the textbook's autograd gradient."""
    z1, z2 = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    lt = ik.LearnableTemperature(0.2).double()
    ik.nt_xent(z1, z2, lt(), backend=backend).backward()
    log_scale = lt.log_scale.detach().clone().requires_grad_()
    textbook_nt_xent(z1, z2, torch.exp(-log_scale)).backward()
    assert lt.log_scale.grad is not None and lt.log_scale.grad.abs() > 0
    torch.testing.assert_close(lt.log_scale.grad, log_scale.grad, rtol=1e-9, atol=1e-12)
    # the op's own d(scale) alone carries a gradient: the lse part of the loss depends on tau
    lt.zero_grad()
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    ik.lse(z, None, lt.scale, exclude=torch.arange(20)[:, None], symmetric=True, backend=backend).sum().backward()
    assert lt.log_scale.grad.abs() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_learnable_temperature_drives_the_loss_family(backend):
    z1, z2 = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    lt = ik.LearnableTemperature(0.3).double()
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
    losses = [ik.supcon(torch.stack([z1, z2], 1), labels, lt(), backend=backend),
              ik.dcl(z1, z2, lt(), backend=backend), ik.dhel(z1, z2, lt(), backend=backend),
              ik.clip_loss(z1, z2, lt.scale, backend=backend)]
    for loss in losses:
        lt.zero_grad()
        loss.backward()
        assert torch.isfinite(lt.log_scale.grad) and lt.log_scale.grad.abs() > 0


def test_learnable_temperature_clamp():
    lt = ik.LearnableTemperature(0.05, max_scale=50.0)
    with torch.no_grad():
        lt.log_scale.fill_(math.log(400.0))  # 1/tau = 400 > max_scale
    torch.testing.assert_close(lt(), torch.tensor(1 / 50.0))
    torch.testing.assert_close(lt.scale, torch.tensor(50.0))
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    ik.nt_xent(z1, z2, lt()).backward()
    assert lt.log_scale.grad == 0, "no gradient while clamped (as a clamped logit_scale)"
    lt.clamp_()
    torch.testing.assert_close(lt.log_scale.detach(), torch.tensor(math.log(50.0)))
    with pytest.raises(ValueError, match="init"):
        ik.LearnableTemperature(0.001, max_scale=100.0)
    with pytest.raises(ValueError, match="max_scale"):
        ik.LearnableTemperature(0.1, max_scale=0.0)
    with pytest.raises(TypeError, match="init"):
        ik.LearnableTemperature("0.1")


def test_learnable_temperature_trains():
    """A few SGD steps on a fixed batch move tau (the gradient is used, not just computed)."""
    z1 = torch.randn(16, 8)
    z2 = z1 + 0.1 * torch.randn(16, 8)
    lt = ik.LearnableTemperature(0.5)
    opt = torch.optim.SGD(lt.parameters(), lr=0.5)
    start = lt.value
    for _ in range(5):
        opt.zero_grad()
        ik.nt_xent(z1, z2, lt()).backward()
        opt.step()
    assert lt.value < start  # well-aligned positives: a lower temperature lowers the loss


# ------------------------------------------------------------------------------------------ schedules
def _run(schedule, steps):
    values = [schedule.temperature]
    for _ in range(steps):
        values.append(schedule.step())
    return values


def test_constant_schedule():
    s = ik.ConstantTemperature(0.2)
    assert _run(s, 5) == [0.2] * 6 and s.value == 0.2 and s.scale == 5.0


def test_linear_schedule_values_and_monotonicity():
    s = ik.LinearTemperature(0.5, 0.1, total_steps=4)
    values = _run(s, 6)
    assert values == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1])
    assert all(a >= b for a, b in zip(values, values[1:]))
    up = _run(ik.LinearTemperature(0.1, 0.3, total_steps=10), 12)
    assert all(a <= b for a, b in zip(up, up[1:])) and up[-1] == pytest.approx(0.3)


def test_cosine_schedule_values_and_monotonicity():
    s = ik.CosineTemperature(0.5, 0.1, total_steps=10)
    values = _run(s, 12)
    assert values[0] == pytest.approx(0.5) and values[5] == pytest.approx(0.3) and values[10] == pytest.approx(0.1)
    assert values[11] == values[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert s.temperature_at(2) == pytest.approx(0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi * 0.2)))


def test_step_schedule():
    s = ik.StepTemperature(0.8, step_size=3, gamma=0.5, final=0.15)
    values = _run(s, 10)
    assert values == pytest.approx([0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2, 0.2, 0.2, 0.15, 0.15])
    assert ik.StepTemperature(0.1, step_size=2, gamma=2.0, final=0.3).temperature_at(10) == pytest.approx(0.3)


def test_logarithmic_annealing():
    s = ik.LogarithmicAnnealing(beta0=2.0, t0=10.0, beta_max=5.0)
    assert s.temperature == pytest.approx(0.5)  # beta(0) = beta0 ln(e) = beta0
    for t in (1, 7, 10, 100):
        beta = min(2.0 * math.log(math.e + t / 10.0), 5.0)
        assert s.temperature_at(t) == pytest.approx(1 / beta)
        assert s.inverse_temperature_at(t) == pytest.approx(beta)
    values = _run(s, 200)
    assert all(a >= b for a, b in zip(values, values[1:])), "tau must not increase"
    assert values[-1] == pytest.approx(0.2)  # capped: beta0 ln(e + 20) = 6.2 > beta_max
    assert ik.LogarithmicAnnealing(1.0, 1.0).temperature_at(10**9) > 0  # no cap: keeps decreasing slowly
    f = ik.LogarithmicAnnealing.from_temperatures(0.5, t0=100.0, minimum=0.05)
    assert (f.beta0, f.t0, f.beta_max) == pytest.approx((2.0, 100.0, 20.0))


@pytest.mark.parametrize("make", [
    lambda: ik.ConstantTemperature(0.3),
    lambda: ik.LinearTemperature(0.5, 0.1, 20),
    lambda: ik.CosineTemperature(0.5, 0.1, 20),
    lambda: ik.StepTemperature(0.5, 4, 0.7),
    lambda: ik.LogarithmicAnnealing(2.0, 5.0, 12.0),
])
def test_schedule_state_round_trip(make, tmp_path):
    s = make()
    for _ in range(7):
        s.step()
    state = s.state_dict()
    assert state["last_step"] == 7
    torch.save(state, tmp_path / "sched.pt")
    fresh = make()
    fresh.load_state_dict(torch.load(tmp_path / "sched.pt"))
    assert fresh.last_step == 7 and fresh.temperature == s.temperature
    assert fresh.step() == s.step()
    assert pickle.loads(pickle.dumps(s)).temperature == s.temperature
    s.state_dict()["last_step"] = 0  # a copy: mutating it leaves the schedule alone
    assert s.last_step == 8
    with pytest.raises(ValueError, match="unknown"):
        fresh.load_state_dict({"bogus": 1})
    assert type(s).__name__ in repr(s)


def test_schedule_temperature_feeds_a_loss():
    s = ik.CosineTemperature(0.5, 0.1, total_steps=3)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    losses = []
    for _ in range(4):
        losses.append(ik.dcl(z1, z2, s.temperature))
        s.step()
    assert all(torch.isfinite(x) for x in losses)


def test_schedule_bad_settings():
    with pytest.raises(ValueError, match="start"):
        ik.LinearTemperature(0.0, 0.1, 10)
    with pytest.raises(ValueError, match="total_steps"):
        ik.CosineTemperature(0.5, 0.1, 0)
    with pytest.raises(TypeError, match="step_size"):
        ik.StepTemperature(0.5, 1.5)
    with pytest.raises(ValueError, match="beta_max"):
        ik.LogarithmicAnnealing(2.0, 10.0, beta_max=1.0)
    with pytest.raises(ValueError, match="t0"):
        ik.LogarithmicAnnealing(2.0, t0=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        ik.ConstantTemperature(float("nan"))


@pytest.mark.parametrize("make,bad,match", [
    (lambda: ik.ConstantTemperature(0.3), {"base": -0.1}, "state_dict\\['base'\\] must be positive"),
    (lambda: ik.LinearTemperature(0.5, 0.1, 20), {"total_steps": 0}, "state_dict\\['total_steps'\\] must be >= 1"),
    (lambda: ik.CosineTemperature(0.5, 0.1, 20), {"end": float("nan")}, "state_dict\\['end'\\]"),
    (lambda: ik.CosineTemperature(0.5, 0.1, 20), {"last_step": -2}, "state_dict\\['last_step'\\] must be >= 0"),
    (lambda: ik.StepTemperature(0.5, 4, 0.7), {"step_size": 0}, "state_dict\\['step_size'\\]"),
    (lambda: ik.StepTemperature(0.5, 4, 0.7), {"final": 0.0}, "state_dict\\['final'\\]"),
    (lambda: ik.LogarithmicAnnealing(2.0, 5.0, 12.0), {"t0": 0.0}, "state_dict\\['t0'\\]"),
    (lambda: ik.LogarithmicAnnealing(2.0, 5.0, 12.0), {"beta0": 20.0}, "state_dict\\['beta_max'\\] .* >= beta0"),
])
def test_schedule_load_state_dict_validates(make, bad, match):
    """load_state_dict refuses what the constructor refuses (before: a negative temperature was
    accepted, total_steps=0 gave ZeroDivisionError at the next temperature), changing nothing."""
    s = make()
    s.step()
    before = s.state_dict()
    with pytest.raises(ValueError, match=match):
        s.load_state_dict(dict(before, **bad))
    assert s.state_dict() == before and s.temperature == make().temperature_at(1)
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        s.load_state_dict([("last_step", 3)])
    with pytest.raises(TypeError, match="last_step"):
        s.load_state_dict({"last_step": 2.5})
