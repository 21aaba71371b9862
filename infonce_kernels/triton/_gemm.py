"""The G kernels' S tile over all of d (:func:`score_block`), shared by the Triton large-d gradients
(SigLIP: ``_sigmoid_gemm.py``, CLIP: ``_pair_gemm.py``; docs/design.md section 7). The schedule
around them (plan, GEMM driver) is backend-neutral: ``infonce_kernels/ops/gblock_gemm.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def score_block(x_ptr, y_ptr, xoff, yoff, D, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """S = X Y^T (BLOCK_M, BLOCK_N) over all of d, X the rows of x at element offsets ``xoff``
    (BLOCK_M,) int64, Y those of y at ``yoff`` (BLOCK_N,) (contiguous, D features). The callers
    clamp out-of-range rows / columns to a valid one (no row masks: their products are discarded
    by the epilogue's masks), so with D % BLOCK_D == 0 (EVEN_D) the d loop loads without any mask."""
    dots = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            xa = tl.load(x_ptr + (xoff[:, None] + kk[None, :]))
            yb = tl.load(y_ptr + (yoff[None, :] + kk[:, None]))
        else:
            xa = tl.load(x_ptr + (xoff[:, None] + kk[None, :]), mask=kk[None, :] < D, other=0.0)
            yb = tl.load(y_ptr + (yoff[None, :] + kk[:, None]), mask=kk[:, None] < D, other=0.0)
        dots = tl.dot(xa, yb, dots, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return dots
