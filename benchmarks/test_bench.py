"""pytest-benchmark suite: every case's providers on the CPU at the shared small shapes
(``cases.base.PYTEST_SHAPES``), forward and forward+backward; plus a check that the providers of
a case compute the same loss, so the timings compare like with like.

    pytest benchmarks -k "small"                       # the quick selection (2B or B = 256, d = 64)
    pytest benchmarks -k "nt_xent and ours"            # one case, the package's backends
"""

import pytest
import torch

from . import cases
from .cases.base import PYTEST_SHAPES


def _params():
    for kind, case in cases.CASES.items():
        for p in case.providers("cpu"):
            for shape, (rows, dim) in PYTEST_SHAPES.items():
                if p.max_rows is None or rows <= p.max_rows:
                    yield pytest.param(kind, p.name, rows, dim, id=f"{kind}-{p.name}-{shape}")


def step(kind, provider, rows, dim, mode):
    """A zero-argument function running one step of the case; inputs built once."""
    leaves, fn = cases.build(kind, provider, rows, dim, torch.float32, "cpu", requires_grad=mode != "forward")

    def forward():
        with torch.no_grad():
            return fn(*leaves)

    def forward_backward():
        for x in leaves:
            x.grad = None
        fn(*leaves).backward()

    return forward if mode == "forward" else forward_backward


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("kind,provider,rows,dim", list(_params()))
def test_bench(benchmark, kind, provider, rows, dim, mode):
    benchmark.group = f"{kind} {mode} {cases.get(kind).rows_label}={rows} d={dim}"
    benchmark.extra_info.update(kind=kind, provider=provider, rows=rows, dim=dim, mode=mode)
    benchmark.pedantic(step(kind, provider, rows, dim, mode), rounds=3, warmup_rounds=1)


# Relative tolerance of the providers that compute in a lower precision than their float64 inputs.
LOWER_PRECISION = {"materialised:fp32": 1e-5, "materialised:bf16": 3e-2}


@pytest.mark.parametrize("kind", list(cases.CASES))
def test_providers_agree(kind):
    """Each provider's loss and input gradients at the small shape, on float64 inputs, match
    ours:reference to 1e-10 (relative), or to its compute precision (LOWER_PRECISION)."""
    rows, dim = PYTEST_SHAPES["small"]
    results = {}
    for p in cases.get(kind).providers("cpu"):
        leaves, fn = cases.build(kind, p.name, rows, dim, torch.float64, "cpu")
        loss = fn(*leaves)
        loss.backward()
        results[p.name] = (loss.double(), [x.grad for x in leaves])
    want, want_grads = results.pop("ours:reference")
    assert results, f"{kind}: no provider besides ours:reference"
    for name, (loss, grads) in results.items():
        tol = LOWER_PRECISION.get(name, 1e-10)
        torch.testing.assert_close(loss, want, rtol=tol, atol=0, msg=f"{kind}: {name} loss")
        for got, ref in zip(grads, want_grads):
            torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item(),
                                       msg=f"{kind}: {name} gradient")


@pytest.mark.parametrize("provider", cases.providers("siglip", "cpu"))
def test_siglip_worker_smoke(provider):
    """One SigLIP fwd+bwd case through the CLI's worker at a tiny shape: it is measured (status
    ok, a finite time, a peak byte count) and its gradients reach every leaf (features, t, b)."""
    from . import worker

    result = worker.run(dict(kind="siglip", provider=provider, rows=64, dim=16, dtype="float32",
                             mode="forward+backward", device="cpu", repeats=2))
    assert result["status"] == "ok", result
    assert len(result["seconds_all"]) == 2 and result["peak_bytes"] >= 0
    leaves, fn = cases.build("siglip", provider, 64, 16, torch.float32, "cpu")
    fn(*leaves).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in leaves)
