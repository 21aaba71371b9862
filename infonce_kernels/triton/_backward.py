"""Backward kernels: dq, dk and dscale without any N x N buffer (general, symmetric, paired).

Given the forward's row LSE r (M,) and the upstream gradient g (M,):

    P_ij = exp(s <q_i,k_j> - r_i)   for (i, j) not excluded, else 0
    W_ij = g_i P_ij
    dq_i = s * g_i * sum_j P_ij k_j        (g_i factors out of the row sum)
    dk_j = s * sum_i W_ij q_i
    ds   = sum_ij W_ij <q_i, k_j>

General case (k is a separate tensor): two kernels that each recompute the
score tile  <q_i, k_j>  from q and k:

* ``_dq_kernel``  grid (row blocks, d-out chunks): walks all key blocks,
  accumulates dq and (in d-chunk 0) the per-program dscale partial;
* ``_dk_kernel``  grid (key blocks, d-out chunks): walks all row blocks,
  accumulates dk.

Symmetric and paired cases: one kernel, ``_dq_paired_kernel`` (grid: row blocks,
d-out chunks), for the gradient on q when the keys are rows of a log-sum-exp
too (``lse_bwd_paired``):

    dq_i = s sum_j (W_ij + V_ji) k_j,   V_ji = h_j Q_ji,  Q_ji = exp(s <q_i,k_j> - rho_j)

with h (N,) the keys' upstream gradient, rho (N,) their LSE, and Q_ji = 0
where key j, as a row, excludes row i (its own list ``key_exclude`` (N, E')
numbering the rows of q from ``row_offset``, or the label rule seen from
key j: key_labels[j] == row_labels[i] and key_positive[j] != i + row_offset).
With the threshold rule each side drops by its own rows' thresholds: P_ij = 0 where
s <q_i,k_j> > threshold_i (j not row i's positive), Q_ji = 0 where s <q_i,k_j> > key_threshold_j
(i + row_offset not key j's positive). Each program produces its rows of dq with one pass
over the key blocks, two exp2 per pair, no atomics. The symmetric backward (k is q = z, M = N) is the
launch with the key side = the row side and row_offset = 0:

    dz = s (W + W^T) z,   (W + W^T)_ij = g_i P_ij + g_j P_ji

dscale: each program of d-chunk 0 writes one partial sum to ``partials``
(one slot per row block); the host sums that fixed-length vector with
``torch.sum`` in fp64: a fixed order, hence bitwise reproducible.

Range: for fp16 inputs the weight tile is cast to fp16 before the second
``tl.dot``; with a mean reduction g_i ~ 1/M and W_ij = g_i P_ij would
underflow. The kernels therefore use g / gmax (gmax = max |g|, computed on
device, never synced; max(|g|, |h|) in the paired kernel) and multiply the
result by gmax in the epilogue.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config
from ..ops.precision import accumulation_dtype
from ._common import acc_dtype, input_precision, kept, load_labels, load_tile, log2_prob
from ._forward import (block_range, exclusion_span, program_block, resident_tile, row_rule, rule_args, score_tile,
                       tile_masked)


@triton.jit
def _load_g_scale(gmax_ptr, ACC_DTYPE: tl.constexpr):
    """max |g| as a safe divisor: 1 when it is 0 or not finite (then g passes unchanged)."""
    gm = tl.load(gmax_ptr).to(ACC_DTYPE)
    ok = (gm > 0) & (gm < float("inf"))
    return tl.where(ok, gm, 1.0).to(ACC_DTYPE)


@triton.jit
def _store_chunk(out_ptr, idx, idx_ok, do0, D, val, BLOCK_DO: tl.constexpr):
    """Store ``val`` (BLOCK, BLOCK_DO) into features [do0, do0 + BLOCK_DO) of the rows ``idx`` of
    the contiguous (R, D) output, cast to its dtype; rows out of range (not idx_ok) and features
    >= D are skipped."""
    offs_d = do0 + tl.arange(0, BLOCK_DO)
    ptrs = out_ptr + idx.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(ptrs, val.to(out_ptr.dtype.element_ty), mask=idx_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _lse_rows(start, BLOCK: tl.constexpr, bound, ex_ptr, lab_ptr, pos_ptr, thr_ptr, lse_ptr, g_ptr, gs,
              E: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_THRESHOLD: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Rows ``start + [0, BLOCK)`` of a log-sum-exp side with ``bound`` rows, as an inner loop
    walks them: (idx, ok, ex0, ex1, label, positive, threshold, lse, g / gs), each (BLOCK,): the
    indices and their in-range mask, their side of the exclusion rule (``row_rule``), their LSE
    and their upstream gradient divided by the range scale gs, in ACC_DTYPE."""
    idx, ok = block_range(start, BLOCK, bound)
    ex0, ex1, lab, pos, thr = row_rule(ex_ptr, lab_ptr, pos_ptr, thr_ptr, idx, bound, E, HAS_LABELS, HAS_THRESHOLD,
                                       ACC_DTYPE)
    lse = tl.load(lse_ptr + idx, mask=ok, other=0.0).to(ACC_DTYPE)
    g = tl.load(g_ptr + idx, mask=ok, other=0.0).to(ACC_DTYPE) / gs
    return idx, ok, ex0, ex1, lab, pos, thr, lse, g


@triton.jit
def rows_hit(ex0, ex1, base, BLOCK_R: tl.constexpr, E: tl.constexpr):
    """Whether any of the excluded indices ``ex0``/``ex1`` ((BLOCK,) int32, -1 none) falls in
    [base, base + BLOCK_R): one reduction per tile (false without lists, E = 0)."""
    if E == 0:
        out = base < 0
    else:
        hit = ((ex0 - base).to(tl.uint32) < BLOCK_R) | ((ex1 - base).to(tl.uint32) < BLOCK_R)
        out = tl.max(hit.to(tl.int32), axis=0) > 0
    return out


@triton.jit
def _pair_keeps(dots, s, n0, kj, ri, r_base, row_ok, col_ok, exr0, exr1, rlab_r, pos_r, thr_r,
                exc0, exc1, krlab_c, kpos_c, thr_c, kklab_r, klab_ptr, cols, N,
                HAS_LABELS: tl.constexpr, HAS_THRESHOLD: tl.constexpr, KEY_THRESHOLD: tl.constexpr):
    """(keep_ij, keep_ji) (BLOCK_M, BLOCK_N) of the paired kernel's tile: whether the row side (row
    i's rule: its lists ``exr0``/``exr1`` in key numbering, labels, threshold) and the key side (key
    j's rule over the rows of q, numbered here from ``r_base``, the tile's first row: ``exc0``/
    ``exc1``, labels, threshold) keep pair (i, j), rows and keys in range. Indices tile-relative
    int32 (``kept``); the keys of the tile are ``n0 + kj``."""
    both = row_ok[:, None] & col_ok[None, :]
    klab_c = load_labels(klab_ptr, cols, N, HAS_LABELS)
    keep_ij = both & kept(kj[None, :], (exr0 - n0)[:, None], (exr1 - n0)[:, None], rlab_r[:, None], klab_c[None, :],
                          (pos_r - n0)[:, None], HAS_LABELS, dots, s, thr_r[:, None], HAS_THRESHOLD)
    keep_ji = both & kept(ri[:, None], (exc0 - r_base)[None, :], (exc1 - r_base)[None, :], krlab_c[None, :],
                          kklab_r[:, None], (kpos_c - r_base)[None, :], HAS_LABELS, dots, s, thr_c[None, :],
                          KEY_THRESHOLD)
    return keep_ij, keep_ji


@triton.jit
def _accumulate(acc, w, ptr, idx, idx_bound, tile_t, do0, D,
                ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_DO: tl.constexpr, SINGLE_D: tl.constexpr):
    """acc + w @ V: w (BLOCK, BLOCK_R) the weight tile, cast to the input dtype; V (BLOCK_R, BLOCK_DO)
    the d-out chunk of rows ``idx`` of the contiguous (R, D) input: with SINGLE_D the transpose of
    ``tile_t``, the (BLOCK_D, BLOCK_R) tile ``score_tile`` loaded, else loaded here."""
    if SINGLE_D:
        v = tl.trans(tile_t)
    else:
        v = load_tile(ptr, idx, idx_bound, do0, D, BLOCK_R, BLOCK_DO)
    return tl.dot(w.to(v.dtype), v, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, scale_ptr, ex_ptr, rlab_ptr, klab_ptr, pos_ptr, thr_ptr, lse_ptr, g_ptr, dq_ptr, part_ptr,
    M, N, D,
    E: tl.constexpr, HAS_LABELS: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, SINGLE_D: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
):
    pid_m, rows, row_ok, do0 = program_block(BLOCK_M, M, BLOCK_DO)
    ex0, ex1, rlab, pos, thr = row_rule(ex_ptr, rlab_ptr, pos_ptr, thr_ptr, rows, M, E, HAS_LABELS, HAS_THRESHOLD,
                                        ACC_DTYPE)
    s = tl.load(scale_ptr).to(ACC_DTYPE)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)           # (BLOCK_M,)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)                # (BLOCK_M,)

    q_tile = resident_tile(q_ptr, rows, M, D, BLOCK_M, BLOCK_D, SINGLE_D)

    keys = tl.arange(0, BLOCK_N)                     # tile-relative key index
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC_DTYPE)   # sum_j P_ij k_j   (this d-out chunk)
    pl = tl.zeros((BLOCK_M,), ACC_DTYPE)             # sum_j P_ij <q_i, k_j>
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + keys
        # the forward's score tile
        dots, k_tile_t = score_tile(q_ptr, k_ptr, rows, cols, M, N, D, q_tile,
                                    ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D)
        klab = load_labels(klab_ptr, cols, N, HAS_LABELS)
        keep = row_ok[:, None] & (keys[None, :] < N - n0) & kept(
            keys[None, :], (ex0 - n0)[:, None], (ex1 - n0)[:, None], rlab[:, None], klab[None, :], (pos - n0)[:, None],
            HAS_LABELS, dots, s, thr[:, None], HAS_THRESHOLD)
        p = tl.exp2(tl.where(keep, log2_prob(dots, s, lse[:, None], INPUT_PRECISION), float("-inf")))  # P_ij
        pl += tl.sum(p * dots, axis=1)
        acc = _accumulate(acc, p, k_ptr, cols, N, k_tile_t, do0, D,
                          ACC_DTYPE, INPUT_PRECISION, BLOCK_N, BLOCK_DO, SINGLE_D)

    # dq_i = s g_i sum_j P_ij k_j
    _store_chunk(dq_ptr, rows, row_ok, do0, D, acc * (s * g)[:, None], BLOCK_DO)
    if do0 == 0:  # d-chunk 0
        tl.store(part_ptr + pid_m, tl.sum(g * pl, axis=0))


@triton.jit
def _dk_kernel(
    q_ptr, k_ptr, scale_ptr, ex_ptr, rlab_ptr, klab_ptr, pos_ptr, thr_ptr, lse_ptr, g_ptr, gmax_ptr, dk_ptr,
    M, N, D,
    E: tl.constexpr, HAS_LABELS: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, SINGLE_D: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
):
    # One program = BLOCK_N keys x one d-out chunk; walks all row blocks.
    # Tiles are held transposed: (keys, rows).
    pid_n, cols, col_ok, do0 = program_block(BLOCK_N, N, BLOCK_DO)
    klab = load_labels(klab_ptr, cols, N, HAS_LABELS)
    s = tl.load(scale_ptr).to(ACC_DTYPE)
    gs = _load_g_scale(gmax_ptr, ACC_DTYPE)

    k_tile = resident_tile(k_ptr, cols, N, D, BLOCK_N, BLOCK_D, SINGLE_D)

    keys = tl.arange(0, BLOCK_N)                     # key index relative to this program's first key
    n_base = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_N, BLOCK_DO), ACC_DTYPE)   # sum_i (g_i/gs) P_ij q_i
    for m0 in range(0, M, BLOCK_M):
        rows, row_ok, ex0, ex1, rlab, pos, thr, lse, g = _lse_rows(
            m0, BLOCK_M, M, ex_ptr, rlab_ptr, pos_ptr, thr_ptr, lse_ptr, g_ptr, gs, E, HAS_LABELS, HAS_THRESHOLD,
            ACC_DTYPE)
        # <k_j, q_i>  (BLOCK_N, BLOCK_M); q_tile_t (BLOCK_D, BLOCK_M)
        dots, q_tile_t = score_tile(k_ptr, q_ptr, cols, rows, N, M, D, k_tile,
                                    ACC_DTYPE, INPUT_PRECISION, BLOCK_N, BLOCK_M, BLOCK_D, SINGLE_D)
        keep = col_ok[:, None] & row_ok[None, :] & kept(
            keys[:, None], (ex0 - n_base)[None, :], (ex1 - n_base)[None, :], rlab[None, :], klab[:, None],
            (pos - n_base)[None, :], HAS_LABELS, dots, s, thr[None, :], HAS_THRESHOLD)
        w = tl.exp2(tl.where(keep, log2_prob(dots, s, lse[None, :], INPUT_PRECISION), float("-inf"))) * g[None, :]
        acc = _accumulate(acc, w, q_ptr, rows, M, q_tile_t, do0, D,
                          ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_DO, SINGLE_D)

    _store_chunk(dk_ptr, cols, col_ok, do0, D, acc * (s * gs), BLOCK_DO)


@triton.jit
def _dq_paired_kernel(
    q_ptr, k_ptr, scale_ptr, ex_ptr, rlab_ptr, klab_ptr, pos_ptr, thr_ptr, lse_ptr, g_ptr,
    kex_ptr, krlab_ptr, kklab_ptr, kpos_ptr, kthr_ptr, klse_ptr, kg_ptr, gmax_ptr, dq_ptr, part_ptr,
    M, N, D, row_offset,
    E: tl.constexpr, KE: tl.constexpr, HAS_LABELS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, SINGLE_D: tl.constexpr, HAS_THRESHOLD: tl.constexpr, KEY_THRESHOLD: tl.constexpr,
):
    # dq_i = s * sum_j (g_i P_ij + h_j Q_ji) k_j ; rows i of this program, all keys j.
    #   row side:  P_ij = exp(s<q_i,k_j> - r_i)   unless row i excludes key j
    #              (ex_ptr (M, E) in key numbering; label rule: rlab[i] == klab[j] and j != pos[i])
    #   key side:  Q_ji = exp(s<q_i,k_j> - rho_j) unless key j, as a row, excludes row i
    #              (kex_ptr (N, KE) numbering the rows of q from row_offset; label rule:
    #               krlab[j] == kklab[i] and kpos[j] != i + row_offset, where krlab (N,) are the
    #               keys' labels as rows and kklab (M,) the rows' labels as keys of the key side:
    #               key_labels / row_labels when paired, row_labels / key_labels when symmetric)
    #   threshold rule: each side's own, thr_ptr (M,) for the rows (HAS_THRESHOLD), kthr_ptr (N,)
    #              for the keys as rows (KEY_THRESHOLD), each kept positive (pos / kpos) as above
    # Symmetric backward: k = q, key side = row side, row_offset = 0 -> dz = s (W + W^T) z.
    pid_m, rows, row_ok, do0 = program_block(BLOCK_M, M, BLOCK_DO)
    exr0, exr1, rlab_r, pos_r, thr_r = row_rule(ex_ptr, rlab_ptr, pos_ptr, thr_ptr, rows, M, E, HAS_LABELS,
                                                HAS_THRESHOLD, ACC_DTYPE)
    kklab_r = load_labels(kklab_ptr, rows, M, HAS_LABELS)
    s = tl.load(scale_ptr).to(ACC_DTYPE)
    gs = _load_g_scale(gmax_ptr, ACC_DTYPE)                 # max(|g|, |h|)
    lse_r = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
    g_r = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE) / gs

    q_rows = resident_tile(q_ptr, rows, M, D, BLOCK_M, BLOCK_D, SINGLE_D)

    # tile-relative indices: keys j = n0 + kj for the row side's rule, rows i + row_offset =
    # r_base + ri for the key side's (whose lists number the rows of q from row_offset)
    kj = tl.arange(0, BLOCK_N)
    ri = tl.arange(0, BLOCK_M)
    r_base = pid_m * BLOCK_M + row_offset
    ex_lo, ex_hi = exclusion_span(exr0, exr1)       # the keys this program's rows exclude
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC_DTYPE)
    pl = tl.zeros((BLOCK_M,), ACC_DTYPE)             # sum_j P_ij <q_i, k_j>  (for dscale)
    for n0 in range(0, N, BLOCK_N):
        # the keys as rows of their own LSE (key j's list numbers the rows of q from row_offset)
        cols, col_ok, exc0, exc1, krlab_c, kpos_c, thr_c, lse_c, h_c = _lse_rows(
            n0, BLOCK_N, N, kex_ptr, krlab_ptr, kpos_ptr, kthr_ptr, klse_ptr, kg_ptr, gs, KE, HAS_LABELS, KEY_THRESHOLD,
            ACC_DTYPE)
        dots, k_cols_t = score_tile(q_ptr, k_ptr, rows, cols, M, N, D, q_rows,
                                    ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D)
        e_ij = log2_prob(dots, s, lse_r[:, None], INPUT_PRECISION)      # log2 P_ij where kept
        e_ji = log2_prob(dots, s, lse_c[None, :], INPUT_PRECISION)      # log2 Q_ji where kept
        # Interior tiles skip the exclusion rule: one test per tile (tiles that meet an excluded pair of
        # either side's lists, the end of the keys, or a per-pair rule take the rule); a select, so an
        # excluded pair's exp (may be inf) never reaches the sums. d > BLOCK_D (a 256-wide accumulator)
        # and the exact FMA products ("ieee": fp32, fp64, whose tiles already fill the registers)
        # apply the rule to every tile: the branch costs registers they do not have.
        if SINGLE_D and INPUT_PRECISION != "ieee":
            p_ij = tl.exp2(e_ij)
            q_ji = tl.exp2(e_ji)
            if tile_masked(n0, N, ex_lo, ex_hi, BLOCK_N, HAS_LABELS or HAS_THRESHOLD or KEY_THRESHOLD) | \
                    rows_hit(exc0, exc1, r_base, BLOCK_M, KE):
                keep_ij, keep_ji = _pair_keeps(dots, s, n0, kj, ri, r_base, row_ok, col_ok, exr0, exr1, rlab_r, pos_r,
                                               thr_r, exc0, exc1, krlab_c, kpos_c, thr_c, kklab_r, klab_ptr, cols, N,
                                               HAS_LABELS, HAS_THRESHOLD, KEY_THRESHOLD)
                p_ij = tl.where(keep_ij, p_ij, 0.0)
                q_ji = tl.where(keep_ji, q_ji, 0.0)
        else:
            keep_ij, keep_ji = _pair_keeps(dots, s, n0, kj, ri, r_base, row_ok, col_ok, exr0, exr1, rlab_r, pos_r,
                                           thr_r, exc0, exc1, krlab_c, kpos_c, thr_c, kklab_r, klab_ptr, cols, N,
                                           HAS_LABELS, HAS_THRESHOLD, KEY_THRESHOLD)
            p_ij = tl.exp2(tl.where(keep_ij, e_ij, float("-inf")))
            q_ji = tl.exp2(tl.where(keep_ji, e_ji, float("-inf")))
        pl += tl.sum(p_ij * dots, axis=1)
        w = g_r[:, None] * p_ij + h_c[None, :] * q_ji              # (W_ij + V_ji) / gs
        acc = _accumulate(acc, w, k_ptr, cols, N, k_cols_t, do0, D,
                          ACC_DTYPE, INPUT_PRECISION, BLOCK_N, BLOCK_DO, SINGLE_D)

    _store_chunk(dq_ptr, rows, row_ok, do0, D, acc * (s * gs), BLOCK_DO)
    if do0 == 0:  # d-chunk 0
        # sum_i g_i sum_j P_ij <q_i, k_j>  (g_r holds g_i / gs)
        tl.store(part_ptr + pid_m, tl.sum(g_r * pl, axis=0) * gs)


_autotuned: dict = {}

_TUNE_KEYS = {
    "dq": ["D", "E", "HAS_LABELS", "BLOCK_D", "BLOCK_DO", "SINGLE_D", "HAS_THRESHOLD"],
    "dk": ["D", "E", "HAS_LABELS", "BLOCK_D", "BLOCK_DO", "SINGLE_D", "HAS_THRESHOLD"],
    "paired": ["D", "E", "KE", "HAS_LABELS", "BLOCK_D", "BLOCK_DO", "SINGLE_D", "HAS_THRESHOLD", "KEY_THRESHOLD"],
}


def _maybe_autotuned(kernel, name: str, M: int, N: int):
    """The autotuned ``kernel`` of the shape bucket of (M, N) (one tuning per bucket)."""
    slot = (name,) + _config.shape_bucket(M, N)
    if slot not in _autotuned:
        cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                for bm, bn, w, st in _config.autotune_configs("dk" if name == "dk" else "backward")]
        # A config with BLOCK_M = 128 writes half the dscale partials of one with 64: zero them
        # after the benchmark runs so that the final launch leaves no stale slot behind.
        reset = ["part_ptr"] if "part_ptr" in kernel.arg_names else None
        _autotuned[slot] = triton.autotune(cfgs, key=_TUNE_KEYS[name], reset_to_zero=reset)(kernel)
    return _autotuned[slot]


def _holds_rule_vectors(*specs) -> bool:
    """Whether a launch holds the label or threshold rule's per-row / per-key vectors (labels,
    positives, thresholds): ``backward_config``'s narrower tiles (``labels=True``) then leave
    them registers. The threshold rule takes them as the label rule does (no spill-checked wide
    tiles for it yet)."""
    return any(spec.labels is not None or spec.threshold is not None for spec in specs)


def _dq_paired(grad, q, k, scale, spec, lse, key_grad, key_lse, key_spec, row_offset):
    """Launch :func:`_dq_paired_kernel`: -> (dq (M, d) q.dtype, dscale () scale.dtype).

    ``spec``: the row side's exclusion (keys numbered like k); ``key_spec``: the keys' as rows
    (the rows of q numbered from ``row_offset``; labels of the keys as rows, of the rows as
    keys, the keys' positives).

    One program per (row block, d-out chunk), one pass over the key blocks, no atomics;
    dscale is the fp64 sum of one partial per row block (fixed order: reproducible).
    """
    M, D = q.shape
    N = k.shape[0]
    exclude, key_exclude, labels = spec.exclude, key_spec.exclude, spec.labels
    E, KE = exclude.shape[1], key_exclude.shape[1]
    has_threshold, key_threshold = spec.threshold is not None, key_spec.threshold is not None
    cfg = _config.backward_config(q.device, q.dtype, M, N, D, labels=_holds_rule_vectors(spec, key_spec),
                                  paired=True)
    tune = _config.autotune_enabled()
    ex = exclude if E > 0 else q                       # dummy pointers, never read
    kex = key_exclude if KE > 0 else q
    # the key side's: labels of the keys as rows, of the rows as keys, the keys' positives and thresholds
    rules, key_rules = rule_args(spec, q), rule_args(key_spec, q)
    # One range divisor for both sides: the weights are (g_i P_ij + h_j Q_ji) / gmax.
    gmax = grad.abs().amax() if key_grad is grad else torch.maximum(grad.abs().amax(), key_grad.abs().amax())
    n_dchunks = triton.cdiv(D, cfg.BLOCK_DO)
    partials = torch.zeros(triton.cdiv(M, 64 if tune else cfg.BLOCK_M), device=q.device,
                           dtype=accumulation_dtype(q.dtype))
    dq = torch.empty_like(q)
    args = (q, k, scale, ex, *rules, lse, grad, kex, *key_rules, key_lse, key_grad, gmax,
            dq, partials, M, N, D, int(row_offset))
    common = dict(E=E, KE=KE, HAS_LABELS=labels is not None, ACC_DTYPE=acc_dtype(q.dtype),
                  INPUT_PRECISION=input_precision(q.dtype), HAS_THRESHOLD=has_threshold, KEY_THRESHOLD=key_threshold)
    if tune:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n_dchunks)  # noqa: E731
        _maybe_autotuned(_dq_paired_kernel, "paired", M, N)[grid](
            *args, **common, BLOCK_D=cfg.BLOCK_D, BLOCK_DO=cfg.BLOCK_DO, SINGLE_D=cfg.SINGLE_D)
    else:
        _dq_paired_kernel[(triton.cdiv(M, cfg.BLOCK_M), n_dchunks)](*args, **common, **cfg.meta())
    return dq, partials.to(torch.float64).sum().to(scale.dtype)


def lse_backward(grad, q, k, scale, spec, lse):
    """Gradients of ``lse`` (see module docstring).

    Args:
        grad: (M,) fp32 (fp64 for fp64 inputs), upstream gradient g.
        q, k, scale, spec: as for :func:`lse_forward` (``k is q`` when ``spec.symmetric``).
        lse: (M,) the forward's output r.

    Returns:
        (dq (M, d) q.dtype, dk (N, d) k.dtype or empty (0,) when symmetric, dscale () scale.dtype)
    """
    if spec.symmetric:
        # The paired kernel with the key side = the row side: k = q, h = g, rho = r, the
        # keys' exclusions = the rows' own, W^T_ij = W_ji under row j's label rule
        # (row_labels[j] == key_labels[i], i != positive[j]), row_offset = 0.
        dz, dscale = _dq_paired(grad, q, q, scale, spec, lse, grad, lse, spec, 0)
        return dz, q.new_empty(0), dscale

    M, D = q.shape
    N = k.shape[0]
    exclude, labels = spec.exclude, spec.labels
    E = exclude.shape[1]
    cfg = _config.backward_config(q.device, q.dtype, M, N, D, labels=_holds_rule_vectors(spec))
    tune = _config.autotune_enabled()
    ex = exclude if E > 0 else q                       # dummy pointer, never read
    lab = rule_args(spec, q)
    common = dict(E=E, HAS_LABELS=labels is not None, ACC_DTYPE=acc_dtype(q.dtype),
                  INPUT_PRECISION=input_precision(q.dtype), HAS_THRESHOLD=spec.threshold is not None)
    gmax = grad.abs().amax()             # device scalar; no host sync
    n_dchunks = triton.cdiv(D, cfg.BLOCK_DO)
    d_meta = dict(BLOCK_D=cfg.BLOCK_D, BLOCK_DO=cfg.BLOCK_DO, SINGLE_D=cfg.SINGLE_D)
    partials = torch.zeros(triton.cdiv(M, 64 if tune else cfg.BLOCK_M), device=q.device,
                           dtype=accumulation_dtype(q.dtype))
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    if tune:
        grid_q = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n_dchunks)  # noqa: E731
        grid_k = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), n_dchunks)  # noqa: E731
        _maybe_autotuned(_dq_kernel, "dq", M, N)[grid_q](
            q, k, scale, ex, *lab, lse, grad, dq, partials, M, N, D, **common, **d_meta)
        _maybe_autotuned(_dk_kernel, "dk", M, N)[grid_k](
            q, k, scale, ex, *lab, lse, grad, gmax, dk, M, N, D, **common, **d_meta)
    else:
        _dq_kernel[(triton.cdiv(M, cfg.BLOCK_M), n_dchunks)](
            q, k, scale, ex, *lab, lse, grad, dq, partials, M, N, D, **common, **cfg.meta())
        kcfg = _config.dk_config(cfg)
        _dk_kernel[(triton.cdiv(N, kcfg.BLOCK_N), n_dchunks)](
            q, k, scale, ex, *lab, lse, grad, gmax, dk, M, N, D, **common, **kcfg.meta())
    dscale = partials.to(torch.float64).sum().to(scale.dtype)
    return dq, dk, dscale


def lse_backward_paired(grad, q, k, scale, spec, lse, key_grad, key_lse, key_spec, row_offset):
    """(dq, dscale) when the keys are rows of a log-sum-exp too (the paired backward):

        dq_i = s sum_j (W_ij + V_ji) k_j
        W_ij = g_i exp(s<q_i,k_j> - r_i),  V_ji = h_j exp(s<q_i,k_j> - rho_j)
        dscale = sum_ij W_ij <q_i, k_j>          (the row side only)

    Args:
        grad, lse: (M,) g and r of the rows of q (fp32, fp64 for fp64 inputs).
        q (M, d), k (N, d), scale, spec: as for :func:`lse_backward` (k a separate tensor).
        key_grad, key_lse: (N,) h and rho of the keys as rows.
        key_spec: the keys' exclusion as rows: ``exclude`` (N, E'), E' <= 2, -1 = none, numbering
            the rows of q from ``row_offset`` (row i of q is ``i + row_offset``; entries outside
            exclude nothing), and with the label rule the swapped labels and the keys' positives.
        row_offset: int >= 0.
    """
    return _dq_paired(grad, q, k, scale, spec, lse, key_grad, key_lse, key_spec, row_offset)
