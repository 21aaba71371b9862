"""NT-Xent (SimCLR) forward and forward+backward, each provider available on the CPU."""

import pytest
import torch

from ._bench_util import cpu_providers, step


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("rows,dim", [(512, 128), (2048, 128)])
@pytest.mark.parametrize("provider", [p for p in cpu_providers("nt_xent") if p != "pml"])
def test_nt_xent(benchmark, provider, rows, dim, mode):
    benchmark.group = f"nt_xent {mode} 2B={rows} d={dim}"
    benchmark.extra_info.update(kind="nt_xent", provider=provider, rows=rows, dim=dim, mode=mode)
    benchmark.pedantic(step("nt_xent", provider, rows, dim, torch.float32, mode), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("provider", cpu_providers("nt_xent"))
def test_nt_xent_small_with_peers(benchmark, provider):
    """2B = 256: small enough for pytorch-metric-learning's (pairs x pairs) NT-Xent."""
    benchmark.group = "nt_xent forward+backward 2B=256 d=64"
    benchmark.extra_info.update(kind="nt_xent", provider=provider, rows=256, dim=64)
    benchmark.pedantic(step("nt_xent", provider, 256, 64, torch.float32, "forward+backward"), rounds=3,
                       warmup_rounds=1)
