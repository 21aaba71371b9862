"""Pairwise sigmoid (SigLIP) kernels: the loss rows and the gradients, tile by tile.

Maths (x (M, d) image rows, y (N, d) text rows, t = scale, b = bias, z_ij = +1 on positives):

    l_ij   = t <x_i, y_j> + b                              (one FMA on the fp32 dot)
    rows_i = sum_j softplus(-z_ij l_ij)                      the loss per row
    G_ij   = g_i (sigmoid(l_ij) - [z_ij = 1])                g: upstream gradient (1 in the fused forward)
    dx_i = t sum_j G_ij y_j,  dy_j = t sum_i G_ij x_i,  dt = sum_ij G_ij <x_i, y_j>,  db = sum_ij G_ij

Positive rule: with labels, row_labels[i] == col_labels[j]; else j - i == offset.

Elementwise, with a = |l| and e = exp(-a) = exp2(-a log2 e) (one MUFU.EX2), r = 1 / (1 + e) (one rcp):

    sigmoid(l)  = (l >= 0 ? 1 : e) r,      sigmoid(l) - 1 = -sigmoid(-l) = -(l >= 0 ? e : 1) r

so G needs no subtraction near 1 (exact to rounding for |l| ~ 100), and

    softplus(u) = max(u, 0) + log1p(e)    (u = -z l, |u| = a),
    log1p(e)    = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...),   s = e / (2 + e) in (0, 1/3]

(the series to s^12 is below fp32 rounding, to s^30 below fp64 rounding: one division, no log).
(A log2-based log1p costs more here: Triton lowers tl.log2 to libdevice's accurate log2f, not
MUFU.LG2.)

Schedule: two sweeps of the same kernel, ``_sweep_kernel`` (no M x N tensor, no atomics, no fp32
gradient buffer, deterministic):

* row sweep (program = BLOCK_M rows of x, loop over all y in BLOCK_N blocks): the loss rows, dx
  (fp32 accumulator in registers, BLOCK_DO output features per program), the per-program partial
  sums of db (row sums of G) and dt (= sum_i <x_i, dx_i> / t: no per-element work);
* column sweep (program = BLOCK_M rows of y, loop over x): dy, the same code with the roles of x
  and y swapped (z and l are symmetric; the offset changes sign; g is indexed by the loop side).

``with_grad=True`` runs both sweeps and gets the loss from the row sweep, so the loss costs no
pass of its own. Why not dy from the row sweep through fp32 atomics: see docs/design.md (pairwise
sigmoid): d / BLOCK_M atomics per pair element and an (N, d) fp32 buffer against one recomputed
S per tile. The sweeps make the gradients when d fits one chunk (one program per tile); for
larger d the gradients come from G blocks and GEMMs (``_sigmoid_gemm.py``, :func:`uses_gemm_path`).

Index arithmetic inside tiles is int32 and tile-relative: a pair is positive (no labels) when
jj - ii == offset + a0 - b0 for the tile's first row a0 and first column b0, a scalar per tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.precision import accumulation_dtype
from . import _config
from ._common import LOG2E, acc_dtype, input_precision, load_tile, scores

#: tiles under the interpreter: small, so that tests cover several tiles and ragged edges cheaply
INTERPRET_BLOCK = 16
INTERPRET_BLOCK_D = 32


#: compiled for a GPU (not the interpreter, which cannot run inline PTX): fixed when the kernels
#: are decorated, as Triton's own interpret switch is
ON_GPU = tl.constexpr(not _config.interpret_mode())


@triton.jit
def div(a, b):
    """a / b for b in [1, 3] (the callers' 1 + e and 2 + e): in fp32 on a GPU a * rcp.approx(b), one
    MUFU.RCP and a multiply (<= 2 ulp; tl.fdiv's div.full adds a range check and a rescale, 4 more
    instructions, for divisors near 2^126 that never occur here); the interpreter's fp32 and fp64:
    the plain division."""
    if a.dtype == tl.float64:
        q = a / b
    elif ON_GPU:
        q = a * tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [b], dtype=tl.float32,
                                          is_pure=True, pack=1)
    else:
        q = tl.fdiv(a, b)
    return q


@triton.jit
def log1p_small(e, TERMS: tl.constexpr):
    """log(1 + e) for e in [0, 1], accurate to rounding: 2 atanh(s), s = e / (2 + e) <= 1/3,
    Horner in s^2 over the first TERMS odd terms 1, 1/3, 1/5, ..."""
    s = div(e, 2.0 + e)
    q = s * s
    p = tl.full(e.shape, 1.0 / (2 * TERMS - 1), e.dtype)
    for kk in tl.static_range(TERMS - 1):
        p = p * q + 1.0 / (2 * (TERMS - 2 - kk) + 1)
    return 2.0 * s * p


@triton.jit
def pair_terms(l, pos, WITH_LOSS: tl.constexpr, WITH_GRAD: tl.constexpr, TERMS: tl.constexpr):
    """Elementwise terms of logits ``l`` with positive mask ``pos`` -> (softplus(-z l) if WITH_LOSS,
    sigmoid(l) - [pos] if WITH_GRAD; 0.0 otherwise), in l's dtype (module docstring: one ex2, the
    series' division for the loss, one rcp for G)."""
    # w = -z (+1 on negatives, -1 on positives), u = w l: softplus(-z l) = softplus(u) and
    # sigmoid(l) - [pos] = w sigmoid(u); sigmoid(u) = (u >= 0 ? 1 : e) r. A float w (not a
    # boolean held across the tile) keeps the predicates short-lived.
    w = tl.where(pos, -1.0, 1.0)
    u = w * l
    e = tl.exp2(-tl.abs(l) * LOG2E)                                          # exp(-|l|) = exp(-|u|)
    sp = 0.0
    core = 0.0
    if WITH_LOSS:
        sp = tl.maximum(u, 0.0) + log1p_small(e, TERMS)
    if WITH_GRAD:
        r = div(tl.full(e.shape, 1.0, e.dtype), 1.0 + e)
        core = w * tl.where(u >= 0, 1.0, e) * r                              # sigmoid(l) - [pos]
    return sp, core


@triton.jit
def _sweep_kernel(
    own_ptr, other_ptr, scale_ptr, bias_ptr, own_lab_ptr, other_lab_ptr, g_ptr,
    loss_ptr, dout_ptr, dt_ptr, db_ptr,
    n_own, n_other, D, off,
    ROW_SWEEP: tl.constexpr, WITH_LOSS: tl.constexpr, WITH_GRAD: tl.constexpr, HAS_G: tl.constexpr,
    HAS_LABELS: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, TERMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    SINGLE_D: tl.constexpr,
):
    """One program: BLOCK_M rows of the own side against every row of the other side.

    Row sweep (ROW_SWEEP): own = x, other = y, ``off`` = offset; writes loss rows (WITH_LOSS),
    dx, and the partials dt_ptr[pid], db_ptr[pid]. Column sweep: own = y, other = x,
    ``off`` = -offset; writes dy. g (HAS_G) is indexed by x's rows: own side in the row sweep,
    other side in the column sweep. dout (n_own, D) gets t sum_j G_aj other_j. Gradients need
    all of d in one chunk (SINGLE_D, BLOCK_DO = BLOCK_D >= D); larger d takes ``_sigmoid_gemm``.
    """
    tl.static_assert(SINGLE_D or not WITH_GRAD, "gradient sweeps hold all of d in one chunk")
    pid = tl.program_id(0)
    a0 = pid * BLOCK_M
    ii = tl.arange(0, BLOCK_M)
    jj = tl.arange(0, BLOCK_N)
    own = a0 + ii
    own_ok = own < n_own
    t = tl.load(scale_ptr).to(ACC_DTYPE)
    b = tl.load(bias_ptr).to(ACC_DTYPE)
    if HAS_LABELS:
        own_lab = tl.load(own_lab_ptr + own, mask=own_ok, other=-1)
    if HAS_G and ROW_SWEEP:
        g_own = tl.load(g_ptr + own, mask=own_ok, other=0.0).to(ACC_DTYPE)
    if SINGLE_D:
        own_tile = load_tile(own_ptr, own, n_own, 0, D, BLOCK_M, BLOCK_D)      # held for the whole sweep
    else:
        own_tile = 0
    diff = jj[None, :] - ii[:, None]                                          # int32, tile-relative

    loss = tl.zeros((BLOCK_M,), ACC_DTYPE)
    gsum = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC_DTYPE)
    for b0 in range(0, n_other, BLOCK_N):
        other = b0 + jj
        other_ok = other < n_other
        if SINGLE_D:
            other_tile = load_tile(other_ptr, other, n_other, 0, D, BLOCK_N, BLOCK_D)
            dots = tl.dot(own_tile, tl.trans(other_tile), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            dots = scores(own_ptr, other_ptr, own, other, n_own, n_other, D, 0, 0,
                          ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, False)
        l = dots * t + b                                                     # one FMA
        if HAS_LABELS:
            other_lab = tl.load(other_lab_ptr + other, mask=other_ok, other=-1)
            pos = own_lab[:, None] == other_lab[None, :]
        else:
            # other - own == off  <=>  jj - ii == off + a0 - b0 (int32: the wrapper clamps |off| to
            # at most n_own + n_other + 1, beyond which no pair is positive anyway)
            delta = off + a0 - b0
            pos = diff == delta
        sp, core = pair_terms(l, pos, WITH_LOSS, WITH_GRAD, TERMS)
        if WITH_LOSS:
            loss += tl.sum(tl.where(other_ok[None, :], sp, 0.0), axis=1)
        if WITH_GRAD:
            if HAS_G:
                if ROW_SWEEP:
                    core = core * g_own[:, None]
                else:
                    g_other = tl.load(g_ptr + other, mask=other_ok, other=0.0).to(ACC_DTYPE)
                    core = core * g_other[None, :]
            if ROW_SWEEP:
                gsum += tl.sum(tl.where(other_ok[None, :], core, 0.0), axis=1)
            # rows of other beyond n_other load as 0: their G multiplies zeros here
            acc = tl.dot(core.to(other_tile.dtype), other_tile, acc, input_precision=INPUT_PRECISION,
                         out_dtype=ACC_DTYPE)

    if WITH_LOSS:
        tl.store(loss_ptr + own, loss, mask=own_ok)
    if WITH_GRAD:
        cols = tl.arange(0, BLOCK_DO)
        dst = dout_ptr + own.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(dst, (acc * t).to(dout_ptr.dtype.element_ty), mask=own_ok[:, None] & (cols[None, :] < D))
        if ROW_SWEEP:
            # dt = sum_ij G_ij <x_i, y_j> = sum_i <x_i, acc_i>
            tl.store(dt_ptr + pid, tl.sum(tl.sum(own_tile.to(ACC_DTYPE) * acc, 1), 0))
            tl.store(db_ptr + pid, tl.sum(tl.where(own_ok, gsum, 0.0), 0))


def sweep_config(device: torch.device, dtype: torch.dtype, d: int) -> _config.TileConfig:
    """Tiles of both sweeps for inputs of ``dtype`` with ``d`` features on ``device``: BLOCK_M own
    rows per program, BLOCK_N other rows per step, BLOCK_D the chunk of d for S (SINGLE_D: all of d,
    operand tiles loaded once), BLOCK_DO = BLOCK_D output features per program.

    GPU: 128 own rows per program over 8 warps (two 64-row warpgroups, so no warpgroup repeats
    another's S: issue 16), 32 other rows per step; d up to 128 (fp32: 64) in one chunk, larger d
    in 128-wide (fp32: 64) chunks of S (the loss-only sweep; gradients at such d:
    :func:`uses_gemm_path`). Registers and spills per configuration: the kernel report
    (python -m benchmarks.kernel_report.siglip).
    """
    if _config.interpret_mode():
        bd = max(16, min(_config.next_pow2(d), INTERPRET_BLOCK_D))
        return _config.TileConfig(INTERPRET_BLOCK, INTERPRET_BLOCK, bd, bd, _config.next_pow2(d) <= bd, 4, 1)
    wide = dtype in (torch.float16, torch.bfloat16)
    max_bd = 128 if wide else 64 if dtype == torch.float32 else 32
    bd = max(16, min(_config.next_pow2(d), max_bd))
    single = _config.next_pow2(d) <= bd
    cap = _config._capability(device)
    if dtype == torch.float64:
        return _config.TileConfig(32, 32, bd, bd, single, 4, 1)
    # 32 other rows per step: with 64, ptxas (triton 3.9, sm_90, bf16) spilled 12-128 B in the fused
    # row sweep (loss and G of one tile live together) at d = 128 and d = 768
    return _config.TileConfig(128, 32, bd, bd, single, 8, 3 if (wide and single and cap >= (9, 0)) else 2)


def _check(x: torch.Tensor):
    if x.dtype == torch.bfloat16 and _config.interpret_mode():
        raise TypeError("the triton backend cannot run bfloat16 inputs under the Triton interpreter "
                        "(TRITON_INTERPRET=1): its numpy emulation of bfloat16 gives wrong results; use float16, "
                        "float32 or float64 there, or the cpu backend")


def _sweep(own, other, scale, bias, own_lab, other_lab, g, off, *, row_sweep, with_loss, with_grad):
    """Launch one sweep; -> (loss or None, dout or None, dt partials or None, db partials or None)."""
    n_own, D = own.shape
    n_other = other.shape[0]
    acc = accumulation_dtype(own.dtype)
    cfg = sweep_config(own.device, own.dtype, D)
    blocks = triton.cdiv(n_own, cfg.BLOCK_M)
    loss = torch.empty(n_own, device=own.device, dtype=acc) if with_loss else None
    dout = torch.empty_like(own) if with_grad else None
    part = with_grad and row_sweep
    dt = torch.empty(blocks, device=own.device, dtype=acc) if part else None
    db = torch.empty(blocks, device=own.device, dtype=acc) if part else None
    if blocks == 0:                                     # no own rows: nothing to launch
        return loss, dout, dt, db
    dummy = own
    off = max(-n_own - 1, min(int(off), n_other + 1))    # no positive pair outside (-n_own, n_other) anyway
    _sweep_kernel[(blocks,)](
        own, other, scale, bias,
        own_lab if own_lab is not None else dummy, other_lab if other_lab is not None else dummy,
        g if g is not None else dummy,
        loss if loss is not None else dummy, dout if dout is not None else dummy,
        dt if dt is not None else dummy, db if db is not None else dummy,
        n_own, n_other, D, off,
        ROW_SWEEP=row_sweep, WITH_LOSS=with_loss, WITH_GRAD=with_grad, HAS_G=g is not None,
        HAS_LABELS=own_lab is not None, ACC_DTYPE=acc_dtype(own.dtype), INPUT_PRECISION=input_precision(own.dtype),
        TERMS=16 if own.dtype == torch.float64 else 7, **cfg.meta())
    return loss, dout, dt, db


def uses_gemm_path(device: torch.device, dtype: torch.dtype, d: int) -> bool:
    """Whether the gradients take the G-block + GEMM path (``_sigmoid_gemm``): when the sweeps would
    need more than one program per tile, i.e. d does not fit one chunk of :func:`sweep_config`
    (16-bit: d > 128, fp32: d > 64, fp64: d > 32; interpreter: d > 32). There each extra program
    recomputes S over all of d; the GEMM path computes S once (docs/design.md section 7: the
    rule from the kernel report's model)."""
    return not sweep_config(device, dtype, d).SINGLE_D


def _gradients(x, y, scale, bias, labels, offset, grad, with_loss):
    if uses_gemm_path(x.device, x.dtype, x.shape[1]):
        from . import _sigmoid_gemm  # noqa: PLC0415  (imports this module's pair_terms)
        p = _sigmoid_gemm.plan(x.shape[0], y.shape[0], x.shape[1], x.dtype, x.device)
        return _sigmoid_gemm.gemm_gradients(x, y, scale, bias, labels, offset, grad, with_loss, p)
    rl, cl = labels if labels else (None, None)
    loss, dx, dt, db = _sweep(x, y, scale, bias, rl, cl, grad, offset,
                              row_sweep=True, with_loss=with_loss, with_grad=True)
    _, dy, _, _ = _sweep(y, x, scale, bias, cl, rl, grad, -int(offset),
                         row_sweep=False, with_loss=False, with_grad=True)
    # partial sums in a fixed order, in fp64: deterministic
    dscale = dt.double().sum().to(scale.dtype)
    dbias = db.double().sum().to(bias.dtype)
    return loss, dx, dy, dscale, dbias


def sigmoid_forward(x, y, scale, bias, labels, offset, with_grad):
    """Loss rows of the pairwise sigmoid loss, and with ``with_grad`` the gradients for a unit
    upstream gradient on every row, from the same row sweep.

    x (M, d), y (N, d) contiguous, one dtype; scale, bias () accumulation dtype; labels () or
    (row_labels (M,), col_labels (N,)) int64; offset int. Returns (rows,) or
    (rows, dx, dy, dscale, dbias): rows (M,) accumulation dtype, dx/dy in the input dtype,
    dscale/dbias () accumulation dtype.
    """
    _check(x)
    if not with_grad:
        rl, cl = labels if labels else (None, None)
        rows, _, _, _ = _sweep(x, y, scale, bias, rl, cl, None, offset,
                               row_sweep=True, with_loss=True, with_grad=False)
        return (rows,)
    return _gradients(x, y, scale, bias, labels, offset, None, True)


def sigmoid_backward(grad, x, y, scale, bias, labels, offset):
    """(dx, dy, dscale, dbias) for the upstream gradient ``grad`` (M,) of the loss rows
    (recomputes l tile by tile; same shapes and dtypes as :func:`sigmoid_forward`)."""
    _check(x)
    _, dx, dy, dscale, dbias = _gradients(x, y, scale, bias, labels, offset, grad.to(scale.dtype), False)
    return dx, dy, dscale, dbias
