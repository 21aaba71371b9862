"""Shared fixtures and checks for the test suite.

Accuracy rule (after flash-attention): a backend's error against a float64 reference must stay
within twice the error of the same-precision plain-PyTorch computation plus a small tolerance
relative to the magnitude of the reference.
"""

import os
import zlib

import pytest
import torch

import infonce_kernels
from infonce_kernels import ops

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in infonce_kernels.available_backends("cpu")]


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh, reproducible seed per test (derived from its id), never all-zero inputs."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def assert_within(actual, expected, baseline, rtol, what=""):
    """|actual - expected| <= 2 |baseline - expected| + rtol * max|expected| (elementwise max).

    ``expected`` is a float64 reference, ``baseline`` the same quantity computed by plain
    PyTorch at the precision under test.
    """
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    base = (baseline.double() - expected).abs().max().item()
    tol = rtol * max(expected.abs().max().item(), 1.0)
    assert err <= 2 * base + tol, f"{what}: error {err:.3e} > 2 x baseline {base:.3e} + {tol:.3e}"


def random_exclude(rows, keys, width, *, with_none=True):
    """(rows, width) int64 exclusion indices in [-1, keys), never removing every key of a row."""
    low = -1 if with_none else 0
    exclude = torch.randint(low, keys, (rows, width))
    if keys <= width:  # keep one key per row
        exclude[:, :] = torch.where(exclude == keys - 1, -1, exclude)
    return exclude


def reference_lse(q, k, scale, exclude=None):
    """Materialised float64 row log-sum-exp with the excluded pairs removed."""
    logits = float(scale) * (q.double() @ k.double().T)
    if exclude is not None:
        for e in range(exclude.shape[1]):
            idx = exclude[:, e]
            rows = torch.nonzero(idx >= 0).flatten()
            logits[rows, idx[rows]] = float("-inf")
    return torch.logsumexp(logits, dim=1)


__all__ = ["CPU_BACKENDS", "assert_within", "random_exclude", "reference_lse", "ops", "os"]
