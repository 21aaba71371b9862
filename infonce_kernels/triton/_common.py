"""Shared Triton helpers: tile loads, the exclusion rule (``kept``, with the threshold rule's
``load_threshold`` / ``threshold_drops``), dtype plumbing.

Imports triton: only imported by the kernel modules, never at package import.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)    # ln(2):   log(x) = log2(x) * LN2


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
def load_exclusions(ex_ptr, idx, idx_bound, E: tl.constexpr):
    """Excluded key indices of rows ``idx`` -> two (BLOCK,) int64 vectors.

    exclude is (R, E) int64 with E in {0, 1, 2}, -1 = none. Missing columns
    come back as -1, which no key index equals.
    """
    m = idx < idx_bound
    base = ex_ptr + idx.to(tl.int64) * E
    if E >= 1:
        e0 = tl.load(base, mask=m, other=-1)
    else:
        e0 = tl.full(idx.shape, -1, tl.int64)
    if E >= 2:
        e1 = tl.load(base + 1, mask=m, other=-1)
    else:
        e1 = e0
    return e0, e1


@triton.jit
def load_labels(lab_ptr, idx, idx_bound, HAS_LABELS: tl.constexpr):
    """Labels (or positives) of ``idx`` -> (BLOCK,) int64; -1 out of range / without the label rule."""
    if HAS_LABELS:
        out = tl.load(lab_ptr + idx, mask=idx < idx_bound, other=-1).to(tl.int64)
    else:
        out = tl.full(idx.shape, -1, tl.int64)
    return out


@triton.jit
def load_threshold(thr_ptr, pos_ptr, idx, idx_bound, HAS_THRESHOLD: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The threshold rule of rows ``idx``: (threshold, positive), each (BLOCK,): the rows'
    thresholds in ACC_DTYPE (+inf out of range / without the rule) and positives (int64, -1)."""
    if HAS_THRESHOLD:
        ok = idx < idx_bound
        thr = tl.load(thr_ptr + idx, mask=ok, other=float("inf")).to(ACC_DTYPE)
        pos = tl.load(pos_ptr + idx, mask=ok, other=-1).to(tl.int64)
    else:
        thr = tl.full(idx.shape, float("inf"), ACC_DTYPE)
        pos = tl.full(idx.shape, -1, tl.int64)
    return thr, pos


@triton.jit
def threshold_drops(key, logit, threshold, thr_positive):
    """The threshold rule alone (false-negative filtering): row i drops key j when its logit
    ``s <q_i, k_j>`` exceeds row i's ``threshold``, unless j is its positive ``thr_positive``."""
    return (logit > threshold) & (key != thr_positive)


@triton.jit
def kept(key, ex0, ex1, row_label, key_label, positive, HAS_LABELS: tl.constexpr,
         logit, threshold, thr_positive, HAS_THRESHOLD: tl.constexpr):
    """Is pair (i, j) kept: the one Triton definition of the exclusion rule (the Python one is
    ``infonce_kernels.ops.Exclusion.mask``, the C++ one csrc/common/exclusion.h).

    Arguments broadcast against each other (a row axis and a key axis, in either order): ``key``
    the key's index j; ``ex0``/``ex1`` row i's excluded indices (-1 = none); with the label rule,
    ``row_label``/``key_label`` the labels of i and j and ``positive`` row i's designated
    positive, which stays; with the threshold rule, the pair's ``logit`` and row i's
    ``threshold`` and ``thr_positive`` (``load_threshold``): :func:`threshold_drops`. Bounds
    (i < M, j < N) are the caller's.
    """
    keep = (key != ex0) & (key != ex1)
    if HAS_LABELS:
        keep = keep & ((row_label != key_label) | (key == positive))
    if HAS_THRESHOLD:
        keep = keep & ~threshold_drops(key, logit, threshold, thr_positive)
    return keep


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
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if dtype == torch.float64:
        return "ieee"
    return "tf32"


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]
