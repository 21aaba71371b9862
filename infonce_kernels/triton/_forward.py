"""Forward kernel: masked, scaled row log-sum-exp, one program per row block.

    L_ij = s * <q_i, k_j>                       (never stored)
    r_i  = log sum_{j not excluded} exp(L_ij)

Each program owns BLOCK_M rows and walks all keys in BLOCK_N blocks, keeping
an online (running max m, running sum l) LSE in fp32 (fp64 for fp64
inputs):

    x_ij  = L_ij                                (-inf where excluded / out of range)
    m'    = max(m, max_j x_ij)
    l'    = l * 2^((m - m') log2 e) + sum_j 2^((x_ij - m') log2 e)
    r_i   = m + ln 2 * log2 l

Differences are taken in nats *before* scaling by log2(e): with |L| ~ 100
(tau = 0.01) folding log2(e) into s would add roundings at the magnitude of
L, i.e. relative errors ~1e-5 on every probability in fp32.

A tile in which every key of a row is excluded leaves m = -inf; the update
then uses 0 in place of m' so that no exp2(-inf - -inf) = NaN appears.

Shapes: q (M, d), k (N, d), scale () , exclude (M, E) int64, lse (M,).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.precision import accumulation_dtype
from . import _config
from ._common import (LN2, LOG2E, acc_dtype, input_precision, kept, load_exclusions, load_labels, load_threshold,
                      load_tile, load_tile_t, scores, threshold_drops)


@triton.jit
def block_range(start, BLOCK: tl.constexpr, bound):
    """Indices ``start + [0, BLOCK)`` (BLOCK,) and their in-range mask (< bound)."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < bound


@triton.jit
def program_block(BLOCK: tl.constexpr, bound, BLOCK_DO: tl.constexpr):
    """Where a program of a (block, d-out chunk) grid works: (pid, idx, ok, do0) with pid its block
    number (axis 0), idx (BLOCK,) the indices of that block, ok their in-range mask (< bound) and
    do0 the first output feature of its chunk (axis 1)."""
    pid = tl.program_id(0)
    idx, ok = block_range(pid * BLOCK, BLOCK, bound)
    return pid, idx, ok, tl.program_id(1) * BLOCK_DO


@triton.jit
def row_rule(ex_ptr, rlab_ptr, pos_ptr, rows, M, E: tl.constexpr, HAS_LABELS: tl.constexpr):
    """The row side of the exclusion rule for ``rows`` (BLOCK,) of an (M,)-row side: (ex0, ex1,
    row_label, positive), each (BLOCK,) int64 with -1 for none: the row arguments of ``kept``."""
    ex0, ex1 = load_exclusions(ex_ptr, rows, M, E)
    rlab = load_labels(rlab_ptr, rows, M, HAS_LABELS)
    pos = load_labels(pos_ptr, rows, M, HAS_LABELS)
    return ex0, ex1, rlab, pos


@triton.jit
def resident_tile(ptr, idx, idx_bound, D,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr):
    """With SINGLE_D (all of d in one BLOCK_D chunk) the (BLOCK_R, BLOCK_D) tile of rows ``idx``,
    loaded once and held for a program's whole walk; else 0 (``scores`` reads d by chunks)."""
    if SINGLE_D:
        tile = load_tile(ptr, idx, idx_bound, 0, D, BLOCK_R, BLOCK_D)
    else:
        tile = 0
    return tile


@triton.jit
def score_tile(q_ptr, k_ptr, rows, cols, M, N, D, q_tile,
               ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr):
    """(dots, k_tile_t): dots (BLOCK_M, BLOCK_N) = <q_i, k_j> in ACC_DTYPE for the held ``q_tile``
    (``resident_tile``) and the keys ``cols``; k_tile_t the (BLOCK_D, BLOCK_N) transposed key tile
    loaded for it with SINGLE_D (else 0), for the caller to reuse. The forward and every backward
    kernel (the dk kernel with the roles of q and k swapped) compute their score tiles here, so
    that the backward's tiles are bit-identical to the forward's (row sums of P equal 1 to rounding).
    """
    if SINGLE_D:
        k_tile_t = load_tile_t(k_ptr, cols, N, 0, D, BLOCK_N, BLOCK_D)
    else:
        k_tile_t = 0
    dots = scores(q_ptr, k_ptr, rows, cols, M, N, D, q_tile, k_tile_t,
                  ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D)
    return dots, k_tile_t


@triton.jit
def _lse_fwd_kernel(
    q_ptr, k_ptr, scale_ptr, ex_ptr, rlab_ptr, klab_ptr, pos_ptr, lse_ptr, thr_ptr, tpos_ptr, cnt_ptr,
    M, N, D,
    E: tl.constexpr, HAS_LABELS: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, SINGLE_D: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, row_ok = block_range(pid * BLOCK_M, BLOCK_M, M)
    ex0, ex1, rlab, pos = row_rule(ex_ptr, rlab_ptr, pos_ptr, rows, M, E, HAS_LABELS)
    thr, tpos = load_threshold(thr_ptr, tpos_ptr, rows, M, HAS_THRESHOLD, ACC_DTYPE)
    dropped = tl.zeros((BLOCK_M,), tl.int32)   # keys the threshold rule drops (among the others' kept)
    s = tl.load(scale_ptr).to(ACC_DTYPE)

    q_tile = resident_tile(q_ptr, rows, M, D, BLOCK_M, BLOCK_D, SINGLE_D)   # reused for all keys

    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        dots, _ = score_tile(q_ptr, k_ptr, rows, cols, M, N, D, q_tile,
                             ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D)
        klab = load_labels(klab_ptr, cols, N, HAS_LABELS)
        logits = dots * s                                                # L_ij (nats)
        keep = (cols[None, :] < N) & kept(cols[None, :], ex0[:, None], ex1[:, None], rlab[:, None], klab[None, :],
                                          pos[:, None], HAS_LABELS, logits, thr[:, None], tpos[:, None], False)
        if HAS_THRESHOLD:  # kept(..., HAS_THRESHOLD) in two steps, counting the second
            drop = keep & threshold_drops(cols[None, :], logits, thr[:, None], tpos[:, None])
            dropped += tl.sum(drop.to(tl.int32), axis=1)
            keep = keep & ~drop
        x = tl.where(keep, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC_DTYPE)
        # subtract in nats first (near-exact), then scale to base 2 for exp2
        l_i = l_i * tl.exp2((m_i - m_safe) * LOG2E) + tl.sum(tl.exp2((x - m_safe[:, None]) * LOG2E), axis=1)
        m_i = m_new

    lse = m_i + tl.log2(l_i) * LN2
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if HAS_THRESHOLD:
        tl.store(cnt_ptr + rows, dropped, mask=row_ok)


_autotuned = None


def _autotuned_kernel():
    global _autotuned
    if _autotuned is None:
        base = _config.TileConfig(64, 64, 16, 16, True, 4, 2)
        cfgs = [triton.Config({"BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N},
                              num_warps=c.num_warps, num_stages=c.num_stages)
                for c in _config.autotune_configs(base)]
        _autotuned = triton.autotune(cfgs, key=["M", "N", "D", "E", "HAS_LABELS", "BLOCK_D", "SINGLE_D",
                                                    "HAS_THRESHOLD"])(_lse_fwd_kernel)
    return _autotuned


def threshold_args(spec, dummy):
    """(threshold, its positives, HAS_THRESHOLD) kernel arguments of ``spec``'s threshold rule
    (``dummy`` pointers, never read, without it)."""
    if spec.threshold is None:
        return dummy, dummy, False
    return spec.threshold, spec.positive, True


def lse_forward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, spec, count: bool = False):
    """Row LSE of ``scale * q @ k.T`` without the pairs ``spec`` excludes.

    Args:
        q: (M, d) contiguous, fp16/bf16/fp32/fp64.
        k: (N, d) contiguous, same dtype (may be ``q`` itself).
        scale: () fp32 (fp64 for fp64 inputs), read on device.
        spec: ``infonce_kernels.ops.Exclusion``: exclude (M, E) int64, E in {0, 1, 2}, -1 = none;
            with the label rule row i also skips every key j with key_labels[j] == row_labels[i]
            and j != positive[i]; with the threshold rule every key j with s <q_i, k_j> >
            threshold[i] and j != positive[i].
        count: also return the threshold rule's per-row dropped count.

    Returns:
        lse: (M,) fp32 (fp64 for fp64 inputs); with ``count`` (lse, dropped (M,) int32).
    """
    M, D = q.shape
    N = k.shape[0]
    exclude, labels = spec.exclude, spec.labels
    E = exclude.shape[1]
    lse = torch.empty(M, device=q.device, dtype=accumulation_dtype(q.dtype))
    cfg = _config.forward_config(q.device, q.dtype, M, N, D)
    ex = exclude if E > 0 else q                       # dummy pointer, never read
    rl, kl, pos = labels if labels is not None else (q, q, q)
    thr, tpos, has_threshold = threshold_args(spec, q)
    dropped = torch.zeros(M, device=q.device, dtype=torch.int32)
    common = dict(E=E, HAS_LABELS=labels is not None, ACC_DTYPE=acc_dtype(q.dtype), INPUT_PRECISION=input_precision(q.dtype),
                  HAS_THRESHOLD=has_threshold)
    if _config.autotune_enabled():
        kern = _autotuned_kernel()
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
        kern[grid](q, k, scale, ex, rl, kl, pos, lse, thr, tpos, dropped, M, N, D, **common,
                   BLOCK_D=cfg.BLOCK_D, BLOCK_DO=cfg.BLOCK_DO, SINGLE_D=cfg.SINGLE_D)
    else:
        grid = (triton.cdiv(M, cfg.BLOCK_M),)
        _lse_fwd_kernel[grid](q, k, scale, ex, rl, kl, pos, lse, thr, tpos, dropped, M, N, D, **common, **cfg.meta())
    return (lse, dropped) if count else lse
