"""CLIP's pair backward by G blocks and GEMMs, the schedule shared by the backends (Triton:
``triton/_pair_gemm.py``; CUDA: ``ops/_cpp.py`` with csrc/cuda/pair_gblock_mma.cuh).

For ``(r, t) = lse_pair(a, b, s)`` (r_i the row LSE of l = s a b^T, t_j the column LSE) and the
upstream gradients g_r (M,), g_t (N,) of r and t:

    G_ij  = g_r_i exp(l_ij - r_i) + g_t_j exp(l_ij - t_j)
    da    = s G b,   db = s G^T a,   ds = sum_ij G_ij <a_i, b_j>

(no positive terms: the pair op has no exclusions; a loss's diagonal term is its own autograd).
A backend's G kernel stores G' = G / gmax in the input dtype (gmax = max(|g_r|, |g_t|), so that a
mean reduction's g ~ 1/B does not underflow fp16) and the factor f = s gmax is applied to the
fp32 products. For each column group c (fp32 accumulator db_c) and row band r
(:class:`~.gblock_gemm.GemmPlan`):

* the G kernel writes G'_rc (R x cols) and per-program partials of sum G' S;
* db_c += G'_rc^T a_r   (fp32 output; db_c is scaled by f and rounded once, after the last band);
* da_r  = round(da_r + f G'_rc b_c)   (fp32 product, rounded once per column group).

dscale = gmax * (the partials summed in float64, in a fixed order: deterministic).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .gblock_gemm import GemmPlan
from .gblock_gemm import mm_into as _mm_into
from .precision import accumulation_dtype

#: outputs (da, db) + the plan's scratch at most this many times the embeddings (a and b): the
#: scratch at most 0.45x them, leaving room under half of them for the partial sums, the upstream
#: gradients' temporaries and cuBLAS's workspace
MEMORY_BUDGET = 1.45
#: scratch a GPU call may always take, whatever the budget (small batches: bands of MIN_BAND_ROWS)
MIN_SCRATCH_BYTES = 16 << 20

#: write_block(gblk, gs, r0, r1, c0, c1, gmax, col_progs): the G kernel of one block, rows
#: [r0, r1) x columns [c0, c1) into gblk (band x cols, input dtype), its programs' partial sums of
#: G' S into gs (row blocks x col_progs,), gmax () the divisor
WriteBlock = Callable[..., None]


def pair_gradients(a, b, scale, r, t, g_r, g_t, p: GemmPlan, write_block: WriteBlock, target_programs: int):
    """(da, db, dscale) of ``sum(g_r * r) + sum(g_t * t)`` for ``(r, t) = lse_pair(a, b, s)``.

    a (M, d), b (N, d) contiguous, one dtype; scale () accumulation dtype; r, g_r (M,) and t, g_t
    (N,) accumulation dtype. da/db in the input dtype, dscale () accumulation dtype. Each G block
    launch has ceil(band / BLOCK_M) row blocks x ``col_progs`` programs, col_progs the column split
    that brings it near ``target_programs``.
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
    row_blocks = -(-p.band // p.BLOCK_M)
    col_progs = max(1, min(-(-p.cols // p.BLOCK_N), -(-target_programs // row_blocks)))
    bands = -(-M // p.band)
    gblk = torch.empty(p.band, p.cols, device=dev, dtype=a.dtype)        # scratch: one G block
    db_c = torch.empty(p.cols, D, device=dev, dtype=acc)                 # scratch: db of one column group
    prod = torch.empty(p.band, D, device=dev, dtype=acc)                 # scratch: one band's da product
    # per-program partials of sum G' S (zeros where a short last band launches fewer)
    gs = torch.zeros(p.groups, bands, row_blocks * col_progs, device=dev, dtype=acc)
    for c in range(p.groups):                                # plan(): no group is empty
        c0, c1 = c * p.cols, min(N, (c + 1) * p.cols)
        for i in range(bands):
            r0, r1 = i * p.band, min(M, (i + 1) * p.band)
            write_block(gblk, gs[c, i], r0, r1, c0, c1, gm, col_progs)
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
