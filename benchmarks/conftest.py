"""pytest-benchmark suite (``pytest benchmarks/``; not part of CI's ``pytest``, whose testpaths is
tests/). Small shapes, as the tests use; for the memory figures and large sizes use
``python -m benchmarks``."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
