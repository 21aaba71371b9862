"""The ``torch.library`` custom ops and their autograd.

``infonce_kernels::lse`` is the public op (a fake implementation and registered autograd make
it work under ``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``); its
backward and the internal ops are private: ``_lse_backward``, ``_lse_backward_paired`` and
``_lse_pair`` (CLIP's two directions, whose backward is two paired passes, or one
``_lse_pair_backward`` call where the backend has one for the inputs), and ``_lse_counted``,
``lse`` that also returns the per-row count of the keys the threshold rule dropped (the same
forward sweep; same autograd).

A custom op takes tensors, not objects, so the :class:`Exclusion` travels through each op as its
tensors (``exclude, row_labels, key_labels, positive`` and, last and optional, ``threshold``) and
is rebuilt, in :func:`_run`, before the backend gets it. :func:`_run` is also
the one place that makes the tensors contiguous and turns autocast off.
"""

from typing import Optional

import torch

from .backends import implementation
from .exclusion import Exclusion
from .precision import accumulation_dtype

__all__ = ["lse_op", "lse_counted_op", "lse_backward_op", "lse_backward_paired_op", "lse_pair_op", "lse_pair_backward_op",
           "lse_gradients", "pair_backward"]


def _run(backend: str, method: str, *args, **options):
    """``implementation(backend).method(*args, **options)`` with every tensor argument contiguous, the
    Exclusion objects rebuilt from their tensors, and autocast off: the kernels compute on the
    dtypes the op receives (accumulating in float32, float64 for float64), whatever autocast
    region it is called from. Left on, autocast would recast the products inside the reference
    and C++ kernels."""
    copies = {}  # one contiguous tensor per input object (a symmetric op's k stays its q)

    def contiguous(t):
        return copies.setdefault(id(t), t.contiguous())

    def spec(flat):
        return Exclusion.from_tensors(*(contiguous(t) if isinstance(t, torch.Tensor) else t for t in flat))

    args = [contiguous(a) if isinstance(a, torch.Tensor) else spec(a) if isinstance(a, tuple) else a for a in args]
    device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
    with torch.autocast(device, enabled=False):
        return getattr(implementation(backend), method)(*args, **options)


def _spec(exclude, row_labels, key_labels, positive, symmetric=False, threshold=None):
    """An Exclusion as the op received it, for :func:`_run` to rebuild."""
    return exclude, row_labels, key_labels, positive, symmetric, threshold


@torch.library.custom_op("infonce_kernels::lse", mutates_args=())
def lse_op(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    exclude: torch.Tensor,
    row_labels: torch.Tensor,
    key_labels: torch.Tensor,
    positive: torch.Tensor,
    symmetric: bool,
    backend: str,
    threshold: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    spec = _spec(exclude, row_labels, key_labels, positive, symmetric, threshold)
    return _run(backend, "forward", q, q if symmetric else k, scale, spec)


@lse_op.register_fake
def _(q, k, scale, exclude, row_labels, key_labels, positive, symmetric, backend, threshold=None):
    return q.new_empty(q.shape[0], dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("infonce_kernels::_lse_counted", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor scale, Tensor exclude, Tensor row_labels, Tensor key_labels, Tensor positive, "
    "bool symmetric, str backend, Tensor? threshold=None) -> (Tensor, Tensor)"))
def lse_counted_op(q, k, scale, exclude, row_labels, key_labels, positive, symmetric, backend, threshold=None):
    """``lse_op`` and the (M,) int32 count of the keys each row's threshold rule drops among the
    keys the other rules keep (zeros without a threshold), from the same forward sweep."""
    spec = _spec(exclude, row_labels, key_labels, positive, symmetric, threshold)
    return _run(backend, "forward", q, q if symmetric else k, scale, spec, count=True)


@lse_counted_op.register_fake
def _(q, k, scale, exclude, row_labels, key_labels, positive, symmetric, backend, threshold=None):
    return (q.new_empty(q.shape[0], dtype=accumulation_dtype(q.dtype)),
            q.new_empty(q.shape[0], dtype=torch.int32))


@torch.library.custom_op("infonce_kernels::_lse_backward", mutates_args=(), schema=(
    "(Tensor grad, Tensor q, Tensor k, Tensor scale, Tensor exclude, Tensor row_labels, Tensor key_labels, "
    "Tensor positive, bool symmetric, str backend, Tensor lse, Tensor? threshold=None) -> (Tensor, Tensor, Tensor)"))
def lse_backward_op(grad, q, k, scale, exclude, row_labels, key_labels, positive, symmetric, backend, lse,
                    threshold=None):
    spec = _spec(exclude, row_labels, key_labels, positive, symmetric, threshold)
    return _run(backend, "backward", grad, q, q if symmetric else k, scale, spec, lse)


@lse_backward_op.register_fake
def _(grad, q, k, scale, exclude, row_labels, key_labels, positive, symmetric, backend, lse, threshold=None):
    dk = q.new_empty(0) if symmetric else torch.empty_like(k)
    return torch.empty_like(q), dk, torch.empty_like(scale)


def saved_inputs(inputs, output):
    """What the backward of ``lse_op`` / ``lse_counted_op`` keeps from a call: (q, k, scale,
    exclude, row_labels, key_labels, positive, threshold, lse), threshold None without the rule."""
    q, k, scale, exclude, row_labels, key_labels, positive, symmetric, backend, *threshold = inputs
    lse = output[0] if isinstance(output, (tuple, list)) else output
    return q, q if symmetric else k, scale, exclude, row_labels, key_labels, positive, (threshold or [None])[0], lse


def _setup_context(ctx, inputs, output):
    ctx.symmetric, ctx.backend = inputs[7], inputs[8]
    ctx.save_for_backward(*saved_inputs(inputs, output))


def lse_gradients(saved, grad, needs, symmetric, backend, run=None):
    """The gradients of ``lse_op``'s inputs (one per entry of ``needs``) from its saved tensors
    (:func:`saved_inputs`) and the upstream ``grad``; ``run`` runs the backward op (default: the
    op itself). Only q, k and scale receive gradients (the threshold is an input, like the labels)."""
    q, k, scale, exclude, row_labels, key_labels, positive, threshold, lse = saved
    run = run or lse_backward_op
    dq, dk, dscale = run(grad, q, k, scale, exclude, row_labels, key_labels, positive, symmetric, backend, lse,
                         threshold)
    return (
        dq if needs[0] or symmetric else None,
        None if symmetric or not needs[1] else dk,
        dscale if needs[2] else None,
    ) + (None,) * (len(needs) - 3)


def _backward(ctx, grad, *count_grad):  # the count (lse_counted_op) is an integer output: no gradient
    return lse_gradients(ctx.saved_tensors, grad, ctx.needs_input_grad, ctx.symmetric, ctx.backend)


lse_op.register_autograd(_backward, setup_context=_setup_context)
lse_counted_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("infonce_kernels::_lse_backward_paired", mutates_args=(), schema=(
    "(Tensor grad, Tensor q, Tensor k, Tensor scale, Tensor exclude, Tensor row_labels, Tensor key_labels, "
    "Tensor positive, Tensor lse, Tensor key_grad, Tensor key_lse, Tensor key_exclude, Tensor key_positive, "
    "int row_offset, str backend, Tensor? threshold=None, Tensor? key_threshold=None) -> (Tensor, Tensor)"))
def lse_backward_paired_op(grad, q, k, scale, exclude, row_labels, key_labels, positive, lse, key_grad, key_lse,
                           key_exclude, key_positive, row_offset, backend, threshold=None, key_threshold=None):
    spec = _spec(exclude, row_labels, key_labels, positive, False, threshold)
    key_spec = _spec(key_exclude, key_labels, row_labels, key_positive, False, key_threshold)
    return _run(backend, "backward_paired", grad, q, k, scale, spec, lse, key_grad, key_lse, key_spec, row_offset)


@lse_backward_paired_op.register_fake
def _(grad, q, k, scale, *rest):
    return torch.empty_like(q), torch.empty_like(scale)


@torch.library.custom_op("infonce_kernels::_lse_pair", mutates_args=())
def lse_pair_op(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(implementation(backend), "forward_pair"):    # one pass for both directions (optional)
        return _run(backend, "forward_pair", a, b, scale)
    none_a, none_b = Exclusion.none(a.shape[0], a.device), Exclusion.none(b.shape[0], b.device)
    return (_run(backend, "forward", a, b, scale, _spec(*none_a.tensors()[:4])),
            _run(backend, "forward", b, a, scale, _spec(*none_b.tensors()[:4])))


@lse_pair_op.register_fake
def _(a, b, scale, backend):
    dtype = accumulation_dtype(a.dtype)
    return a.new_empty(a.shape[0], dtype=dtype), b.new_empty(b.shape[0], dtype=dtype)


def _setup_pair(ctx, inputs, output):
    a, b, scale, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(a, b, scale, *output)


@torch.library.custom_op("infonce_kernels::_lse_pair_backward", mutates_args=())
def lse_pair_backward_op(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                         g_r: torch.Tensor, g_t: torch.Tensor,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both sides' gradients of ``lse_pair`` at once (a backend's optional ``backward_pair``)."""
    return _run(backend, "backward_pair", a, b, scale, r, t, g_r, g_t)


@lse_pair_backward_op.register_fake
def _(a, b, scale, r, t, g_r, g_t, backend):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale)


def uses_pair_backward(a, backend) -> bool:
    """Whether ``backend`` computes CLIP's backward for ``a``'s device, dtype and d in one call
    (``uses_backward_pair`` / ``backward_pair``, optional: triton's G blocks and GEMMs for large d)."""
    impl = implementation(backend)
    return hasattr(impl, "backward_pair") and impl.uses_backward_pair(a.device, a.dtype, a.shape[1])


def pair_backward(a, b, scale, r, t, g_r, g_t, backend, paired=None, pair=None):
    """(da, db, dscale) of ``sum(g_r * r) + sum(g_t * t)`` for ``(r, t) = lse_pair(a, b, scale)``.

    Where the backend has a one-call backward for these inputs (:func:`uses_pair_backward`), that
    one (``pair`` runs it; default: ``lse_pair_backward_op``). Else each side's gradient in one pass
    (the paired backward): a's rows against b, with every b row (as a row against a) on the key
    side, and the other way round. ``paired`` runs the paired backward op (default: the op itself)."""
    if uses_pair_backward(a, backend):
        return (pair or lse_pair_backward_op)(a, b, scale, r, t, g_r, g_t, backend)
    paired = paired or lse_backward_paired_op
    none_a = Exclusion.none(a.shape[0], a.device).tensors()[:4]
    none_b = Exclusion.none(b.shape[0], b.device).tensors()[:4]
    da, ds_a = paired(g_r, a, b, scale, *none_a, r, g_t, t, none_b[0], none_a[3], 0, backend)
    db, ds_b = paired(g_t, b, a, scale, *none_b, t, g_r, r, none_a[0], none_b[3], 0, backend)
    return da, db, ds_a + ds_b


def _backward_pair(ctx, g_r, g_t):
    a, b, scale, r, t = ctx.saved_tensors
    return (*pair_backward(a, b, scale, r, t, g_r, g_t, ctx.backend), None)


lse_pair_op.register_autograd(_backward_pair, setup_context=_setup_pair)
