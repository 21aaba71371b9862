"""Helpers for the pytest-benchmark files."""

import torch

from . import providers


def step(kind, provider, rows, dim, dtype, mode, device="cpu"):
    """A zero-argument function running one benchmark step, inputs built once."""
    inputs, fn = providers.build(kind, provider, rows, dim, dtype, torch.device(device),
                                 requires_grad=mode != "forward")

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def forward_backward():
        for x in inputs:
            x.grad = None
        fn(*inputs).backward()

    return forward if mode == "forward" else forward_backward


def cpu_providers(kind):
    return providers.providers(kind, "cpu")
