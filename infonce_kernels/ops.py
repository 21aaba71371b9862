"""The fused row log-sum-exp op, its backends and its autograd.

    lse(q, k, s)_i = log sum_{j not excluded for i} exp(s <q_i, k_j>)

``infonce_kernels::lse`` is a ``torch.library`` custom op with a fake (meta) implementation and
registered autograd, so it runs under ``torch.compile(fullgraph=True)`` and passes
``torch.library.opcheck``. Its ``backend`` argument picks the implementation; every backend
provides the same two functions (the contract):

    forward(q, k, scale, exclude, row_labels, key_labels, positive, symmetric) -> lse     (M,)
    backward(grad, q, k, scale, exclude, row_labels, key_labels, positive, symmetric, lse)
        -> (dq, dk, dscale)

with contiguous q (M, d), k (N, d) of one dtype, ``scale`` a 0-d tensor (float64 for float64
inputs, else float32), ``exclude`` an (M, E) int64 tensor (E <= 2, -1 = none), ``lse`` and
``grad`` float32 (float64 for float64 inputs). The label rule: ``row_labels`` (M,),
``key_labels`` (N,) and ``positive`` (M,) int64 make row i also skip every key j with
``key_labels[j] == row_labels[i]`` other than ``positive[i]`` (-1 = none); all three are empty
when the rule is off. When ``symmetric`` k is q and dq is the whole gradient on z (dk is empty).

Backends:

============  ===========  =====================================================================
name          device       implementation
============  ===========  =====================================================================
reference     any          plain PyTorch, materialises the M x N logits (oracle, baseline)
cpu           CPU          C++ (csrc/cpu): BLAS tiles, online LSE, at::parallel_for
triton        CUDA         Triton kernels (infonce_kernels/triton); CPU under TRITON_INTERPRET=1
cuda          CUDA         CUDA C++ tensor-core kernels (csrc/cuda), when built with CUDA
============  ===========  =====================================================================
"""

import functools
import os
import warnings

import torch

from . import _validation as v
from . import reference

__all__ = ["lse", "BACKENDS", "available_backends", "resolve_backend"]

BACKENDS = ("reference", "cpu", "triton", "cuda")


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the op's output: float64 for float64 inputs, float32 for every other."""
    return torch.float64 if dtype == torch.float64 else torch.float32


from ._extension import EXTENSION_ERROR as _EXTENSION_ERROR

if _EXTENSION_ERROR is None:

    @torch.library.register_fake("infonce_kernels::_lse_fwd")
    def _(q, k, scale, exclude, labels, symmetric):
        return q.new_empty(q.shape[0], dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake("infonce_kernels::_lse_bwd")
    def _(grad, q, k, scale, exclude, labels, symmetric, lse):
        dk = q.new_empty(0) if symmetric else torch.empty_like(k)
        return torch.empty_like(q), dk, torch.empty_like(scale)

    @torch.library.register_fake("infonce_kernels::_lse_bwd_paired")
    def _(grad, q, k, scale, exclude, labels, lse, key_side, row_offset):
        return torch.empty_like(q), torch.empty_like(scale)


def _label_list(row_labels, key_labels, positive):
    """The C++ ops' ``Tensor[] labels``: [] when the label rule is off (three empty tensors)."""
    return [] if row_labels.numel() == 0 else [row_labels, key_labels, positive]


class _CppBackend:
    """The C++ kernel ops ``infonce_kernels::_lse_fwd``/``_lse_bwd``/``_lse_bwd_paired``; the
    tensors' device picks the kernel (CPU or CUDA dispatch key)."""

    @staticmethod
    def forward(q, k, scale, exclude, row_labels, key_labels, positive, symmetric):
        labels = _label_list(row_labels, key_labels, positive)
        return torch.ops.infonce_kernels._lse_fwd(q, k, scale, exclude, labels, symmetric)

    @staticmethod
    def backward(grad, q, k, scale, exclude, row_labels, key_labels, positive, symmetric, lse):
        labels = _label_list(row_labels, key_labels, positive)
        return torch.ops.infonce_kernels._lse_bwd(grad, q, k, scale, exclude, labels, symmetric, lse)

    @staticmethod
    def backward_paired(grad, q, k, scale, exclude, row_labels, key_labels, positive, lse, key_grad, key_lse,
                        key_exclude, key_positive, row_offset):
        labels = _label_list(row_labels, key_labels, positive)
        key_side = [key_grad, key_lse, key_exclude] + ([key_positive] if labels else [])
        return torch.ops.infonce_kernels._lse_bwd_paired(grad, q, k, scale, exclude, labels, lse, key_side,
                                                         row_offset)


def _triton_module():
    from . import triton as triton_backend

    return triton_backend


def unavailable_reason(name: str, device: torch.device):
    """None when backend ``name`` can run on ``device``, else a sentence saying why not."""
    if name == "reference":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, these are on {device}"
        return _EXTENSION_ERROR
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device}"
        if _EXTENSION_ERROR is not None:
            return _EXTENSION_ERROR
        if not torch._C._dispatch_has_kernel_for_dispatch_key("infonce_kernels::_lse_fwd", "CUDA"):
            return "infonce_kernels._C was built without its CUDA kernels (CPU-only torch or no nvcc at build time)"
        return None
    if name == "triton":
        ok, reason = _triton_module().available(device)
        return None if ok else reason
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")


def available_backends(device="cpu"):
    """Names of the backends that can run on ``device``."""
    device = torch.device(device)
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


_warned_fallback = set()


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run: an explicit name, else $INFONCE_BACKEND, else the fastest for ``device``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` (saying why) for a backend that
    cannot run here. Under ``torch.compile`` it runs once at trace time and its answer is a
    constant of the graph (the availability checks call into Triton's C++ and CUDA's runtime,
    which the compiler cannot trace).
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("INFONCE_BACKEND", "auto") or "auto"
    if backend == "auto":
        preferred = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
        for name in preferred:
            if unavailable_reason(name, device) is None:
                return name
        if device.type not in _warned_fallback:
            _warned_fallback.add(device.type)
            reasons = "; ".join(f"{n}: {unavailable_reason(n, device)}" for n in preferred)
            warnings.warn(f"infonce_kernels: no fused backend for {device.type} tensors ({reasons}); "
                          "using the materialising reference backend", RuntimeWarning, stacklevel=3)
        return "reference"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    return backend


def _implementation(name: str):
    if name == "reference":
        return reference
    if name in ("cpu", "cuda"):
        return _CppBackend
    if name == "triton":
        return _triton_module()
    raise ValueError(f"unknown backend {name!r}")


def _autocast_off(kernel):
    """Runs an op body with autocast off: the kernels compute on the dtypes the op receives
    (accumulating in float32, float64 for float64), whatever autocast region it is called from.
    Left on, autocast would recast the products inside the reference and C++ kernels."""

    @functools.wraps(kernel)
    def run(*args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return kernel(*args)

    return run


@torch.library.custom_op("infonce_kernels::lse", mutates_args=())
@_autocast_off
def _lse_op(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    exclude: torch.Tensor,
    row_labels: torch.Tensor,
    key_labels: torch.Tensor,
    positive: torch.Tensor,
    symmetric: bool,
    backend: str,
) -> torch.Tensor:
    if symmetric:
        k = q
    return _implementation(backend).forward(q, k, scale, exclude, row_labels, key_labels, positive, symmetric)


@_lse_op.register_fake
def _(q, k, scale, exclude, row_labels, key_labels, positive, symmetric, backend):
    return q.new_empty(q.shape[0], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("infonce_kernels::lse_backward", mutates_args=())
@_autocast_off
def _lse_backward_op(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    exclude: torch.Tensor,
    row_labels: torch.Tensor,
    key_labels: torch.Tensor,
    positive: torch.Tensor,
    symmetric: bool,
    backend: str,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if symmetric:
        k = q
    labels = (row_labels, key_labels, positive)
    return _implementation(backend).backward(grad, q, k, scale, exclude, *labels, symmetric, lse)


@_lse_backward_op.register_fake
def _(grad, q, k, scale, exclude, row_labels, key_labels, positive, symmetric, backend, lse):
    dk = q.new_empty(0) if symmetric else torch.empty_like(k)
    return torch.empty_like(q), dk, torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    q, k, scale, exclude, row_labels, key_labels, positive, symmetric, backend = inputs
    ctx.symmetric, ctx.backend = symmetric, backend
    ctx.save_for_backward(q, q if symmetric else k, scale, exclude, row_labels, key_labels, positive, output)


def _backward(ctx, grad):
    q, k, scale, exclude, row_labels, key_labels, positive, lse = ctx.saved_tensors
    dq, dk, dscale = _lse_backward_op(
        grad.contiguous(), q, k, scale, exclude, row_labels, key_labels, positive, ctx.symmetric, ctx.backend, lse
    )
    needs = ctx.needs_input_grad
    return (
        dq if needs[0] or ctx.symmetric else None,
        None if ctx.symmetric or not needs[1] else dk,
        dscale if needs[2] else None,
    ) + (None,) * 6


_lse_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("infonce_kernels::lse_backward_paired", mutates_args=())
@_autocast_off
def _lse_backward_paired_op(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    exclude: torch.Tensor,
    row_labels: torch.Tensor,
    key_labels: torch.Tensor,
    positive: torch.Tensor,
    lse: torch.Tensor,
    key_grad: torch.Tensor,
    key_lse: torch.Tensor,
    key_exclude: torch.Tensor,
    key_positive: torch.Tensor,
    row_offset: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (grad, q, k, scale, exclude, row_labels, key_labels, positive, lse, key_grad, key_lse, key_exclude,
            key_positive, row_offset)
    return _implementation(backend).backward_paired(*args)


@_lse_backward_paired_op.register_fake
def _(grad, q, k, scale, *rest):
    return torch.empty_like(q), torch.empty_like(scale)


@torch.library.custom_op("infonce_kernels::lse_pair", mutates_args=())
@_autocast_off
def _lse_pair_op(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _implementation(backend)
    none = a.new_empty(0, dtype=torch.int64)
    no_exclude = a.new_empty(a.shape[0], 0, dtype=torch.int64)
    return (impl.forward(a, b, scale, no_exclude, none, none, none, False),
            impl.forward(b, a, scale, no_exclude, none, none, none, False))


@_lse_pair_op.register_fake
def _(a, b, scale, backend):
    dtype = _lse_dtype(a.dtype)
    return a.new_empty(a.shape[0], dtype=dtype), b.new_empty(b.shape[0], dtype=dtype)


def _setup_pair(ctx, inputs, output):
    a, b, scale, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(a, b, scale, *output)


def _backward_pair(ctx, g_r, g_t):
    # Each side's gradient in one pass (lse_bwd_paired): a's rows against b, with every b row
    # (as a row against a) on the key side, and the other way round.
    a, b, scale, r, t = ctx.saved_tensors
    g_r, g_t = g_r.contiguous(), g_t.contiguous()
    none = a.new_empty(0, dtype=torch.int64)
    no_exclude_a, no_exclude_b = a.new_empty(a.shape[0], 0, dtype=torch.int64), b.new_empty(b.shape[0], 0, dtype=torch.int64)
    da, ds_a = _lse_backward_paired_op(g_r, a, b, scale, no_exclude_a, none, none, none, r, g_t, t, no_exclude_b,
                                       none, 0, ctx.backend)
    db, ds_b = _lse_backward_paired_op(g_t, b, a, scale, no_exclude_b, none, none, none, t, g_r, r, no_exclude_a,
                                       none, 0, ctx.backend)
    return da, db, ds_a + ds_b, None


_lse_pair_op.register_autograd(_backward_pair, setup_context=_setup_pair)


def fused_lse_pair(a, b, scale, backend):
    """Both directions of a paired batch, e.g. CLIP's: ``(lse(a, b, s), lse(b, a, s))`` for
    checked (n, d) rows a, b and a 0-d ``scale``; the backward produces each side's gradient in
    one pass (``lse_bwd_paired``) instead of two general backward calls."""
    name = resolve_backend(backend, a.device)
    return _lse_pair_op(a.contiguous(), b.contiguous(), scale, name)


def paired_backward(grad, q, k, scale, exclude, labels, lse, key_grad, key_lse, key_exclude, key_positive,
                    row_offset, backend):
    """Gradient on q when the keys are rows of a log-sum-exp too (no autograd; see ``lse_bwd_paired``
    in csrc/ops.cpp): ``dq_i = s sum_j (W_ij + V_ji) k_j``, returns (dq, dscale of the row side).

    q (M, d), k (N, d); ``grad``/``lse`` (M,) belong to the rows of q, ``key_grad``/``key_lse`` (N,)
    to the keys as rows; ``exclude`` (M, E) numbers keys like k, ``key_exclude`` (N, E) numbers the
    rows of q from ``row_offset``; ``labels`` None or (row_labels, key_labels, positive) with
    ``key_positive`` (N,) the keys' positives (empty without labels). The distributed losses use it
    for a rank's rows against the all-gathered rows.
    """
    name = resolve_backend(backend, q.device)
    if labels is None:
        labels = (exclude.new_empty(0),) * 3
        key_positive = exclude.new_empty(0)
    labels = tuple(t.contiguous() for t in labels)
    return _lse_backward_paired_op(grad.contiguous(), q.contiguous(), k.contiguous(), scale, exclude.contiguous(),
                                   *labels, lse.contiguous(), key_grad.contiguous(), key_lse.contiguous(),
                                   key_exclude.contiguous(), key_positive.contiguous(), int(row_offset), name)


def lse(q, k, scale, *, exclude=None, symmetric=False, row_labels=None, key_labels=None, positive=None,
        backend="auto"):
    """Masked, scaled row log-sum-exp, never materialising the M x N similarity matrix.

    Args:
        q: (M, d) queries, float16 / bfloat16 / float32 / float64.
        k: (N, d) keys, same dtype and device as ``q``. With ``symmetric=True`` pass ``q`` itself.
        scale: s > 0, the inverse temperature (1/tau) or CLIP's exponentiated logit scale:
            a float, or a one-element tensor, which receives a gradient when it requires one.
        exclude: optional (M, E) integer tensor, E <= 2: row i skips keys ``exclude[i, e]``
            (-1 = none); e.g. its own index when k is q, its positive for decoupled losses.
        symmetric: declares ``k is q`` (M == N); the backward then needs one pass.
        row_labels, key_labels: optional (M,) and (N,) integer labels (key_labels defaults to
            row_labels when ``symmetric``): row i then also skips every key with its label,
            e.g. false negatives of the same class in a supervised batch...
        positive: ...except its designated positive ``positive[i]`` (optional (M,) integer
            tensor, -1 = none; requires labels), which stays in the denominator.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (see :mod:`infonce_kernels.ops`).
            "auto" reads $INFONCE_BACKEND, else picks the fastest backend for the device.

    Returns:
        (M,) float32 tensor (float64 for float64 inputs), in nats:
        ``r_i = log sum_{j not excluded} exp(s * <q_i, k_j>)``. Differentiable in q, k and scale.
    """
    v.check_features("q", q)
    if symmetric:
        if k is not None and k is not q:
            raise ValueError("symmetric=True requires k to be q (the same tensor object), or k=None")
        k = q
    v.check_features("k", k)
    v.check_same_kind("q", q, "k", k)
    scale_t = v.positive_scalar("scale", scale, device=q.device, dtype=_lse_dtype(q.dtype))
    ex = v.exclude_tensor(exclude, q.shape[0], k.shape[0], q.device)
    if symmetric and key_labels is None:
        key_labels = row_labels
    labels = v.label_tensors(row_labels, key_labels, positive, q.shape[0], k.shape[0], q.device)
    tensors = {"q": q} if symmetric else {"q": q, "k": k}
    v.check_values(tensors, positive={"scale": scale_t}, exclude=ex, keys=k.shape[0], labels=labels)
    return fused_lse(q, k, scale_t, ex, symmetric, backend, labels)


def fused_lse(q, k, scale, exclude, symmetric, backend, labels=None):
    """:func:`lse` on arguments already checked by the caller: ``scale`` a 0-d tensor of the
    lse dtype, ``exclude`` an (M, E) int64 tensor, ``labels`` None or the (row_labels,
    key_labels, positive) int64 tensors. The losses call this after their own checks."""
    name = resolve_backend(backend, q.device)
    q = q.contiguous()
    k = q if symmetric else k.contiguous()
    if labels is None:
        labels = (exclude.new_empty(0),) * 3
    return _lse_op(q, k, scale, exclude, *labels, bool(symmetric), name)
