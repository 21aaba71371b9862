"""CLIP's backward for large d: G blocks from a Triton kernel, the products by GEMMs.

Why (docs/design.md section 7): the paired backward (``_dq_paired_kernel``) keeps a (BLOCK_M,
BLOCK_DO) fp32 accumulator in registers; beyond one output chunk (16-bit: d > 256) every chunk is
its own program that recomputes S over all of d and both exps, and CLIP runs it once per side:
at d = 512 every score tile is computed four times. Here S is computed once per tile.

For ``(r, t) = lse_pair(a, b, s)`` (r_i the row LSE of l = s a b^T, t_j the column LSE) and the
upstream gradients g_r (M,), g_t (N,) of r and t:

    G_ij  = g_r_i exp(l_ij - r_i) + g_t_j exp(l_ij - t_j)
    da    = s G b,   db = s G^T a,   ds = sum_ij G_ij <a_i, b_j>

(no positive terms: the pair op has no exclusions; a loss's diagonal term is its own autograd).
The G kernel stores G' = G / gmax in the input dtype (gmax = max(|g_r|, |g_t|), so that a mean
reduction's g ~ 1/B does not underflow fp16) and the factor f = s gmax is applied to the fp32
products. Schedule (``_gemm.py``): for each column group c (fp32 accumulator db_c) and row band r:

* ``_gpair_kernel`` writes G'_rc (R x cols) and per-program partials of sum G' S;
* db_c += G'_rc^T a_r   (fp32 output; db_c is scaled by f and rounded once, after the last band);
* da_r  = round(da_r + f G'_rc b_c)   (fp32 product, rounded once per column group).

dscale = gmax * (the partials summed in float64, in a fixed order: deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.precision import accumulation_dtype
from . import _config, _gemm
from ._common import acc_dtype, input_precision, log2_prob
from ._gemm import GemmPlan, mm_into as _mm_into, score_block
from ._sigmoid_gemm import TARGET_PROGRAMS, kernel_tiles

#: outputs (da, db) + the plan's scratch at most this many times the embeddings (a and b): the
#: scratch at most 0.45x them, leaving room under half of them for the partial sums, the upstream
#: gradients' temporaries and cuBLAS's workspace
MEMORY_BUDGET = 1.45
#: scratch a GPU call may always take, whatever the budget (small batches: bands of MIN_BAND_ROWS)
MIN_SCRATCH_BYTES = 16 << 20


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
    """``_gemm.plan`` with the G kernel's tiles (those of ``_sigmoid_gemm``) and ``MEMORY_BUDGET``.

    B = 32,768, d = 512, bf16 (sm_90): C = 8 groups of 4,096 columns, R = 2,048 (G block 16 MiB,
    db_c 8 MiB, da product 4 MiB: 28 MiB, 0.44x the 64 MiB of embeddings)."""
    return _gemm.plan(M, N, d, dtype, kernel_tiles(device, dtype), MEMORY_BUDGET if budget is None else budget,
                      min_band, MIN_SCRATCH_BYTES)


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
    """(da, db, dscale) of ``sum(g_r * r) + sum(g_t * t)`` for ``(r, t) = lse_pair(a, b, s)``.

    a (M, d), b (N, d) contiguous, one dtype; scale () accumulation dtype; r, g_r (M,) and t, g_t
    (N,) accumulation dtype. da/db in the input dtype, dscale () accumulation dtype.
    """
    M, D = a.shape
    N = b.shape[0]
    acc = accumulation_dtype(a.dtype)
    dev = a.device
    da, db = torch.empty_like(a), torch.empty_like(b)
    if M == 0 or N == 0:                                   # no pairs: every gradient is zero
        return da.zero_(), db.zero_(), scale.new_zeros(())
    gm = torch.maximum(g_r.abs().amax(), g_t.abs().amax()).to(acc)
    gm = torch.where((gm > 0) & torch.isfinite(gm), gm, torch.ones_like(gm))    # a safe divisor, no sync
    f = scale.to(acc) * gm
    row_blocks = triton.cdiv(p.band, p.BLOCK_M)
    col_progs = max(1, min(triton.cdiv(p.cols, p.BLOCK_N), triton.cdiv(TARGET_PROGRAMS, row_blocks)))
    bands = triton.cdiv(M, p.band)
    gblk = torch.empty(p.band, p.cols, device=dev, dtype=a.dtype)        # scratch: one G block
    db_c = torch.empty(p.cols, D, device=dev, dtype=acc)                 # scratch: db of one column group
    prod = torch.empty(p.band, D, device=dev, dtype=acc)                 # scratch: one band's da product
    # per-program partials of sum G' S (zeros where a short last band launches fewer)
    gs = torch.zeros(p.groups, bands, row_blocks * col_progs, device=dev, dtype=acc)
    for c in range(p.groups):                                # plan(): no group is empty
        c0, c1 = c * p.cols, min(N, (c + 1) * p.cols)
        for i in range(bands):
            r0, r1 = i * p.band, min(M, (i + 1) * p.band)
            _gpair_kernel[(triton.cdiv(r1 - r0, p.BLOCK_M) * col_progs,)](
                a, b, scale, r, t, g_r, g_t, gm, gblk, p.cols, gs[c, i],
                r0, r1, c0, c1, D, col_progs,
                ACC_DTYPE=acc_dtype(a.dtype), INPUT_PRECISION=input_precision(a.dtype),
                BLOCK_M=p.BLOCK_M, BLOCK_N=p.BLOCK_N, BLOCK_D=p.BLOCK_D, EVEN_D=D % p.BLOCK_D == 0,
                num_warps=p.num_warps, num_stages=p.num_stages)
            blk = gblk[: r1 - r0, : c1 - c0]
            _mm_into(db_c[: c1 - c0], blk.t(), a[r0:r1], accumulate=i > 0)
            pr = prod[: r1 - r0]
            _mm_into(pr, blk, b[c0:c1], accumulate=False)
            if c > 0:                       # da's running sum in fp32, rounded once per group
                torch.addcmul(da[r0:r1], pr, f, out=pr)
            else:
                pr.mul_(f)
            da[r0:r1] = pr
        db[c0:c1] = db_c[: c1 - c0].mul_(f)
    # partial sums in a fixed order, in fp64: deterministic
    dscale = (gs.double().sum() * gm.double()).to(scale.dtype)
    return da, db, dscale
