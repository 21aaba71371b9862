"""The C++ backends (``cpu`` and ``cuda``): the kernel ops ``infonce_kernels::_lse_fwd``,
``_lse_fwd_counted``, ``_lse_bwd`` and ``_lse_bwd_paired`` of csrc/, whose fake (meta)
implementations live here.
The tensors' device picks the kernel (CPU or CUDA dispatch key)."""

import torch

from .._extension import EXTENSION_ERROR
from .precision import accumulation_dtype

__all__ = ["forward", "backward", "backward_paired", "has_cuda_kernels"]

if EXTENSION_ERROR is None:

    @torch.library.register_fake("infonce_kernels::_lse_fwd")
    def _(q, k, scale, exclude, labels, symmetric):
        return q.new_empty(q.shape[0], dtype=accumulation_dtype(q.dtype))

    @torch.library.register_fake("infonce_kernels::_lse_fwd_counted")
    def _(q, k, scale, exclude, labels, symmetric):
        return (q.new_empty(q.shape[0], dtype=accumulation_dtype(q.dtype)),
                q.new_empty(q.shape[0], dtype=torch.int32))

    @torch.library.register_fake("infonce_kernels::_lse_bwd")
    def _(grad, q, k, scale, exclude, labels, symmetric, lse):
        dk = q.new_empty(0) if symmetric else torch.empty_like(k)
        return torch.empty_like(q), dk, torch.empty_like(scale)

    @torch.library.register_fake("infonce_kernels::_lse_bwd_paired")
    def _(grad, q, k, scale, exclude, labels, lse, key_side, row_offset):
        return torch.empty_like(q), torch.empty_like(scale)


def has_cuda_kernels() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("infonce_kernels::_lse_fwd", "CUDA")


def _labels(spec):
    """The C++ ops' ``Tensor[] labels``: [] without the label and threshold rules, [row, key,
    positive] with the label rule, [row, key, positive, threshold] with the threshold rule (row
    and key labels empty without the label rule)."""
    if spec.threshold is None:
        return list(spec.labels or ())
    return list(spec.tensors()[1:])


def forward(q, k, scale, spec, *, count=False):
    op = torch.ops.infonce_kernels._lse_fwd_counted if count else torch.ops.infonce_kernels._lse_fwd
    return op(q, k, scale, spec.exclude, _labels(spec), spec.symmetric)


def backward(grad, q, k, scale, spec, lse):
    return torch.ops.infonce_kernels._lse_bwd(grad, q, k, scale, spec.exclude, _labels(spec), spec.symmetric, lse)


def backward_paired(grad, q, k, scale, spec, lse, key_grad, key_lse, key_spec, row_offset):
    key_side = [key_grad, key_lse, key_spec.exclude]
    if spec.labels or key_spec.threshold is not None:
        key_side.append(key_spec.positive)
    if key_spec.threshold is not None:
        key_side.append(key_spec.threshold)
    return torch.ops.infonce_kernels._lse_bwd_paired(grad, q, k, scale, spec.exclude, _labels(spec), lse, key_side,
                                                     row_offset)
