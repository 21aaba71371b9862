"""CLIP's backward for large d: G blocks from a Triton kernel, the products by GEMMs (the schedule,
backend-neutral: ``infonce_kernels/ops/pair_gemm.py``, which states the maths).

Why (docs/design.md section 7): the paired backward (``_dq_paired_kernel``) keeps a (BLOCK_M,
BLOCK_DO) fp32 accumulator in registers; beyond one output chunk (16-bit: d > 256) every chunk is
its own program that recomputes S over all of d and both exps, and CLIP runs it once per side:
at d = 512 every score tile is computed four times. Here S is computed once per tile
(``_gpair_kernel``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops import gblock_gemm, pair_gemm
from ..ops.gblock_gemm import GemmPlan
from ..ops.pair_gemm import MEMORY_BUDGET, MIN_SCRATCH_BYTES  # the budget shared with the CUDA backend
from . import _config
from ._common import acc_dtype, input_precision, log2_prob
from ._gemm import score_block
from ._sigmoid_gemm import TARGET_PROGRAMS, kernel_tiles


def uses_gemm_path(device: torch.device, dtype: torch.dtype, d: int) -> bool:
    """Whether CLIP's backward takes this path: 16-bit or tf32 inputs whose d spans more than one
    output chunk of the paired backward (``backward_config``: 16-bit d > 256 on sm_90; interpreter
    d > 64). Exact fp32 ("ieee" products) and fp64 keep the paired kernel."""
    if dtype == torch.float64 or _config.exact_fp32(dtype):
        return False
    cfg = _config.backward_config(device, dtype, 1, 1, -(-d // 16) * 16, paired=True)
    return triton.cdiv(-(-d // 16) * 16, cfg.BLOCK_DO) > 1


def plan(M: int, N: int, d: int, dtype: torch.dtype, device: torch.device, *,
         budget: float = None, min_band: int = None) -> GemmPlan:
    """``gblock_gemm.plan`` with the G kernel's tiles (those of ``_sigmoid_gemm``) and ``MEMORY_BUDGET``.

    B = 32,768, d = 512, bf16 (sm_90): C = 8 groups of 4,096 columns, R = 2,048 (G block 16 MiB,
    db_c 8 MiB, da product 4 MiB: 28 MiB, 0.44x the 64 MiB of embeddings)."""
    return gblock_gemm.plan(M, N, d, dtype, kernel_tiles(device, dtype), MEMORY_BUDGET if budget is None else budget,
                            min_band, MIN_SCRATCH_BYTES, interpret=_config.interpret_mode())


@triton.jit
def _gpair_kernel(
    a_ptr, b_ptr, scale_ptr, r_ptr, t_ptr, gr_ptr, gt_ptr, gmax_ptr, gblk_ptr, ldg, gs_ptr,
    row0, n_rows, col0, n_cols, D, col_progs,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """One program: BLOCK_M rows of the band [row0, n_rows) against the column blocks
    ``cp, cp + col_progs, ...`` of the group [col0, n_cols) (``cp`` = pid % col_progs).

    Writes G'_ij = (g_r_i P_ij + g_t_j Q_ij) / gmax into gblk[i - row0, j - col0] (leading
    dimension ``ldg``, input dtype), P_ij = exp(l_ij - r_i), Q_ij = exp(l_ij - t_j), and
    gs_ptr[pid] = sum G'_ij <a_i, b_j> over its tiles. Rows / columns beyond the bounds are
    neither stored nor summed.
    """
    pid = tl.program_id(0)
    rb = pid // col_progs
    cp = pid % col_progs
    ii = tl.arange(0, BLOCK_M)
    jj = tl.arange(0, BLOCK_N)
    rows = row0 + rb * BLOCK_M + ii
    row_ok = rows < n_rows
    s = tl.load(scale_ptr).to(ACC_DTYPE)
    gm = tl.load(gmax_ptr).to(ACC_DTYPE)
    r = tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
    g_r = tl.load(gr_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE) / gm
    gs = tl.zeros((BLOCK_M,), ACC_DTYPE)
    aoff = tl.minimum(rows, n_rows - 1).to(tl.int64) * D
    grow = (rows - row0) * ldg                  # int32: plan() keeps a G block under 2**31 elements
    for c0 in range(col0 + cp * BLOCK_N, n_cols, col_progs * BLOCK_N):
        cols = c0 + jj
        col_ok = cols < n_cols
        # S over all of d; out-of-range rows / columns read the last valid one (clamped, no load
        # masks; the epilogue's select discards them)
        boff = tl.minimum(cols, n_cols - 1).to(tl.int64) * D
        dots = score_block(a_ptr, b_ptr, aoff, boff, D, ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D)
        t = tl.load(t_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
        g_t = tl.load(gt_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE) / gm
        w = g_r[:, None] * tl.exp2(log2_prob(dots, s, r[:, None], INPUT_PRECISION)) + \
            g_t[None, :] * tl.exp2(log2_prob(dots, s, t[None, :], INPUT_PRECISION))
        ok = row_ok[:, None] & col_ok[None, :]
        w = tl.where(ok, w, 0.0)                # a clamped row / column's exp may be inf
        gs += tl.sum(w * dots, axis=1)
        tl.store(gblk_ptr + (grow[:, None] + (cols - col0)[None, :]), w.to(gblk_ptr.dtype.element_ty), mask=ok)
    tl.store(gs_ptr + pid, tl.sum(gs, 0))


def pair_gradients(a, b, scale, r, t, g_r, g_t, p: GemmPlan):
    """(da, db, dscale) of ``sum(g_r * r) + sum(g_t * t)`` for ``(r, t) = lse_pair(a, b, s)``
    (``pair_gemm.pair_gradients`` with ``_gpair_kernel`` as the G kernel).

    a (M, d), b (N, d) contiguous, one dtype; scale () accumulation dtype; r, g_r (M,) and t, g_t
    (N,) accumulation dtype. da/db in the input dtype, dscale () accumulation dtype.
    """
    D = a.shape[1]

    def write_block(gblk, gs, r0, r1, c0, c1, gm, col_progs):
        _gpair_kernel[(triton.cdiv(r1 - r0, p.BLOCK_M) * col_progs,)](
            a, b, scale, r, t, g_r, g_t, gm, gblk, gblk.stride(0), gs,
            r0, r1, c0, c1, D, col_progs,
            ACC_DTYPE=acc_dtype(a.dtype), INPUT_PRECISION=input_precision(a.dtype),
            BLOCK_M=p.BLOCK_M, BLOCK_N=p.BLOCK_N, BLOCK_D=p.BLOCK_D, EVEN_D=D % p.BLOCK_D == 0,
            num_warps=p.num_warps, num_stages=p.num_stages)

    return pair_gemm.pair_gradients(a, b, scale, r, t, g_r, g_t, p, write_block, TARGET_PROGRAMS)
