"""CLIP forward+backward: ours against an open_clip-style materialising ClipLoss."""

import pytest
import torch

from ._bench_util import cpu_providers, step


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("rows,dim", [(512, 128), (2048, 128)])
@pytest.mark.parametrize("provider", cpu_providers("clip"))
def test_clip(benchmark, provider, rows, dim, mode):
    benchmark.group = f"clip {mode} B={rows} d={dim}"
    benchmark.extra_info.update(kind="clip", provider=provider, rows=rows, dim=dim, mode=mode)
    benchmark.pedantic(step("clip", provider, rows, dim, torch.float32, mode), rounds=5, warmup_rounds=1)
