"""SupCon forward+backward (when infonce_kernels.supcon exists) and pytorch-metric-learning's."""

import pytest
import torch

from ._bench_util import cpu_providers, step

PROVIDERS = cpu_providers("supcon")


@pytest.mark.skipif(not PROVIDERS, reason="infonce_kernels.supcon is not available")
@pytest.mark.parametrize("rows,dim", [(512, 128), (2048, 128)])
@pytest.mark.parametrize("provider", PROVIDERS or ["none"])
def test_supcon(benchmark, provider, rows, dim):
    benchmark.group = f"supcon forward+backward 2B={rows} d={dim}"
    benchmark.extra_info.update(kind="supcon", provider=provider, rows=rows, dim=dim)
    benchmark.pedantic(step("supcon", provider, rows, dim, torch.float32, "forward+backward"), rounds=3,
                       warmup_rounds=1)
