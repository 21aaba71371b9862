"""The benchmark cases, one module per loss; each module defines ``CASE`` (a ``base.Case``).

Adding a loss to the suite is adding one module here: the CLI (``python -m benchmarks``), the
subprocess worker and the pytest-benchmark suite find it by this discovery.
"""

import importlib
import pkgutil

import torch

from .base import Case, Inputs, Provider

__all__ = ["CASES", "Case", "Inputs", "Provider", "build", "get", "provider", "providers"]


def _discover():
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        case = importlib.import_module(f"{__name__}.{info.name}").CASE
        found[case.kind] = case
    return found


CASES = _discover()


def get(kind):
    try:
        return CASES[kind]
    except KeyError:
        raise ValueError(f"unknown benchmark kind {kind!r}; known: {', '.join(CASES)}") from None


def providers(kind, device):
    """Names of the providers of ``kind`` that can run on ``device``."""
    return [p.name for p in get(kind).providers(device)]


def provider(kind, name, device):
    """The provider ``name`` of ``kind`` on ``device`` (ValueError if it cannot run there)."""
    found = get(kind).provider(name, device)
    if found is None:
        raise ValueError(f"provider {name!r} of {kind!r} is not available on {device}; "
                         f"available: {', '.join(providers(kind, device))}")
    return found


def build(kind, name, rows, dim, dtype, device, requires_grad=True):
    """``(leaves, fn)`` of one case: the inputs (seeded, the same for every provider) and
    ``fn(*leaves) -> scalar loss``."""
    device = torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    inputs = get(kind).make_inputs(rows, dim, dtype, device, requires_grad, generator)
    return inputs.leaves, provider(kind, name, device).build(inputs.aux)
