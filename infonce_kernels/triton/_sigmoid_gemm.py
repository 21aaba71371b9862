"""Pairwise sigmoid (SigLIP) gradients for large d: G blocks from a Triton kernel, the products by GEMMs.

Why (docs/design.md section 7): the sweeps of ``_sigmoid.py`` keep a (BLOCK_M, d) fp32 gradient
accumulator in registers, which fits for d <= 128 (16-bit) only; beyond, each 128-wide output
chunk is its own program and recomputes S = x y^T over all of d (6 programs per tile at d = 768).
Here S is computed once per tile and the two gradient products are plain GEMMs:

    G'_ij  = t g_i (sigmoid(l_ij) - [z_ij = 1])        (t folded in; g = 1 in the fused forward)
    dx     = G' y,   dy = G'^T x,   dt = sum_ij G_ij S_ij,   db = sum_ij G_ij   (G = G' / t)

Schedule: the columns are cut into C groups of ``cols`` = ceil(N / C) columns and the rows into
bands of R rows. For each column group c (an fp32 accumulator dy_c of (cols, d)) and each band r:

* ``_gblock_kernel`` writes the block G'_rc (R x cols, input dtype) into a scratch buffer, and in
  the same epilogue the loss terms (per-program partials of each row, summed in a fixed order),
  sum G S and sum G (per-program partials, summed in float64 at the end: deterministic);
* dy_c += G'_rc^T x_r   (fp32 output, one GEMM; dy_c is rounded once, after the last band);
* dx_r  = round(dx_r + G'_rc y_c)   (the product in fp32, added to dx_r in fp32, rounded once
  per column group: C roundings of dx's running sum; docs/design.md states the numerics).

The GEMMs are ``torch.mm`` / ``torch.addmm`` (cuBLAS on a GPU) with an fp32 result for 16-bit
operands (``out_dtype``); where a device has no such kernel (CPU under the interpreter) the
operands are widened first. R and C come from a memory budget (:func:`plan`): outputs, G block
and dy_c together at most ``MEMORY_BUDGET`` x the embeddings.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops import gblock_gemm
from ..ops.gblock_gemm import GemmPlan
from ..ops.gblock_gemm import mm_into as _mm_into
from ..ops.precision import accumulation_dtype
from . import _config
from ._common import acc_dtype, input_precision
from ._gemm import score_block
from ._sigmoid import pair_terms

#: the extra memory the gradients may take, outputs (dx, dy) included, in units of the embeddings
#: (x and y); issue 17's target is 1.5, the rest is left for the loss rows and cuBLAS's workspace
MEMORY_BUDGET = 1.45
#: programs per G block launch the column split aims at (two per SM of an H100/H200)
TARGET_PROGRAMS = 264


def kernel_tiles(device: torch.device, dtype: torch.dtype) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) of the G kernel. 16-bit: 128 x 64 tiles,
    128-wide d chunks, 8 warps (wgmma on sm_90; ptxas -v, triton 3.9: 251 registers, no spills;
    57 thread-instructions per element against 77 at 128 x 32, where the d loop's loads weigh
    twice as much per element). 128 x 128 spilled about 1 KB (the epilogue's loss series, G and
    both sums live together), 256-wide d chunks 8 B."""
    if _config.interpret_mode():
        return _config.INTERPRET_BLOCK, _config.INTERPRET_BLOCK, 16, 4, 1
    if dtype in (torch.float16, torch.bfloat16):
        return 128, 64, 128, 8, 3 if _config._capability(device) >= (9, 0) else 2
    if dtype == torch.float32:
        return 64, 64, 32, 4, 2
    return 32, 32, 16, 4, 1


def plan(M: int, N: int, d: int, dtype: torch.dtype, device: torch.device, *,
         budget: float = None, min_band: int = None) -> GemmPlan:
    """``gblock_gemm.plan`` with this kernel's tiles and ``MEMORY_BUDGET`` (default).

    B = 65,536, d = 768, bf16: C = 6 groups of 10,944 columns, R = 2,048 (G block 42.8 MiB, dy_c
    32.1 MiB, dx product 6 MiB, outputs 192 MiB: 1.42x the embeddings).
    """
    return gblock_gemm.plan(M, N, d, dtype, kernel_tiles(device, dtype), MEMORY_BUDGET if budget is None else budget,
                            min_band, interpret=_config.interpret_mode())


@triton.jit
def _gblock_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, row_lab_ptr, col_lab_ptr, g_ptr,
    gblk_ptr, ldg, loss_ptr, gs_ptr, gsum_ptr,
    row0, n_rows, col0, n_cols, D, off, col_progs,
    WITH_LOSS: tl.constexpr, HAS_G: tl.constexpr, HAS_LABELS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, TERMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """One program: BLOCK_M rows of the band [row0, n_rows) against the column blocks
    ``cp, cp + col_progs, ...`` of the group [col0, n_cols) (``cp`` = pid % col_progs).

    Writes G' (rows - row0, cols - col0) into gblk (leading dimension ``ldg``, input dtype);
    per program: loss_ptr[cp, rows - row0] (loss terms of its columns, WITH_LOSS),
    gs_ptr[pid] = sum G S, gsum_ptr[pid] = sum G (G without t). Rows / columns beyond the
    bounds load as zeros and are neither stored nor summed.
    """
    pid = tl.program_id(0)
    rb = pid // col_progs
    cp = pid % col_progs
    ii = tl.arange(0, BLOCK_M)
    jj = tl.arange(0, BLOCK_N)
    a0 = row0 + rb * BLOCK_M
    rows = a0 + ii
    row_ok = rows < n_rows
    t = tl.load(scale_ptr).to(ACC_DTYPE)
    b = tl.load(bias_ptr).to(ACC_DTYPE)
    if HAS_LABELS:
        row_lab = tl.load(row_lab_ptr + rows, mask=row_ok, other=-1)
    if HAS_G:
        g_row = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
    loss = tl.zeros((BLOCK_M,), ACC_DTYPE)
    gs = tl.zeros((BLOCK_M,), ACC_DTYPE)
    gsum = tl.zeros((BLOCK_M,), ACC_DTYPE)
    xoff = tl.minimum(rows, n_rows - 1).to(tl.int64) * D
    grow = (rows - row0) * ldg                  # int32: plan() keeps a G block under 2**31 elements
    for b0 in range(col0 + cp * BLOCK_N, n_cols, col_progs * BLOCK_N):
        cols = b0 + jj
        col_ok = cols < n_cols
        # S over all of d. Rows / columns beyond the bounds read the last valid one (clamped, no
        # load masks: their products are discarded by the masks of the epilogue), so with
        # D % BLOCK_D == 0 the d loop loads without any mask
        yoff = tl.minimum(cols, n_cols - 1).to(tl.int64) * D
        dots = score_block(x_ptr, y_ptr, xoff, yoff, D, ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D)
        l = dots * t + b
        if HAS_LABELS:
            pos = row_lab[:, None] == tl.load(col_lab_ptr + cols, mask=col_ok, other=-1)[None, :]
        else:
            pos = jj[None, :] == (ii + (off + a0 - b0))[:, None]          # j - i == off, tile-relative int32
        sp, core = pair_terms(l, pos, WITH_LOSS, True, TERMS)
        ok = col_ok[None, :]
        if WITH_LOSS:
            loss += tl.sum(tl.where(ok, sp, 0.0), axis=1)
        if HAS_G:
            core = core * g_row[:, None]                                   # G = g_i (sigmoid - [pos])
        core = tl.where(ok, core, 0.0)
        gsum += tl.sum(core, axis=1)
        gs += tl.sum(core * dots, axis=1)
        tl.store(gblk_ptr + (grow[:, None] + (cols - col0)[None, :]), (core * t).to(gblk_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & ok)
    if WITH_LOSS:
        tl.store(loss_ptr + cp * (n_rows - row0) + (rows - row0), loss, mask=row_ok)
    tl.store(gs_ptr + pid, tl.sum(tl.where(row_ok, gs, 0.0), 0))
    tl.store(gsum_ptr + pid, tl.sum(tl.where(row_ok, gsum, 0.0), 0))


def gemm_gradients(x, y, scale, bias, labels, offset, g, with_loss, p: GemmPlan):
    """(loss or None, dx, dy, dscale, dbias) of the pairwise sigmoid loss by G blocks and GEMMs.

    x (M, d), y (N, d) contiguous, one dtype; scale, bias () accumulation dtype; labels () or
    (row_labels (M,), col_labels (N,)); g (M,) accumulation dtype or None (unit upstream
    gradient). loss (M,) accumulation dtype, dx/dy input dtype, dscale/dbias () accumulation dtype.
    """
    M, D = x.shape
    N = y.shape[0]
    acc = accumulation_dtype(x.dtype)
    dev = x.device
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    loss = torch.zeros(M, device=dev, dtype=acc) if with_loss else None
    if M == 0 or N == 0:                                   # no pairs: every gradient is zero
        z = scale.new_zeros(())
        return loss, dx.zero_(), dy.zero_(), z, z.clone()
    rl, cl = labels if labels else (None, None)
    off = max(-M - 1, min(int(offset), N + 1))             # no positive pair outside (-M, N) anyway
    row_blocks = triton.cdiv(p.band, p.BLOCK_M)
    col_progs = max(1, min(triton.cdiv(p.cols, p.BLOCK_N), triton.cdiv(TARGET_PROGRAMS, row_blocks)))
    bands = triton.cdiv(M, p.band)
    gblk = torch.empty(p.band, p.cols, device=dev, dtype=x.dtype)        # scratch: one G block
    dy_c = torch.empty(p.cols, D, device=dev, dtype=acc)                  # scratch: dy of one column group
    prod = torch.empty(p.band, D, device=dev, dtype=acc)                  # scratch: one band's dx product
    lpart = torch.empty(col_progs, p.band, device=dev, dtype=acc) if with_loss else None
    # per-program partials of sum G S and sum G (zeros where a short last band launches fewer)
    gs = torch.zeros(p.groups, bands, row_blocks * col_progs, device=dev, dtype=acc)
    gsum = torch.zeros_like(gs)
    for c in range(p.groups):                                # plan(): no group is empty
        c0, c1 = c * p.cols, min(N, (c + 1) * p.cols)
        for r in range(bands):
            r0, r1 = r * p.band, min(M, (r + 1) * p.band)
            _gblock_kernel[(triton.cdiv(r1 - r0, p.BLOCK_M) * col_progs,)](
                x, y, scale, bias, rl if rl is not None else x, cl if cl is not None else x,
                g if g is not None else x, gblk, p.cols, lpart if with_loss else x, gs[c, r], gsum[c, r],
                r0, r1, c0, c1, D, off, col_progs,
                WITH_LOSS=with_loss, HAS_G=g is not None, HAS_LABELS=rl is not None,
                ACC_DTYPE=acc_dtype(x.dtype), INPUT_PRECISION=input_precision(x.dtype),
                TERMS=16 if x.dtype == torch.float64 else 7, BLOCK_M=p.BLOCK_M, BLOCK_N=p.BLOCK_N,
                BLOCK_D=p.BLOCK_D, EVEN_D=D % p.BLOCK_D == 0, num_warps=p.num_warps, num_stages=p.num_stages)
            blk = gblk[: r1 - r0, : c1 - c0]
            if with_loss:
                loss[r0:r1] += lpart.view(-1)[: col_progs * (r1 - r0)].view(col_progs, r1 - r0).sum(0)
            _mm_into(dy_c[: c1 - c0], blk.t(), x[r0:r1], accumulate=r > 0)
            pr = prod[: r1 - r0]
            _mm_into(pr, blk, y[c0:c1], accumulate=False)
            if c > 0:
                pr += dx[r0:r1]                     # dx's running sum in fp32, rounded once per group
            dx[r0:r1] = pr
        dy[c0:c1] = dy_c[: c1 - c0]
    # partial sums in a fixed order, in fp64: deterministic
    dscale = gs.double().sum().to(scale.dtype)
    dbias = gsum.double().sum().to(bias.dtype)
    return loss, dx, dy, dscale, dbias
