"""The pairwise sigmoid (SigLIP) op: the public, checked function, its custom ops and autograd.

    l_ij = t <x_i, y_j> + b,   z_ij = +1 on positive pairs, -1 otherwise
    rows_i = sum_j softplus(-z_ij l_ij) = -sum_j log sigmoid(z_ij l_ij)

Positive pairs: ``row_labels[i] == col_labels[j]`` with labels, else ``i + offset == j``. The
gradient needs no row statistic, ``d rows_i / d l_ij = sigmoid(l_ij) - [z_ij = 1]``, so a forward
that knows the gradient will be wanted produces it in the same sweep (docs/design.md, The
pairwise sigmoid op):

* ``infonce_kernels::sigmoid`` (rows, (M,)): the general op; its backward,
  ``infonce_kernels::_sigmoid_backward``, recomputes the logits tile by tile for any upstream
  gradient (reduction "none");
* ``infonce_kernels::_sigmoid_sum`` (the 0-d sum of the rows, with the unit gradients as extra
  outputs): the fused sweep; its backward scales the saved gradients by the upstream scalar, no
  recomputation ("mean" and "sum");
* ``infonce_kernels::_sigmoid_with_grad``: the fused sweep as a plain computation, for callers
  that do their own autograd (the distributed loss).

Autograd modes: reverse mode (``backward``, ``torch.autograd.grad``), also under
``torch.compile(fullgraph=True)``; a gradient taken with ``create_graph=True`` is right and
differentiating it again raises (the backward is not differentiable). ``torch.func`` transforms
and forward-mode AD are refused with one sentence (:func:`_reverse_mode_only`): a custom op's
registered autograd cannot serve them.
"""

import math

import torch
from torch.autograd import forward_ad

from .. import _validation as v
from .backends import resolve_backend, implementation, sigmoid_unavailable_reason
from .precision import accumulation_dtype
from .transforms import first_order

__all__ = ["sigmoid", "fused_sigmoid", "sigmoid_with_grad", "sigmoid_backward", "resolve_sigmoid_backend",
           "finite_scalar", "sigmoid_op", "sigmoid_sum_op", "sigmoid_with_grad_op", "sigmoid_backward_op",
           "backward_run", "scaled_gradients", "UNSUPPORTED_TRANSFORMS"]

UNSUPPORTED_TRANSFORMS = ("infonce_kernels: the pairwise sigmoid op supports reverse-mode autograd (backward, "
                          "torch.autograd.grad) only: torch.func transforms (grad, vjp, vmap, jvp, ...) and "
                          "forward-mode AD are not supported")


@torch.compiler.assume_constant_result
def resolve_sigmoid_backend(backend: str, device: torch.device) -> str:
    """:func:`~infonce_kernels.ops.resolve_backend` for the sigmoid op: the resolved backend must
    implement it (RuntimeError saying why not otherwise)."""
    name = resolve_backend(backend, device)
    reason = sigmoid_unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run the pairwise sigmoid op: {reason}")
    return name


def _labels(row_labels, col_labels):
    """The backends' ``labels``: () when the two tensors are empty (the diagonal rule)."""
    return (row_labels, col_labels) if row_labels.numel() else ()


def _call(backend: str, method: str, *args):
    """``implementation(backend).method(*args)`` on contiguous tensors with autocast off (the
    kernels compute on the dtypes they receive)."""
    args = [a.contiguous() if isinstance(a, torch.Tensor) else
            tuple(t.contiguous() for t in a) if isinstance(a, tuple) else a for a in args]
    device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
    with torch.autocast(device, enabled=False):
        return getattr(implementation(backend), method)(*args)


def _rows_like(x):
    return x.new_empty(x.shape[0], dtype=accumulation_dtype(x.dtype))


# ------------------------------------------------------------------------------ the custom ops
@torch.library.custom_op("infonce_kernels::sigmoid", mutates_args=())
def sigmoid_op(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, row_labels: torch.Tensor,
               col_labels: torch.Tensor, offset: int, backend: str) -> torch.Tensor:
    return _call(backend, "sigmoid_forward", x, y, scale, bias, _labels(row_labels, col_labels), offset, False)[0]


@sigmoid_op.register_fake
def _(x, y, scale, bias, row_labels, col_labels, offset, backend):
    return _rows_like(x)


@torch.library.custom_op("infonce_kernels::_sigmoid_backward", mutates_args=())
def sigmoid_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor, row_labels: torch.Tensor, col_labels: torch.Tensor, offset: int,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _call(backend, "sigmoid_backward", grad, x, y, scale, bias, _labels(row_labels, col_labels), offset)


@sigmoid_backward_op.register_fake
def _(grad, x, y, scale, bias, row_labels, col_labels, offset, backend):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale), torch.empty_like(bias)


def backward_run(op, *args):
    """``op(*args)`` inside a backward: eagerly through :func:`first_order`, so that a gradient
    taken with ``create_graph=True`` raises when differentiated again instead of treating this
    backward as a constant."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():  # no graph is recorded: call it plainly
        return op(*args)
    return first_order(op, *args)


def _setup_sigmoid(ctx, inputs, output):
    x, y, scale, bias, row_labels, col_labels, offset, backend = inputs
    ctx.offset, ctx.backend = offset, backend
    ctx.save_for_backward(x, y, scale, bias, row_labels, col_labels)


def _backward_sigmoid(ctx, grad):
    x, y, scale, bias, row_labels, col_labels = ctx.saved_tensors
    dx, dy, dscale, dbias = backward_run(sigmoid_backward_op, grad, x, y, scale, bias, row_labels, col_labels,
                                          ctx.offset, ctx.backend)
    return dx, dy, dscale, dbias, None, None, None, None


sigmoid_op.register_autograd(_backward_sigmoid, setup_context=_setup_sigmoid)


@torch.library.custom_op("infonce_kernels::_sigmoid_with_grad", mutates_args=())
def sigmoid_with_grad_op(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                         row_labels: torch.Tensor, col_labels: torch.Tensor, offset: int, backend: str
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _call(backend, "sigmoid_forward", x, y, scale, bias, _labels(row_labels, col_labels), offset, True)


@sigmoid_with_grad_op.register_fake
def _(x, y, scale, bias, row_labels, col_labels, offset, backend):
    return _rows_like(x), torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale), torch.empty_like(bias)


@torch.library.custom_op("infonce_kernels::_sigmoid_sum", mutates_args=())
def sigmoid_sum_op(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, row_labels: torch.Tensor,
                   col_labels: torch.Tensor, offset: int, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, dx, dy, dscale, dbias = _call(backend, "sigmoid_forward", x, y, scale, bias,
                                        _labels(row_labels, col_labels), offset, True)
    return rows.sum(), dx, dy, dscale, dbias


@sigmoid_sum_op.register_fake
def _(x, y, scale, bias, row_labels, col_labels, offset, backend):
    total = x.new_empty((), dtype=accumulation_dtype(x.dtype))
    return total, torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale), torch.empty_like(bias)


def _setup_sum(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero (M, d) and (N, d) gradients for the unused outputs
    ctx.save_for_backward(*output[1:], *inputs[:4])


def scaled_gradients(g, dx, dy, dscale, dbias, *inputs):
    """The unit gradients of the fused sweep times the upstream scalar ``g``. ``inputs`` (x, y,
    scale, bias) are not read: passed through :func:`first_order`, they connect a gradient
    taken with ``create_graph=True`` to them, so that differentiating it again raises."""
    return (g * dx).to(dx.dtype), (g * dy).to(dy.dtype), g * dscale, g * dbias


def _backward_sum(ctx, g, *unused):
    if g is None:  # the sum itself was not used
        return (None,) * 8
    dx, dy, dscale, dbias = backward_run(scaled_gradients, g, *ctx.saved_tensors)
    return dx, dy, dscale, dbias, None, None, None, None


sigmoid_sum_op.register_autograd(_backward_sum, setup_context=_setup_sum)


# ------------------------------------------------------------------------------- entry points
def _reverse_mode_only(*tensors) -> None:
    """Refuse torch.func transforms and forward-mode AD with one sentence (eagerly; a compiled
    graph holds plain tensors)."""
    if torch.compiler.is_compiling():
        return
    if torch._C._are_functorch_transforms_active() or any(
            forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(UNSUPPORTED_TRANSFORMS)


def _label_tensors(labels, x, y):
    if labels is None:
        empty = x.new_empty(0, dtype=torch.int64)
        return empty, empty
    return labels


def fused_sigmoid(x, y, scale, bias, labels=None, offset=0, backend="auto", *, total=False):
    """The op on checked arguments (the losses call this after their own checks).

    x (M, d), y (N, d); ``scale``, ``bias`` 0-d tensors of the accumulation dtype; ``labels``
    None or (row_labels (M,), col_labels (N,)) int64. Returns the (M,) rows, or with ``total``
    their 0-d sum, computed by the fused sweep (gradients in the same pass, no recomputation in
    the backward) when autograd will need them.
    """
    _reverse_mode_only(x, y, scale, bias)
    name = resolve_sigmoid_backend(backend, x.device)
    args = (x, y, scale, bias, *_label_tensors(labels, x, y), int(offset), name)
    if not total:
        return sigmoid_op(*args)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, scale, bias))
    if not needs_grad:
        return sigmoid_op(*args).sum()
    return sigmoid_sum_op(*args)[0]


def sigmoid_with_grad(x, y, scale, bias, labels=None, offset=0, backend="auto"):
    """(rows, dx, dy, dscale, dbias) for a unit upstream gradient on every row, one sweep, no
    autograd (checked arguments as for :func:`fused_sigmoid`)."""
    name = resolve_sigmoid_backend(backend, x.device)
    return sigmoid_with_grad_op(x, y, scale, bias, *_label_tensors(labels, x, y), int(offset), name)


def sigmoid_backward(grad, x, y, scale, bias, labels=None, offset=0, backend="auto"):
    """(dx, dy, dscale, dbias) of ``sum_i grad_i rows_i`` for a (M,) ``grad`` of the
    accumulation dtype, no autograd (checked arguments as for :func:`fused_sigmoid`)."""
    name = resolve_sigmoid_backend(backend, x.device)
    return sigmoid_backward_op(grad, x, y, scale, bias, *_label_tensors(labels, x, y), int(offset), name)


def finite_scalar(name: str, value, *, device, dtype) -> torch.Tensor:
    """A float or a one-element floating tensor as a 0-d tensor of ``dtype`` (differentiable when
    it is one), of any sign; a Python number is checked here, a tensor's value by
    ``check_values`` (finite)."""
    if isinstance(value, torch.Tensor):  # the shape, dtype and device checks of every scalar argument
        return v.positive_scalar(name, value, device=device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    if not v.tracing() and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return torch.scalar_tensor(float(value), device=device, dtype=dtype)


def sigmoid(x, y, scale, bias, *, row_labels=None, col_labels=None, offset=0, backend="auto"):
    """The pairwise sigmoid loss per row, never materialising the M x N logits.

    Args:
        x: (M, d) rows (images), float16 / bfloat16 / float32 / float64.
        y: (N, d) columns (texts), same dtype and device.
        scale: t, any finite real (SigLIP's exponentiated ``logit_scale``): a float or a
            one-element tensor, which receives a gradient when it requires one.
        bias: b, any finite real (``logit_bias``), same forms.
        row_labels, col_labels: optional (M,) and (N,) integer labels, given together: pair
            (i, j) is positive when they are equal (several positives per row). Without them
            (i, j) is positive when ``i + offset == j``.
        offset: the diagonal rule's shift (an int, may be negative; 0: the diagonal).
        backend: "auto", "reference", "cpu", "triton" or "cuda" (see :func:`infonce_kernels.lse`).

    Returns:
        (M,) float32 (float64 for float64 inputs): ``rows_i = sum_j softplus(-z_ij (t <x_i, y_j> + b))``
        with z_ij = +1 on positive pairs and -1 otherwise. Differentiable in x, y, scale and bias.
    """
    v.check_features("x", x)
    v.check_features("y", y)
    v.check_same_kind("x", x, "y", y)
    acc = accumulation_dtype(x.dtype)
    scale_t = finite_scalar("scale", scale, device=x.device, dtype=acc)
    bias_t = finite_scalar("bias", bias, device=x.device, dtype=acc)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    labels = None
    if row_labels is not None or col_labels is not None:
        if row_labels is None or col_labels is None:
            raise ValueError("row_labels and col_labels go together: pass both (or neither)")
        labels = (v._int_vector("row_labels", row_labels, x.shape[0], "row of x", x.device),
                  v._int_vector("col_labels", col_labels, y.shape[0], "row of y", x.device))
    v.check_values({"x": x, "y": y, "scale": scale_t, "bias": bias_t})
    return fused_sigmoid(x, y, scale_t, bias_t, labels, offset, backend)
