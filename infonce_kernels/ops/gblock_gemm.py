"""The G-block + GEMM schedule shared by the large-d gradients of every backend (SigLIP:
``triton/_sigmoid_gemm.py``; CLIP: :mod:`.pair_gemm` with the G kernels of ``triton/_pair_gemm.py``
and csrc/cuda/pair_gblock_mma.cuh; docs/design.md section 7).

A G kernel writes the logit gradient G of one block of rows (a band of R rows) x columns (a
group of ``cols`` columns) into a scratch buffer, computing S = x y^T once per tile over all of
d; two GEMMs with fp32 results do the products:

    dy_c += G_rc^T x_r          (fp32 accumulator of the column group, rounded once at its end)
    dx_r  = round(dx_r + G_rc y_c)   (the product in fp32, rounded once per column group)

:func:`plan` picks R and C from a memory budget; :func:`mm_into` runs one GEMM.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .precision import accumulation_dtype

#: smallest row band on a GPU: each band's dy_c += G'^T x_r reads and writes the fp32 dy_c
#: (8 cols d bytes) for 2 cols d R FLOPs, compute-bound on an H100/H200 (790 TFLOP/s, 3.35 TB/s)
#: from R ~ 1,400 at d = 768; smaller bands also leave the dx GEMM's R x d output too few tiles
MIN_BAND_ROWS = 2048
#: scratch a GPU call may always take, whatever the budget (small problems: one band, one group)
MIN_SCRATCH_BYTES = 32 << 20
#: column groups start on multiples of this many columns on a GPU (16-byte aligned G rows and y
#: slices for cuBLAS; whole 64-column tiles of the CUDA G kernel)
COL_ALIGN = 64


@dataclass(frozen=True)
class GemmPlan:
    """Blocking of the G-block path: ``band`` rows x ``cols`` columns per G block (``groups``
    column groups), and the G kernel's tiles."""
    band: int
    groups: int
    cols: int
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int

    def scratch_bytes(self, d: int, dtype: torch.dtype) -> int:
        """G block + dy_c + the dx product (the wrapper's scratch, partial sums aside)."""
        acc = torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
        el = torch.empty((), dtype=dtype).element_size()
        return self.band * self.cols * el + self.cols * d * acc + self.band * d * acc


def plan(M: int, N: int, d: int, dtype: torch.dtype, tiles: tuple, budget: float, min_band: int = None,
         min_scratch: int = MIN_SCRATCH_BYTES, *, interpret: bool = False) -> GemmPlan:
    """The fewest column groups C (then the largest band R, a multiple of BLOCK_M up to M) whose
    outputs + scratch fit ``budget`` x the embeddings (on a GPU the scratch may always take
    ``min_scratch`` bytes); at least ``min_band`` rows per band (or M). ``tiles``: the G kernel's
    (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages). ``interpret`` (Triton's interpreter on
    CPU): bands down to BLOCK_M rows, no column alignment, no minimum scratch."""
    bm, bn, bd, warps, stages = tiles
    if min_band is None:
        min_band = bm if interpret else MIN_BAND_ROWS
    el = torch.empty((), dtype=dtype).element_size()
    emb = (M + N) * d * el
    room = budget * emb - emb                            # beyond the outputs dx, dy
    if not interpret:
        room = max(room, min_scratch)
    rows_cap = max(bm, -(-M // bm) * bm)
    align = 1 if interpret else COL_ALIGN
    for groups in range(1, max(1, N) + 1):
        cols = -(-max(N, 1) // groups)
        cols = -(-cols // align) * align
        if groups > 1 and (groups - 1) * cols >= N:         # the alignment left a group empty
            continue
        band = rows_cap
        while band > bm:
            if GemmPlan(band, groups, cols, bm, bn, bd, warps, stages).scratch_bytes(d, dtype) <= room:
                break
            band = max(bm, (band // 2) // bm * bm)
        p = GemmPlan(band, groups, cols, bm, bn, bd, warps, stages)
        # the kernels address a G block with int32 offsets
        if band >= min(min_band, rows_cap) and p.scratch_bytes(d, dtype) <= room and band * cols < 2**31:
            return p
    return GemmPlan(bm, max(1, N), 1, bm, bn, bd, warps, stages)   # unreachable for d >= 1: cols = 1 fits


@functools.lru_cache(maxsize=None)
def _fp32_result_gemm(device_type: str) -> bool:
    """Whether torch has 16-bit GEMMs with an fp32 result (``mm`` / ``addmm`` with ``out_dtype``)
    for this device type: meta always, CUDA where the installed torch registers them."""
    if device_type == "meta":
        return True
    if device_type != "cuda":
        return False
    has = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    return bool(has) and all(has(op, "CUDA") for op in ("aten::mm.dtype_out", "aten::addmm.dtype_out"))


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (accumulation dtype) = [out +] a @ b for operands of the input dtype: one GEMM with an
    fp32 result (cuBLAS ``out_dtype``) where torch has it, else on operands widened to out's dtype
    (a temporary copy of the G block: more memory, the same numbers)."""
    if a.dtype != out.dtype and not _fp32_result_gemm(out.device.type):
        a, b = a.to(out.dtype), b.to(out.dtype)
    kw = {} if a.dtype == out.dtype else {"out_dtype": out.dtype}
    if accumulate:
        torch.addmm(out, a, b, out=out, **kw)
    else:
        torch.mm(a, b, out=out, **kw)
