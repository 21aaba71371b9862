"""The C++ backends (``cpu`` and ``cuda``): the kernel ops ``infonce_kernels::_lse_fwd``,
``_lse_fwd_counted``, ``_lse_bwd`` and ``_lse_bwd_paired`` of csrc/, and the pairwise sigmoid's
``_sigmoid_fwd`` and ``_sigmoid_bwd``, and CLIP's CUDA-only G-block op ``_lse_pair_gblock``
(:func:`backward_pair`), whose fake (meta) implementations live here.
The tensors' device picks the kernel (CPU or CUDA dispatch key)."""

import torch

from .._extension import EXTENSION_ERROR
from .precision import accumulation_dtype

__all__ = ["forward", "backward", "backward_paired", "sigmoid_forward", "sigmoid_backward", "has_cuda_kernels",
           "uses_backward_pair", "backward_pair"]

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

    @torch.library.register_fake("infonce_kernels::_sigmoid_fwd")
    def _(x, y, scale, bias, labels, offset, with_grad):
        rows = x.new_empty(x.shape[0], dtype=accumulation_dtype(x.dtype))
        if not with_grad:
            return [rows]
        return [rows, torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale), torch.empty_like(bias)]

    @torch.library.register_fake("infonce_kernels::_sigmoid_bwd")
    def _(grad, x, y, scale, bias, labels, offset):
        return [torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale), torch.empty_like(bias)]


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


def sigmoid_forward(x, y, scale, bias, labels, offset, with_grad):
    """The pairwise sigmoid op's forward (contract in ops/backends.py): ``(rows,)`` or, with
    ``with_grad``, ``(rows, dx, dy, dscale, dbias)`` for a unit upstream gradient."""
    return tuple(torch.ops.infonce_kernels._sigmoid_fwd(x, y, scale, bias, list(labels), int(offset), bool(with_grad)))


def sigmoid_backward(grad, x, y, scale, bias, labels, offset):
    """(dx, dy, dscale, dbias) of ``sum_i grad_i rows_i`` (contract in ops/backends.py)."""
    return tuple(torch.ops.infonce_kernels._sigmoid_bwd(grad, x, y, scale, bias, list(labels), int(offset)))


# --- CLIP's pair backward on the cuda backend: G blocks (csrc/cuda/pair_gblock_mma.cuh) + GEMMs ---

#: the CUDA G kernel's tiles as a GemmPlan's (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages):
#: csrc/cuda/pair_gblock.h kGBM x kGBN, S over d in chunks of kDK = 128, 4 warps, 2 stages
PAIR_GBLOCK_TILES = (128, 64, 128, 4, 2)
#: programs per G-block launch the column split aims at: 2 CTAs (104 KB of shared memory each) per
#: SM of an H100/H200 (132 SMs)
PAIR_TARGET_PROGRAMS = 264
#: the fp16 / bf16 backward's output chunk (csrc/cuda/tile_sizes.cuh kDV): beyond it every chunk
#: of the paired kernel recomputes S and both exps
_MMA_OUTPUT_CHUNK = 128

if EXTENSION_ERROR is None and hasattr(torch.ops.infonce_kernels, "_lse_pair_gblock"):

    @torch.library.register_fake("infonce_kernels::_lse_pair_gblock")
    def _(a, b, scale, r, t, g_r, g_t, gmax, gblk, gs, row0, row1, col0, col1, col_progs):
        return None


def uses_backward_pair(device, dtype, d) -> bool:
    """Whether :func:`backward_pair` is the cuda backend's CLIP backward: fp16 / bf16 inputs on a
    CUDA (or meta) device whose d spans more than one output chunk (d > 128) of the paired
    tensor-core backward, which would recompute S and both exps once per chunk and per side. CPU
    tensors, fp32 / fp64 and d <= 128 keep two paired backwards."""
    return (torch.device(device).type in ("cuda", "meta") and dtype in (torch.float16, torch.bfloat16)
            and int(d) > _MMA_OUTPUT_CHUNK)


def pair_plan(M: int, N: int, d: int, dtype: torch.dtype):
    """The G-block blocking of :func:`backward_pair` (``gblock_gemm.plan`` with the CUDA G kernel's
    tiles and the budget CLIP shares with the Triton backend: at B = 32,768, d = 512, bf16 the
    same 2,048-row bands x 8 groups of 4,096 columns)."""
    from . import gblock_gemm, pair_gemm  # noqa: PLC0415
    return gblock_gemm.plan(M, N, d, dtype, PAIR_GBLOCK_TILES, pair_gemm.MEMORY_BUDGET, None,
                            pair_gemm.MIN_SCRATCH_BYTES)


def backward_pair(a, b, scale, r, t, g_r, g_t):
    """(da, db, dscale) of ``sum(g_r * r) + sum(g_t * t)`` for ``(r, t) = lse_pair(a, b, scale)``
    by G blocks (the CUDA kernel of ``_lse_pair_gblock``) and GEMMs (``ops/pair_gemm.py``): a (M, d),
    b (N, d) one 16-bit dtype, scale () and r, g_r (M,), t, g_t (N,) float32; da/db in the input
    dtype, dscale () float32."""
    from . import pair_gemm  # noqa: PLC0415
    a, b = a.contiguous(), b.contiguous()
    r, t = r.contiguous(), t.contiguous()
    g_r, g_t = g_r.to(r.dtype).contiguous(), g_t.to(t.dtype).contiguous()
    p = pair_plan(a.shape[0], b.shape[0], a.shape[1], a.dtype)
    op = torch.ops.infonce_kernels._lse_pair_gblock

    def write_block(gblk, gs, r0, r1, c0, c1, gm, col_progs):
        op(a, b, scale, r, t, g_r, g_t, gm, gblk, gs, r0, r1, c0, c1, col_progs)

    return pair_gemm.pair_gradients(a, b, scale, r, t, g_r, g_t, p, write_block, PAIR_TARGET_PROGRAMS)
