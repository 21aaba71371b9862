"""The dtype the op and the losses compute in."""

import torch

__all__ = ["accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other: the dtype of the op's output, of its
    accumulators and of every loss value."""
    return torch.float64 if dtype == torch.float64 else torch.float32
