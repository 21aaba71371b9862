"""Shared Triton helpers: tile loads, the exclusion rule (``kept``, with the threshold rule's
``load_threshold`` / ``threshold_drops``), dtype plumbing.

Imports triton: only imported by the kernel modules, never at package import.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import exact_fp32

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)    # ln(2):   log(x) = log2(x) * LN2
INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def load_tile(ptr, idx, idx_bound, d0, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load rows ``idx`` (BLOCK_R,) x features ``[d0, d0 + BLOCK_D)`` of a
    contiguous (R, D) matrix -> (BLOCK_R, BLOCK_D); out-of-range entries are 0.

    Offsets are int64: R * D may exceed 2**31.
    """
    offs_d = d0 + tl.arange(0, BLOCK_D)
    ptrs = ptr + idx.to(tl.int64)[:, None] * D + offs_d[None, :]
    mask = (idx[:, None] < idx_bound) & (offs_d[None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def load_tile_t(ptr, idx, idx_bound, d0, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Transposed :func:`load_tile`: -> (BLOCK_D, BLOCK_R)."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    ptrs = ptr + idx.to(tl.int64)[None, :] * D + offs_d[:, None]
    mask = (idx[None, :] < idx_bound) & (offs_d[:, None] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def as_index32(v):
    """int64 indices -> int32: -1 and every valid index (< 2**31 - 1: Triton's M and N are int32)
    keep their value; anything below -1 becomes -1 and anything above becomes 2**31 - 1, which no
    index in range equals, so the exclusion rule reads the same in int32."""
    return tl.minimum(tl.maximum(v, -1), INT32_MAX).to(tl.int32)


@triton.jit
def load_exclusions(ex_ptr, idx, idx_bound, E: tl.constexpr):
    """Excluded key indices of rows ``idx`` -> two (BLOCK,) int32 vectors (:func:`as_index32`).

    exclude is (R, E) int64 with E in {0, 1, 2}, -1 = none. Missing columns
    come back as -1, which no key index equals.
    """
    m = idx < idx_bound
    base = ex_ptr + idx.to(tl.int64) * E
    if E >= 1:
        e0 = as_index32(tl.load(base, mask=m, other=-1))
    else:
        e0 = tl.full(idx.shape, -1, tl.int32)
    if E >= 2:
        e1 = as_index32(tl.load(base + 1, mask=m, other=-1))
    else:
        e1 = e0
    return e0, e1


@triton.jit
def load_labels(lab_ptr, idx, idx_bound, HAS_LABELS: tl.constexpr):
    """Labels of ``idx`` -> (BLOCK,) int64 (labels are any int64: compared as they are); -1 out of
    range / without the label rule."""
    if HAS_LABELS:
        out = tl.load(lab_ptr + idx, mask=idx < idx_bound, other=-1).to(tl.int64)
    else:
        out = tl.full(idx.shape, -1, tl.int64)
    return out


@triton.jit
def load_positives(pos_ptr, idx, idx_bound, HAS_POSITIVE: tl.constexpr):
    """Designated positives (indices) of ``idx`` -> (BLOCK,) int32 (:func:`as_index32`); -1 out of
    range / without a rule that has them (the label rule, the threshold rule: one ``positive``
    serves both)."""
    return as_index32(load_labels(pos_ptr, idx, idx_bound, HAS_POSITIVE))


@triton.jit
def load_threshold(thr_ptr, idx, idx_bound, HAS_THRESHOLD: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Thresholds (logit units) of rows ``idx`` -> (BLOCK,) ACC_DTYPE; +inf (drops nothing) out
    of range / without the threshold rule."""
    if HAS_THRESHOLD:
        out = tl.load(thr_ptr + idx, mask=idx < idx_bound, other=float("inf")).to(ACC_DTYPE)
    else:
        out = tl.full(idx.shape, float("inf"), ACC_DTYPE)
    return out


@triton.jit
def threshold_drops(key, dots, s, threshold, positive):
    """The threshold rule alone (false-negative filtering): row i drops key j when its logit
    L_ij = s <q_i, k_j> (``dots * s``: the raw dot product times the scale, the threshold's
    units, rounded as the reference rounds it) exceeds row i's ``threshold``, unless j is its
    ``positive`` (indices as in :func:`kept`)."""
    return (dots * s > threshold) & (key != positive)


@triton.jit
def kept(key, ex0, ex1, row_label, key_label, positive, HAS_LABELS: tl.constexpr,
         dots, s, threshold, HAS_THRESHOLD: tl.constexpr):
    """Is pair (i, j) kept: the one Triton definition of the exclusion rule (the Python one is
    ``infonce_kernels.ops.Exclusion.mask``, the C++ one csrc/common/exclusion.h).

    Arguments broadcast against each other (a row axis and a key axis, in either order): ``key``
    the key's index j; ``ex0``/``ex1`` row i's excluded indices (none: any value no key index
    equals); with the label rule, ``row_label``/``key_label`` the labels of i and j and
    ``positive`` row i's designated positive, which stays; with the threshold rule, the pair's
    raw dot product ``dots``, the scale ``s`` and row i's ``threshold`` (:func:`threshold_drops`;
    the positive stays there too). ``key``, ``ex0``, ``ex1`` and ``positive`` are indices in one
    numbering: the kernels pass them tile-relative, as int32 (``key`` = tl.arange over the tile,
    the others minus the tile's first index, once per row or key vector), so the per-element
    compares are int32 against a constant lane index. Bounds
    (i < M, j < N) are the caller's.
    """
    keep = (key != ex0) & (key != ex1)
    if HAS_LABELS:
        keep = keep & ((row_label != key_label) | (key == positive))
    if HAS_THRESHOLD:
        keep = keep & ~threshold_drops(key, dots, s, threshold, positive)
    return keep


@triton.jit
def log2_prob(dots, s, r, INPUT_PRECISION: tl.constexpr):
    """(s <q_i, k_j> - r) log2(e): the base-2 exponent of exp(L_ij - r) for raw dot products
    ``dots`` and an offset ``r`` in nats (a row's LSE or running max), broadcast against them.

    Tensor-core products (16-bit inputs, tf32: INPUT_PRECISION "tf32") fold the scale into one
    multiply-add per element, dots * (s log2 e) - r log2 e (both factors hoisted out of the
    element loop); their own rounding dwarfs the folding's (relative 2^-24 of c = s log2 e and
    of r log2 e, which shift a whole row's exponents when |L| ~ |r| >> 1). Exact products (fp32
    "ieee", fp64) subtract in nats first, (s dots - r) log2 e: the difference is then exact to the
    rounding of L_ij itself, which keeps fp32 within twice the error of PyTorch's fp32.
    """
    if INPUT_PRECISION == "ieee":
        out = (dots * s - r) * LOG2E
    else:
        out = dots * (s * LOG2E) - r * LOG2E
    return out


@triton.jit
def scores(q_ptr, k_ptr, rows, cols, M, N, D, q_tile, k_tile_t,
           ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
           SINGLE_D: tl.constexpr):
    """Raw dot products  <q_i, k_j>  -> (BLOCK_M, BLOCK_N) in ACC_DTYPE.

    When SINGLE_D the caller already holds the (BLOCK_M, BLOCK_D) q tile and
    the (BLOCK_D, BLOCK_N) transposed k tile; otherwise d is walked in
    BLOCK_D chunks (q chunks are re-read from L2 for every key block).
    """
    if SINGLE_D:
        acc = tl.dot(q_tile, k_tile_t, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            qc = load_tile(q_ptr, rows, M, d0, D, BLOCK_M, BLOCK_D)
            kc = load_tile_t(k_ptr, cols, N, d0, D, BLOCK_N, BLOCK_D)
            acc = tl.dot(qc, kc, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def acc_dtype(dtype: torch.dtype):
    """Accumulation dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision.

    fp32 inputs follow ``torch.get_float32_matmul_precision()``: "highest" ->
    "ieee" (true fp32 FMA), "high"/"medium" -> "tf32" (tensor cores). For
    16-bit inputs the argument is irrelevant (tensor cores, fp32 accumulate);
    fp64 uses the fp64 path regardless.
    """
    if dtype == torch.float32:
        return "ieee" if exact_fp32(dtype) else "tf32"
    if dtype == torch.float64:
        return "ieee"
    return "tf32"


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]
