"""Forward kernel: masked, scaled row log-sum-exp, one program per row block.

    L_ij = s * <q_i, k_j>                       (never stored)
    r_i  = log sum_{j not excluded} exp(L_ij)

Each program owns BLOCK_M rows and walks all keys in BLOCK_N blocks, keeping
an online (running max m, running sum l) LSE in fp32 (fp64 for fp64
inputs); the max is taken over the raw dot products (s > 0) and scaled once per row:

    x_ij  = <q_i, k_j>                          (-inf where excluded / out of range)
    m'    = s max(m / s, max_j x_ij)            (nats)
    l'    = l * 2^((m - m') log2 e) + sum_j 2^(e_ij),   e_ij = (s x_ij - m') log2 e
    r_i   = m + ln 2 * log2 l

e_ij is ``log2_prob`` (one multiply-add per element for tensor-core products; nats first for
exact fp32 / fp64 products, see there).

With the threshold rule a pair is also excluded when s x_ij (the logit, in the threshold's
units) > threshold_i and j is not row i's positive; the forward counts those drops per row
(among the pairs the other rules keep) in the same sweep.

A tile in which every key of a row is excluded leaves m = -inf; the update
then uses 0 in place of m' so that no exp2(-inf - -inf) = NaN appears.

Shapes: q (M, d), k (N, d), scale () , exclude (M, E) int64, lse (M,), threshold (M,), dropped (M,) int32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.exclusion import Exclusion
from ..ops.precision import accumulation_dtype
from . import _config
from ._common import (INT32_MAX, LN2, LOG2E, acc_dtype, input_precision, kept, load_exclusions, load_labels,
                      load_positives, load_threshold, load_tile, load_tile_t, log2_prob, scores, threshold_drops)


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
def row_rule(ex_ptr, rlab_ptr, pos_ptr, thr_ptr, rows, M, E: tl.constexpr, HAS_LABELS: tl.constexpr,
             HAS_THRESHOLD: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The row side of the exclusion rule for ``rows`` (BLOCK,) of an (M,)-row side: (ex0, ex1,
    row_label, positive, threshold), each (BLOCK,): the indices int32 with -1 for none (absolute:
    the caller subtracts a tile's first index), the labels int64 (-1), the thresholds ACC_DTYPE
    (+inf for none): the row arguments of ``kept``. ``positive`` serves the label rule and the
    threshold rule alike (loaded when either is on)."""
    ex0, ex1 = load_exclusions(ex_ptr, rows, M, E)
    rlab = load_labels(rlab_ptr, rows, M, HAS_LABELS)
    pos = load_positives(pos_ptr, rows, M, HAS_LABELS or HAS_THRESHOLD)
    thr = load_threshold(thr_ptr, rows, M, HAS_THRESHOLD, ACC_DTYPE)
    return ex0, ex1, rlab, pos, thr


@triton.jit
def exclusion_span(ex0, ex1):
    """(lo, hi): the smallest and largest key index that rows with excluded indices ``ex0``/``ex1``
    ((BLOCK,) int32, -1 for none) exclude; (2**31 - 1, -1) when they exclude none. Once per
    program: a key tile that does not meet [lo, hi] holds no excluded pair of these rows."""
    big = tl.full(ex0.shape, INT32_MAX, tl.int32)
    lo = tl.minimum(tl.min(tl.where(ex0 >= 0, ex0, big), axis=0), tl.min(tl.where(ex1 >= 0, ex1, big), axis=0))
    hi = tl.maximum(tl.max(ex0, axis=0), tl.max(ex1, axis=0))
    return lo, hi


@triton.jit
def tile_masked(n0, N, lo, hi, BLOCK_N: tl.constexpr, ALWAYS: tl.constexpr):
    """Whether the key tile [n0, n0 + BLOCK_N) needs the per-element mask: it runs past N, meets
    the rows' exclusion span [lo, hi] (:func:`exclusion_span`), or ``ALWAYS`` (a per-pair rule
    such as the label rule, which any tile may meet). One scalar test per tile: the other
    (interior) tiles skip the mask work."""
    if ALWAYS:
        out = n0 >= 0
    else:
        out = (n0 + BLOCK_N > N) | ((n0 <= hi) & (n0 + BLOCK_N > lo))
    return out


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
    q_ptr, k_ptr, scale_ptr, ex_ptr, rlab_ptr, klab_ptr, pos_ptr, thr_ptr, lse_ptr, cnt_ptr,
    M, N, D,
    E: tl.constexpr, HAS_LABELS: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, SINGLE_D: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, row_ok = block_range(pid * BLOCK_M, BLOCK_M, M)
    ex0, ex1, rlab, pos, thr = row_rule(ex_ptr, rlab_ptr, pos_ptr, thr_ptr, rows, M, E, HAS_LABELS, HAS_THRESHOLD,
                                        ACC_DTYPE)
    dropped = tl.zeros((BLOCK_M,), tl.int32)   # keys the threshold rule drops (among the others' kept)
    s = tl.load(scale_ptr).to(ACC_DTYPE)

    q_tile = resident_tile(q_ptr, rows, M, D, BLOCK_M, BLOCK_D, SINGLE_D)   # reused for all keys

    keys = tl.arange(0, BLOCK_N)                     # tile-relative key index
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    ex_lo, ex_hi = exclusion_span(ex0, ex1)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + keys
        dots, _ = score_tile(q_ptr, k_ptr, rows, cols, M, N, D, q_tile,
                             ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D)
        x = dots                                                         # <q_i, k_j>, -inf if excluded
        if tile_masked(n0, N, ex_lo, ex_hi, BLOCK_N, HAS_LABELS):
            klab = load_labels(klab_ptr, cols, N, HAS_LABELS)
            keep = (keys[None, :] < N - n0) & kept(keys[None, :], (ex0 - n0)[:, None], (ex1 - n0)[:, None],
                                                   rlab[:, None], klab[None, :], (pos - n0)[:, None], HAS_LABELS,
                                                   dots, s, thr[:, None], False)
            x = tl.where(keep, dots, float("-inf"))
        if HAS_THRESHOLD:  # kept(..., HAS_THRESHOLD) in two steps, counting the second (-inf never drops)
            drop = threshold_drops(keys[None, :], x, s, thr[:, None], (pos - n0)[:, None])
            dropped += tl.sum(drop.to(tl.int32), axis=1)
            x = tl.where(drop, float("-inf"), x)
        m_new = tl.maximum(m_i, tl.max(x, axis=1) * s)                   # nats
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC_DTYPE)
        l_i = l_i * tl.exp2((m_i - m_safe) * LOG2E) + tl.sum(tl.exp2(log2_prob(x, s, m_safe[:, None], INPUT_PRECISION)),
                                                             axis=1)
        m_i = m_new

    lse = m_i + tl.log2(l_i) * LN2
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if HAS_THRESHOLD:
        tl.store(cnt_ptr + rows, dropped, mask=row_ok)


_autotuned: dict = {}


def _autotuned_kernel(M: int, N: int):
    """The autotuned forward kernel of the shape bucket of (M, N) (one tuning per bucket)."""
    bucket = _config.shape_bucket(M, N)
    if bucket not in _autotuned:
        cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                for bm, bn, w, st in _config.autotune_configs("forward")]
        _autotuned[bucket] = triton.autotune(
            cfgs, key=["D", "E", "HAS_LABELS", "BLOCK_D", "SINGLE_D", "HAS_THRESHOLD"])(_lse_fwd_kernel)
    return _autotuned[bucket]


def rule_args(spec, dummy):
    """The kernel pointers of ``spec``'s label and threshold rules, (row_labels, key_labels,
    positive, threshold): ``dummy`` (never read) for a rule that is off; ``positive`` is the
    one both rules keep."""
    def given(t):
        return dummy if t is None else t

    if spec.labels is None:
        return dummy, dummy, given(spec.positive), given(spec.threshold)
    return spec.row_labels, spec.key_labels, given(spec.positive), given(spec.threshold)


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
    rules = rule_args(spec, q)
    dropped = torch.zeros(M, device=q.device, dtype=torch.int32)
    common = dict(E=E, HAS_LABELS=labels is not None, ACC_DTYPE=acc_dtype(q.dtype),
                  INPUT_PRECISION=input_precision(q.dtype), HAS_THRESHOLD=spec.threshold is not None)
    if _config.autotune_enabled():
        kern = _autotuned_kernel(M, N)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
        kern[grid](q, k, scale, ex, *rules, lse, dropped, M, N, D, **common,
                   BLOCK_D=cfg.BLOCK_D, BLOCK_DO=cfg.BLOCK_DO, SINGLE_D=cfg.SINGLE_D)
    else:
        grid = (triton.cdiv(M, cfg.BLOCK_M),)
        _lse_fwd_kernel[grid](q, k, scale, ex, *rules, lse, dropped, M, N, D, **common, **cfg.meta())
    return (lse, dropped) if count else lse


# --------------------------------------------------------------------------- both directions, one pass
@triton.jit
def _lse_pair_fwd_kernel(
    a_ptr, b_ptr, scale_ptr, row_part_ptr, col_part_ptr,
    M, N, D, ROW_BLOCKS, COL_SPLIT,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, SINGLE_D: tl.constexpr,
):
    # Program (g, c): rows [g ROW_BLOCKS BLOCK_M, +ROW_BLOCKS BLOCK_M) of a against keys
    # [c COL_SPLIT, +COL_SPLIT) of b (COL_SPLIT a multiple of BLOCK_N), one flat loop over its tiles,
    # row block by row block. Each tile L = s a b^T is computed once and feeds both sides:
    #   rows:    online (m, l) over the split's keys, stored per row as row_part[c, :, i]
    #   columns: online (m, l) per key over the group's rows, kept in col_part[g, :, j], which only
    #            this program touches (read and written back once per tile)
    # part[0] holds m (nats, -inf for none), part[1] l; the host merges the partials (logsumexp).
    pid_g = tl.program_id(0)
    pid_c = tl.program_id(1)
    s = tl.load(scale_ptr).to(ACC_DTYPE)
    c0 = pid_c * COL_SPLIT
    n_tiles = tl.cdiv(tl.minimum(COL_SPLIT, N - c0), BLOCK_N)       # key tiles of this split (>= 1)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    for t in range(0, ROW_BLOCKS * n_tiles):
        rb = t // n_tiles
        n0 = c0 + (t - rb * n_tiles) * BLOCK_N
        m0 = (pid_g * ROW_BLOCKS + rb) * BLOCK_M
        rows, row_ok = block_range(m0, BLOCK_M, M)
        cols, col_ok = block_range(n0, BLOCK_N, N)
        q_tile = resident_tile(a_ptr, rows, M, D, BLOCK_M, BLOCK_D, SINGLE_D)
        x, _ = score_tile(a_ptr, b_ptr, rows, cols, M, N, D, q_tile,
                          ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D)
        if (m0 + BLOCK_M > M) | (n0 + BLOCK_N > N):       # boundary tile: rows or keys out of range
            x = tl.where(row_ok[:, None] & col_ok[None, :], x, float("-inf"))
        # rows: the online LSE of the forward kernel (new max first, one exp per element)
        m_new = tl.maximum(m_i, tl.max(x, axis=1) * s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC_DTYPE)
        l_i = l_i * tl.exp2((m_i - m_safe) * LOG2E) + tl.sum(
            tl.exp2(log2_prob(x, s, m_safe[:, None], INPUT_PRECISION)), axis=1)
        m_i = m_new
        # columns: the same online LSE per key, its state read from and written back to this
        # program's partial (the first row block starts it)
        cpart = col_part_ptr + pid_g * 2 * N + cols
        seen = rb > 0
        cm = tl.where(seen, tl.load(cpart, mask=col_ok, other=float("-inf")), float("-inf"))
        cl = tl.where(seen, tl.load(cpart + N, mask=col_ok, other=0.0), 0.0)
        c_new = tl.maximum(cm, tl.max(x, axis=0) * s)
        c_safe = tl.where(c_new == float("-inf"), 0.0, c_new).to(ACC_DTYPE)
        cl = cl * tl.exp2((cm - c_safe) * LOG2E) + tl.sum(
            tl.exp2(log2_prob(x, s, c_safe[None, :], INPUT_PRECISION)), axis=0)
        cm = c_new
        tl.store(cpart, cm, mask=col_ok)
        tl.store(cpart + N, cl, mask=col_ok)
        if t - rb * n_tiles == n_tiles - 1:                # the row block's last key tile
            rpart = row_part_ptr + pid_c * 2 * M + rows
            tl.store(rpart, m_i, mask=row_ok)
            tl.store(rpart + M, l_i, mask=row_ok)
            m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
            l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
        # the partial's stores land before the next row block reads it: the threads that hold a key's
        # replicated state read it, one of them stores it
        tl.debug_barrier()


def pair_grid(M: int, N: int, cfg) -> tuple[int, int, int, int]:
    """(groups, splits, row_blocks, col_split) of the one-pass pair forward: at most P =
    ``_config.pair_splits()`` row groups of row_blocks BLOCK_M-row blocks each and P key splits of
    col_split keys (a multiple of BLOCK_N): groups x splits programs (256 at most on a GPU: about
    two per SM of an H100) and a scratch of 2 (splits M + groups N) accumulator values."""
    most = _config.pair_splits()
    blocks_m, blocks_n = triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(N, cfg.BLOCK_N)
    row_blocks = triton.cdiv(blocks_m, min(most, blocks_m))
    tiles = triton.cdiv(blocks_n, min(most, blocks_n))
    return triton.cdiv(blocks_m, row_blocks), triton.cdiv(blocks_n, tiles), row_blocks, tiles * cfg.BLOCK_N


def lse_pair_forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor):
    """``(lse(a, b, s), lse(b, a, s))`` without exclusions in one pass over the tiles of
    s a b^T: each score tile is computed once and feeds the row and the column log-sum-exp.

    Args:
        a: (M, d), b: (N, d) contiguous, one dtype (fp16/bf16/fp32/fp64); scale () fp32 (fp64).

    Returns:
        r (M,), t (N,) in the accumulation dtype (fp32, fp64 for fp64 inputs).

    Scratch: partial (max, sum) pairs, 2 (C M + G N) accumulator values for G row groups and C key
    splits (:func:`pair_grid`, both <= ``_config.PAIR_SPLITS`` = 16): at most 2 x 16 x 4 B (M + N)
    = 128 B per row of either side for fp32 (B = 32,768 rows each side: 8.4 MB, an eighth of the
    bf16 d = 512 embeddings' 67 MB; at most half of 16-bit embeddings for any d >= 128), merged
    here with one logsumexp per side.
    """
    M, D = a.shape
    N = b.shape[0]
    acc = accumulation_dtype(a.dtype)
    cfg = _config.forward_config(a.device, a.dtype, M, N, D)
    groups, splits, row_blocks, col_split = pair_grid(M, N, cfg)
    # every (split, row) and (group, key) slot is written: each split has keys, each group rows
    row_part = torch.empty(splits, 2, M, device=a.device, dtype=acc)
    col_part = torch.empty(groups, 2, N, device=a.device, dtype=acc)
    _lse_pair_fwd_kernel[(groups, splits)](
        a, b, scale, row_part, col_part, M, N, D, row_blocks, col_split,
        ACC_DTYPE=acc_dtype(a.dtype), INPUT_PRECISION=input_precision(a.dtype), **cfg.meta())
    return _merge_partials(row_part), _merge_partials(col_part)


def lse_pair(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor):
    """``(lse(a, b, s), lse(b, a, s))`` without exclusions: :func:`lse_pair_forward` (one pass)
    when d spans several BLOCK_D chunks, else two :func:`lse_forward` passes. With d in one chunk
    the pass's column reductions (across the rows of a tile: shuffles and shared memory) cost more
    issue slots than the second product saves (compiled for sm_90 with the kernel report's tools,
    bf16 d = 128: 35.4 thread-instructions per element against 2 x 8.6); with d in chunks the
    product dominates (d = 512: 62.2 against 2 x 29.8, and half the tensor work)."""
    cfg = _config.forward_config(a.device, a.dtype, a.shape[0], b.shape[0], a.shape[1])
    if cfg.SINGLE_D:
        none_a, none_b = Exclusion.none(a.shape[0], a.device), Exclusion.none(b.shape[0], b.device)
        return lse_forward(a, b, scale, none_a), lse_forward(b, a, scale, none_b)
    return lse_pair_forward(a, b, scale)


def _merge_partials(part: torch.Tensor) -> torch.Tensor:
    """(P, 2, R) partial (m, l) pairs -> (R,) log-sum-exp: logsumexp_p(m_p + log l_p)."""
    return torch.logsumexp(part[:, 0] + torch.log(part[:, 1]), dim=0)
