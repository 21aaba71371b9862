"""Triton backend of ``infonce_kernels::lse``.

Public functions: the backend contract of ``infonce_kernels.ops.backends`` (called by the op
layer with contiguous arguments it has checked, on one device), and the registry's probe:

    forward(q, k, scale, spec) -> lse
    forward_pair(a, b, scale) -> (lse(a, b), lse(b, a))       (optional: CLIP's forward, one pass)
    uses_backward_pair(device, dtype, d) -> bool              (optional: CLIP's backward by
    backward_pair(a, b, scale, r, t, g_r, g_t) -> (da, db, dscale)     G blocks and GEMMs, large d)
    backward(grad, q, k, scale, spec, lse) -> (dq, dk, dscale)
    backward_paired(grad, q, k, scale, spec, lse, key_grad, key_lse, key_spec, row_offset)
        -> (dq, dscale)
    available(device) -> (bool, reason)

and of the pairwise sigmoid op (``infonce_kernels::_sigmoid_fwd`` / ``_sigmoid_bwd``, kernels in
``_sigmoid.py``):

    sigmoid_forward(x, y, scale, bias, labels, offset, with_grad)
        -> (rows,) or (rows, dx, dy, dscale, dbias)
    sigmoid_backward(grad, x, y, scale, bias, labels, offset) -> (dx, dy, dscale, dbias)

Shapes: q (M, d), k (N, d) (``k is q`` when ``spec.symmetric``), scale () fp32/fp64,
``spec`` an ``infonce_kernels.ops.Exclusion`` (exclude (M, E) int64, E in {0, 1, 2}, -1 = none,
the optional label rule and the optional threshold rule), lse/grad (M,).

Importing this package never imports Triton; the kernel modules are loaded on
first use. Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated*
(``triton.jit`` returns an ``InterpretedFunction`` when
``triton.knobs.runtime.interpret`` is true, and that knob reads the
environment variable each time), so the variable must be set before the
first call into this backend -- setting it in the environment of the
process (as CI does) is the supported way. With it, kernels run on CPU
tensors through Triton's numpy interpreter (slow; fp32/fp64 only are exact
enough -- the interpreter emulates bf16 arithmetic inexactly).

Inputs reach the kernels 16-byte aligned with d a multiple of 16 (``_aligned``: the one place
that copies and zero-pads when they are not; the gradients are cut back to d).

Layout:
    _config.py    tile sizes per GPU generation, autotune switch (no triton import)
    _common.py    tile loads, exclusion loads, ``kept`` (is pair (i, j) kept), the score tile
    _forward.py   forward kernel: row-block online LSE; the one-pass pair forward (row and
                  column LSEs of one sweep, partials merged on the host)
    _backward.py  dq / dk kernels (general), the paired dq kernel (paired and
                  symmetric backward), dscale
    _gemm.py      the G kernels' S tile over all of d (their schedule, plan and GEMM driver:
                  ops/gblock_gemm.py and ops/pair_gemm.py, shared with the cuda backend)
    _pair_gemm.py CLIP's backward for large d: G blocks (S once per tile) and GEMMs
    _sigmoid.py   the pairwise sigmoid (SigLIP) kernels: row sweep (loss, dx, dscale, dbias)
                  and column sweep (dy)
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["forward", "forward_pair", "backward", "backward_paired", "uses_backward_pair", "backward_pair", "available", "sigmoid_forward", "sigmoid_backward"]

_kernels_mode = None  # interpret mode the kernel modules were decorated in (None: not loaded yet)


def _interpret() -> bool:
    from ._config import interpret_mode  # noqa: PLC0415
    return interpret_mode()


def available(device) -> Tuple[bool, str]:
    """Whether this backend can run on ``device``, and why not.

    * CUDA device: Triton installed, torch built with CUDA and the device of
      compute capability >= 7.5 (bf16 needs >= 8.0, checked by the kernels'
      compiler, not here).
    * CPU device: only under the Triton interpreter (TRITON_INTERPRET=1 set
      before the process started / before the first kernel call).
    """
    dev = torch.device(device)
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return False, "triton is not installed"
    except Exception as e:  # broken install
        return False, f"triton failed to import: {type(e).__name__}: {e}"
    interp = _interpret()
    if _kernels_mode is not None and _kernels_mode != interp:
        return False, (f"TRITON_INTERPRET changed after the Triton kernels were built "
                       f"(built {'with' if _kernels_mode else 'without'} the interpreter); "
                       f"set it before the process starts")
    if dev.type == "cpu":
        if interp:
            return True, "triton interpreter (TRITON_INTERPRET=1)"
        return False, ("triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                       "in the environment before starting Python")
    if dev.type == "cuda":
        if interp:
            return True, "triton interpreter (TRITON_INTERPRET=1) on CUDA tensors"
        if not torch.cuda.is_available():
            return False, "torch has no usable CUDA device"
        if torch.version.hip is None:
            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            cap = torch.cuda.get_device_capability(idx)
            if cap < (7, 5):
                return False, f"compute capability {cap[0]}.{cap[1]} < 7.5 is not supported by triton"
        return True, "triton on " + torch.cuda.get_device_name(dev)
    return False, f"triton backend does not support device type {dev.type!r}"


def _load(q: torch.Tensor):
    """Import (and thereby decorate) the kernel modules; remember the interpret mode. Refuses
    bfloat16 under the interpreter, whose numpy emulation of bfloat16 gives wrong results."""
    global _kernels_mode
    if q.dtype == torch.bfloat16 and _interpret():
        raise TypeError("the triton backend cannot run bfloat16 inputs under the Triton interpreter "
                        "(TRITON_INTERPRET=1): its numpy emulation of bfloat16 gives wrong results; use float16, "
                        "float32 or float64 there, or the cpu backend")
    from . import _backward, _forward  # noqa: PLC0415
    if _kernels_mode is None:
        _kernels_mode = _interpret()
    return _forward, _backward


def _device_guard(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib  # noqa: PLC0415
    return contextlib.nullcontext()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """The (R, d) contiguous input as the kernels want it: ``t`` itself when its rows start on
    16-byte boundaries (data pointer % 16 == 0 and d % 16 == 0), else a copy zero-padded to
    d' = 16 ceil(d / 16) features in a fresh (aligned) buffer. Exact: the zero features add
    nothing to any dot product, and the kernels' tiles are as wide either way (powers of two
    >= 16). The Triton JIT specialises 16-byte-aligned pointers and sizes % 16 == 0 (pipelined
    cp.async tile loads, 16-byte vectors); any other input would run an unpipelined variant."""
    d = t.shape[1]
    padded = -(-d // 16) * 16
    if padded == d and t.data_ptr() % 16 == 0:
        return t
    out = t.new_zeros(t.shape[0], padded)
    out[:, :d] = t
    return out


def _pair(q: torch.Tensor, k: torch.Tensor):
    """(_aligned(q), _aligned(k)), one buffer when ``k is q`` (symmetric)."""
    qa = _aligned(q)
    return qa, (qa if k is q else _aligned(k))


def _unpad(g: torch.Tensor, d: int) -> torch.Tensor:
    """A gradient of an :func:`_aligned` input back to its d features (contiguous)."""
    return g if g.shape[-1] == d else g[:, :d].contiguous()


def forward(q, k, scale, spec, *, count=False) -> torch.Tensor:
    """Row LSE r (M,) of ``scale * q @ k.T`` without the pairs ``spec`` excludes.

    q (M, d), k (N, d) same dtype (``k is q`` when symmetric; the forward is the same in both
    cases), scale () fp32 (fp64 for fp64). Returns fp32 (fp64 for fp64 inputs); with ``count``
    (r, dropped (M,) int32: the keys the threshold rule dropped among those the other rules keep).
    """
    fwd, _ = _load(q)
    with _device_guard(q):
        return fwd.lse_forward(*_pair(q, k), scale, spec, count)


def forward_pair(a, b, scale):
    """``(lse(a, b, s), lse(b, a, s))`` without exclusions (CLIP's two directions) from one pass
    over the score tiles: a (M, d), b (N, d) one dtype, scale () fp32 (fp64 for fp64). Returns
    r (M,), t (N,) in the accumulation dtype."""
    fwd, _ = _load(a)
    with _device_guard(a):
        return fwd.lse_pair(*_pair(a, b), scale)


def backward(grad, q, k, scale, spec, lse):
    """(dq, dk, dscale) for upstream gradient ``grad`` (M,) of the row LSE.

    dq (M, d) in q.dtype; dk (N, d) in k.dtype, or ``q.new_empty(0)`` when ``spec.symmetric``
    (dq then holds the whole gradient on z = q = k); dscale () in scale.dtype.
    """
    _, bwd = _load(q)
    d = q.shape[1]
    with _device_guard(q):
        dq, dk, dscale = bwd.lse_backward(grad.to(lse.dtype), *_pair(q, k), scale, spec, lse)
    return _unpad(dq, d), (dk if dk.dim() < 2 else _unpad(dk, d)), dscale


def backward_paired(grad, q, k, scale, spec, lse, key_grad, key_lse, key_spec, row_offset):
    """(dq, dscale) when the keys are rows of a log-sum-exp too (the paired backward):

        dq_i = s sum_j (W_ij + V_ji) k_j,   dscale = sum_ij W_ij <q_i, k_j>  (row side only)

    W_ij = g_i exp(s <q_i,k_j> - r_i) on the pairs ``spec`` keeps; V_ji = h_j exp(s <q_i,k_j> -
    rho_j) with h = ``key_grad``, rho = ``key_lse`` (N,), zero where key j, as a row, excludes
    row i under ``key_spec`` (which numbers the rows of q from ``row_offset``). The symmetric
    backward is the case k = q, key side = row side, row_offset 0. dq in q.dtype, dscale () in
    scale.dtype.
    """
    _, bwd = _load(q)
    d = q.shape[1]
    with _device_guard(q):
        dq, dscale = bwd.lse_backward_paired(grad.to(lse.dtype), *_pair(q, k), scale, spec, lse,
                                             key_grad.to(lse.dtype), key_lse.to(lse.dtype), key_spec, int(row_offset))
    return _unpad(dq, d), dscale


def uses_backward_pair(device, dtype, d) -> bool:
    """Whether :func:`backward_pair` is this backend's CLIP backward for (a, b) of ``dtype`` with
    d features on ``device``: 16-bit / tf32 inputs whose d spans several output chunks of the
    paired kernel (``_pair_gemm.uses_gemm_path``); else the op layer runs two paired backwards."""
    from ._pair_gemm import uses_gemm_path  # noqa: PLC0415
    return uses_gemm_path(torch.device(device), dtype, int(d))


def backward_pair(a, b, scale, r, t, g_r, g_t):
    """(da, db, dscale) of ``sum(g_r * r) + sum(g_t * t)`` for ``(r, t) = forward_pair(a, b,
    scale)`` by G blocks and GEMMs (``_pair_gemm``): a (M, d), b (N, d) one dtype, scale () and
    r, g_r (M,), t, g_t (N,) in the accumulation dtype; da/db in the input dtype, dscale () in
    scale's dtype."""
    _load(a)
    from . import _pair_gemm  # noqa: PLC0415
    d = a.shape[1]
    aa, ba = _pair(a, b)
    p = _pair_gemm.plan(aa.shape[0], ba.shape[0], aa.shape[1], aa.dtype, aa.device)
    with _device_guard(a):
        da, db, dscale = _pair_gemm.pair_gradients(aa, ba, scale, r, t, g_r.to(r.dtype), g_t.to(t.dtype), p)
    return _unpad(da, d), _unpad(db, d), dscale


def _load_sigmoid(x: torch.Tensor):
    """The pairwise sigmoid kernels (imported on first use, bfloat16 refused under the interpreter
    as in ``_load``)."""
    _load(x)
    from . import _sigmoid  # noqa: PLC0415
    return _sigmoid


def sigmoid_forward(x, y, scale, bias, labels, offset, with_grad):
    """Pairwise sigmoid loss rows ``rows_i = sum_j softplus(-z_ij (t <x_i, y_j> + b))`` and, with
    ``with_grad``, the gradients for a unit upstream gradient on every row, from the same sweep.

    x (M, d), y (N, d) one dtype (fp16/bf16/fp32; fp64 too); scale t, bias b () accumulation dtype;
    labels () (positives: j - i == offset) or (row_labels (M,), col_labels (N,)) int64 (positives:
    equal labels). Returns (rows,) or (rows, dx, dy, dscale, dbias): rows (M,) accumulation dtype,
    dx (M, d) / dy (N, d) in the input dtype, dscale / dbias () accumulation dtype.
    """
    sig = _load_sigmoid(x)
    with _device_guard(x):
        return sig.sigmoid_forward(x, y, scale, bias, tuple(labels), int(offset), bool(with_grad))


def sigmoid_backward(grad, x, y, scale, bias, labels, offset):
    """(dx, dy, dscale, dbias) of the pairwise sigmoid loss for the upstream gradient ``grad`` (M,)
    of its rows (arguments as :func:`sigmoid_forward`)."""
    sig = _load_sigmoid(x)
    with _device_guard(x):
        return sig.sigmoid_backward(grad, x, y, scale, bias, tuple(labels), int(offset))
