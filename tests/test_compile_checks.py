"""Value checks survive torch.compile(fullgraph=True) as device-side asserts, and
INFONCE_VALUE_CHECKS switches them to asynchronous asserts or off.

Eagerly a bad value raises ValueError after one host synchronisation; in a compiled graph the
same check is a ``torch._assert_async`` with the same message (a RuntimeError), so a compiled
loss never returns a plausible number for a bad input.
"""

import pytest
import torch

import infonce_kernels as ik

torch._dynamo.config.cache_size_limit = 64

LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
KEYS, PAIRS, TEXTS = torch.randn(7, 5), torch.randn(8, 5), torch.randn(8, 5)

# name -> loss of an (8, 5) float32 tensor x and a temperature-like scalar t.
LOSSES = {
    "lse": lambda x, t: ik.lse(x, KEYS, 1 / t),
    "nt_xent": lambda x, t: ik.nt_xent(x[:4], x[4:], t),
    "info_nce": lambda x, t: ik.info_nce(x, PAIRS, temperature=t),
    "clip_loss": lambda x, t: ik.clip_loss(x, TEXTS, 1 / t),
    "supcon": lambda x, t: ik.supcon(x, LABELS, temperature=t),
    "dcl": lambda x, t: ik.dcl(x[:4], x[4:], t),
    "dclw": lambda x, t: ik.dclw(x[:4], x[4:], t),
    "dhel": lambda x, t: ik.dhel(x[:4], x[4:], t),
    "kcl": lambda x, t: ik.kcl(x[:4], x[4:], t=1 / t),
    "hard_negative_nt_xent": lambda x, t: ik.hard_negative_nt_xent(x[:4], x[4:], t, beta=0.5),
    "debiased_nt_xent": lambda x, t: ik.debiased_nt_xent(x[:4], x[4:], t, tau_plus=0.1),
    "uniformity": lambda x, t: ik.uniformity(x, t=1 / t),
}


def _nan_row(x):
    return x.clone().index_fill_(0, torch.tensor([2]), float("nan"))


@pytest.mark.parametrize("name", list(LOSSES))
def test_compiled_loss_keeps_its_value_checks(name):
    loss = LOSSES[name]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager", dynamic=False)
    x, t = torch.randn(8, 5), torch.tensor(0.5)
    torch.testing.assert_close(compiled(x, t), loss(x, t))
    with pytest.raises(RuntimeError, match="NaN or inf"):
        compiled(_nan_row(x), t)
    for bad in (-0.5, 0.0, float("inf"), float("nan")):
        with pytest.raises(RuntimeError, match="must be positive and finite"):
            compiled(x, torch.tensor(bad))


def test_inductor_keeps_the_checks_for_python_float_temperatures():
    """The default backend, and a Python float temperature, which dynamo may trace as a symbolic
    float after the first call: the check moves to the graph instead of disappearing."""
    compiled = torch.compile(lambda a, b, tau: ik.nt_xent(a, b, tau), fullgraph=True)
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    torch.testing.assert_close(compiled(a, b, 0.5), ik.nt_xent(a, b, 0.5))
    torch.testing.assert_close(compiled(a, b, 0.7), ik.nt_xent(a, b, 0.7))
    for bad in (-0.5, 0.0):
        with pytest.raises((RuntimeError, ValueError), match="must be positive and finite"):
            compiled(a, b, bad)


def test_compiled_lse_checks_its_index_arguments():
    compiled = torch.compile(lambda q, k, ex: ik.lse(q, k, 1.0, exclude=ex), fullgraph=True, backend="aot_eager")
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    ok = torch.tensor([[0], [1], [-1], [3], [5], [2]])
    torch.testing.assert_close(compiled(q, k, ok), ik.lse(q, k, 1.0, exclude=ok))
    with pytest.raises(RuntimeError, match=r"exclude indices must lie in \[-1, 6\)"):
        compiled(q, k, torch.full((6, 1), 9))
    with pytest.raises(RuntimeError, match="removes every key"):
        compiled(q, k[:1], torch.zeros(6, 1, dtype=torch.long))
    labelled = torch.compile(lambda q, lab, pos: ik.lse(q, q, 1.0, symmetric=True, row_labels=lab, positive=pos),
                             fullgraph=True, backend="aot_eager")
    lab, pos = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 0, 3, 2, 5, 4])
    torch.testing.assert_close(labelled(q, lab, pos), ik.lse(q, q, 1.0, symmetric=True, row_labels=lab, positive=pos))
    with pytest.raises(RuntimeError, match=r"positive indices must lie in \[-1, 6\)"):
        labelled(q, lab, torch.full((6,), 7))
    with pytest.raises(RuntimeError, match="remove every key from some row"):
        labelled(q, torch.zeros(6, dtype=torch.long), torch.full((6,), -1))


def test_value_check_modes(monkeypatch):
    x = torch.randn(8, 5)
    monkeypatch.setenv("INFONCE_VALUE_CHECKS", "async")
    with pytest.raises(RuntimeError, match="NaN or inf"):
        ik.nt_xent(_nan_row(x)[:4], x[4:], 0.5)
    monkeypatch.setenv("INFONCE_VALUE_CHECKS", "off")
    assert torch.isnan(ik.nt_xent(_nan_row(x)[:4], x[4:], 0.5))
    monkeypatch.setenv("INFONCE_VALUE_CHECKS", "sometimes")
    with pytest.raises(ValueError, match="INFONCE_VALUE_CHECKS must be one of"):
        ik.nt_xent(x[:4], x[4:], 0.5)
    monkeypatch.setenv("INFONCE_VALUE_CHECKS", "sync")
    with pytest.raises(ValueError, match="NaN or inf"):
        ik.nt_xent(_nan_row(x)[:4], x[4:], 0.5)
