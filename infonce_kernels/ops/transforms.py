"""The fused log-sum-exp under every autograd mode: reverse mode, forward mode and torch.func.

The custom ops (``infonce_kernels::lse``, ``_lse_pair``) carry reverse-mode autograd for
direct callers and for compiled graphs. Eager calls of the losses reach them through the two
``torch.autograd.Function`` classes below, which add what a custom op's registered autograd
cannot give:

* ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``, ``vmap``, ``jvp``, ``jacfwd``):
  functorch needs ``setup_context``; ``vmap`` runs the op once per batch entry (exact, and the
  kernels see ordinary tensors);
* forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) with the exact tangent

      r'_i = sum_j P_ij L'_ij,   P_ij = exp(L_ij - r_i) on kept pairs (0 on excluded ones),
      L'_ij = s (<q'_i, k_j> + <q_i, k'_j>) + s' <q_i, k_j>,

  computed a block of rows at a time (``TANGENT_BLOCK`` logits per block), so no M x N tensor
  exists;
* a refusal of second-order derivatives where one is attempted: a gradient taken with
  ``create_graph=True`` is right, and differentiating it again raises (:func:`first_order`)
  instead of silently treating the fused backward as a constant.

Dynamo cannot trace a ``torch.autograd.Function`` with a custom ``jvp``, so compiled graphs use
the custom ops' own autograd (see :func:`infonce_kernels.ops.fused_lse`).
"""

import functools

import torch

from ._custom_ops import (lse_backward_op, lse_backward_paired_op, lse_counted_op, lse_gradients, lse_op, lse_pair_op,
                          lse_pair_backward_op, pair_backward, saved_inputs)
from .exclusion import Exclusion

__all__ = ["LseFunction", "LsePairFunction", "first_order", "lse_tangent"]

TANGENT_BLOCK = 1 << 22  # logits per block of the forward-mode tangent (16 MiB in float32)

SECOND_ORDER = ("infonce_kernels: second-order derivatives (a second backward through a gradient taken with "
                "create_graph=True, nested torch.func.grad, torch.func.hessian) through the fused log-sum-exp "
                "are not supported: its backward is not differentiable")


def lse_tangent(q, k, scale, spec: Exclusion, lse, dq, dk, dscale):
    """(M,) forward-mode tangent of ``lse(q, k, scale)`` for the tangents dq, dk, dscale (each may
    be None), in the dtype of ``lse``."""
    acc = lse.dtype
    qa, ka, s = q.to(acc), k.to(acc), scale.to(acc)
    rows = max(1, TANGENT_BLOCK // k.shape[0])
    out = []
    for start in range(0, q.shape[0], rows):
        block = slice(start, start + rows)
        dots = qa[block] @ ka.T
        logits = dots * s
        excluded = spec.rows(block).mask(k.shape[0], logits=logits)
        p = torch.exp(logits.masked_fill(excluded, float("-inf")) - lse[block, None])
        dlogits = torch.zeros_like(dots)
        if dq is not None:
            dlogits = dlogits + s * (dq[block].to(acc) @ ka.T)
        if dk is not None:
            dlogits = dlogits + s * (qa[block] @ dk.to(acc).T)
        if dscale is not None:
            dlogits = dlogits + dscale.to(acc) * dots
        out.append((p * dlogits).sum(1))
    return torch.cat(out)


class _FirstOrder(torch.autograd.Function):
    """A backward op under autograd: its result carries a graph whose derivatives raise."""

    @staticmethod
    def forward(op, *args):
        return op(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(SECOND_ORDER)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(SECOND_ORDER)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _loop_vmap(_FirstOrder, info, in_dims, *args)


def first_order(op, *args):
    """``op(*args)`` for a backward op: right once (also with ``create_graph=True``), raising if
    differentiated again."""
    return _FirstOrder.apply(op, *args)


def _loop_vmap(function, info, in_dims, *args):
    """vmap rule: ``function`` once per batch entry, the outputs stacked along dim 0."""
    def entry(b):
        return [a if d is None else a.select(d, b) for a, d in zip(args, in_dims)]

    outs = [function.apply(*entry(b)) for b in range(info.batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


class LseFunction(torch.autograd.Function):
    """``lse_op`` (same arguments, ``threshold`` last) with forward-mode AD and torch.func
    support; with ``count`` it is ``lse_counted_op``: (lse, the threshold rule's (M,) int32
    dropped count), the count not differentiable."""

    @staticmethod
    def forward(q, k, scale, exclude, row_labels, key_labels, positive, symmetric, backend, threshold, count):
        op = lse_counted_op if count else lse_op
        return op(q, k, scale, exclude, row_labels, key_labels, positive, symmetric, backend, threshold)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.symmetric, ctx.backend, ctx.count = inputs[7], inputs[8], inputs[10]
        saved = saved_inputs(inputs[:10], output)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        if ctx.count:
            ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad, *count_grad):
        return lse_gradients(ctx.saved_tensors, grad, ctx.needs_input_grad, ctx.symmetric, ctx.backend,
                             run=functools.partial(first_order, lse_backward_op))

    @staticmethod
    def jvp(ctx, dq, dk, dscale, *_):
        q, k, scale, exclude, row_labels, key_labels, positive, threshold, lse = ctx.saved_tensors
        if ctx.symmetric:  # k is q: the keys move with the rows
            dk = dq
        spec = Exclusion.from_tensors(exclude, row_labels, key_labels, positive, threshold=threshold)
        tangent = lse_tangent(q, k, scale, spec, lse, dq, dk, dscale)
        return (tangent, None) if ctx.count else tangent

    @staticmethod
    def vmap(info, in_dims, *args):
        return _loop_vmap(LseFunction, info, in_dims, *args)


class LsePairFunction(torch.autograd.Function):
    """``lse_pair_op``: CLIP's two directions ``(lse(a, b, s), lse(b, a, s))``, with
    forward-mode AD and torch.func support."""

    @staticmethod
    def forward(a, b, scale, backend):
        return lse_pair_op(a, b, scale, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, scale, backend = inputs
        ctx.backend = backend
        ctx.save_for_backward(a, b, scale, *output)
        ctx.save_for_forward(a, b, scale, *output)

    @staticmethod
    def backward(ctx, g_r, g_t):
        a, b, scale, r, t = ctx.saved_tensors
        paired = functools.partial(first_order, lse_backward_paired_op)
        pair = functools.partial(first_order, lse_pair_backward_op)
        return (*pair_backward(a, b, scale, r, t, g_r, g_t, ctx.backend, paired=paired, pair=pair), None)

    @staticmethod
    def jvp(ctx, da, db, dscale, _):
        a, b, scale, r, t = ctx.saved_tensors
        return (lse_tangent(a, b, scale, Exclusion.none(a.shape[0], a.device), r, da, db, dscale),
                lse_tangent(b, a, scale, Exclusion.none(b.shape[0], b.device), t, db, da, dscale))

    @staticmethod
    def vmap(info, in_dims, *args):
        return _loop_vmap(LsePairFunction, info, in_dims, *args)
