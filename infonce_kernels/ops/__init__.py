"""The fused row log-sum-exp op: the public function, the entry points the losses call, the
backend registry.

    lse(q, k, s)_i = log sum_{j not excluded for i} exp(s <q_i, k_j>)

Layout:
    exclusion.py    :class:`Exclusion`, which pairs a row leaves out ("is (i, j) excluded")
    backends.py     the backend registry (``REGISTRY``, ``BACKENDS``, ``resolve_backend``) and
                    the contract every backend implements
    _custom_ops.py  the ``torch.library`` custom ops and their autograd
    _cpp.py         the C++ backends (cpu, cuda)
    transforms.py   forward-mode AD, torch.func transforms, the refusal of second-order derivatives
    precision.py    :func:`accumulation_dtype`
    pairwise_sigmoid.py  the pairwise sigmoid (SigLIP) op: :func:`sigmoid`, its custom ops and autograd

Entry points (arguments are checked once, by :func:`lse` or by the loss that calls them):
    :func:`lse`                the public, checked op
    :func:`fused_lse`          ``lse`` for a checked (q, k, scale) and an :class:`Exclusion`
    :func:`fused_lse_pair`     CLIP's two directions, with a one-pass-per-side backward
    :func:`lse_backward_paired` the gradient on q when the keys are rows of a log-sum-exp too
                               (the distributed losses' backward)
    :func:`sigmoid`            the pairwise sigmoid op, public and checked; :func:`fused_sigmoid`,
                               :func:`sigmoid_with_grad` and :func:`sigmoid_backward` on checked arguments
"""

import torch

from .. import _validation as v
from ._custom_ops import lse_backward_paired_op, lse_counted_op, lse_op, lse_pair_op
from .backends import BACKENDS, REGISTRY, available_backends, resolve_backend, unavailable_reason
from .exclusion import Exclusion, self_indices
from .precision import accumulation_dtype
from .pairwise_sigmoid import fused_sigmoid, resolve_sigmoid_backend, sigmoid, sigmoid_backward, sigmoid_with_grad
from .transforms import LseFunction, LsePairFunction

__all__ = [
    "lse", "fused_lse", "fused_lse_pair", "lse_backward_paired", "paired_backward",
    "Exclusion", "self_indices", "accumulation_dtype",
    "sigmoid", "fused_sigmoid", "sigmoid_with_grad", "sigmoid_backward", "resolve_sigmoid_backend",
    "BACKENDS", "REGISTRY", "available_backends", "resolve_backend", "unavailable_reason",
]


def lse(q, k, scale, *, exclude=None, symmetric=False, row_labels=None, key_labels=None, positive=None,
        threshold=None, backend="auto"):
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
            tensor, -1 = none; requires labels or ``threshold``), which stays in the denominator.
        threshold: optional (M,) float tensor in logit units (false-negative filtering): row i
            also drops every key j with ``scale * <q_i, k_j> > threshold[i]``, except
            ``positive[i]`` (required with it); +inf drops nothing; not differentiated.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (see :mod:`infonce_kernels.ops.backends`).
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
    scale_t = v.positive_scalar("scale", scale, device=q.device, dtype=accumulation_dtype(q.dtype))
    ex = v.exclude_tensor(exclude, q.shape[0], k.shape[0], q.device)
    if symmetric and key_labels is None:
        key_labels = row_labels
    labelled = row_labels is not None or key_labels is not None
    labels = v.label_tensors(row_labels, key_labels, positive if labelled else None, q.shape[0], k.shape[0],
                             q.device)
    threshold, positive = v.threshold_tensors(threshold, positive, labels, q.shape[0], q.device, scale_t.dtype)
    tensors = {"q": q} if symmetric else {"q": q, "k": k}
    v.check_values(tensors, positive={"scale": scale_t}, exclude=ex, keys=k.shape[0], labels=labels,
                   threshold=threshold, threshold_positive=positive)
    spec = Exclusion(ex, *(labels or (None, None, positive)), symmetric=bool(symmetric), threshold=threshold)
    return fused_lse(q, k, scale_t, spec, backend)


def fused_lse(q, k, scale, spec: Exclusion, backend="auto", *, return_dropped=False):
    """:func:`lse` on arguments already checked by the caller: q (M, d), k (N, d) (ignored, q
    used, when ``spec.symmetric``), ``scale`` a 0-d tensor of the accumulation dtype, ``spec``
    the pairs to leave out. The losses call this after their own checks. Returns (M,); with
    ``return_dropped`` the pair (lse (M,), dropped (M,) int32): per row, how many keys the
    threshold rule dropped among those the exclusion list and the label rule keep (zeros
    without a threshold), counted in the same forward sweep."""
    name = resolve_backend(backend, q.device)
    exclude, row_labels, key_labels, positive, _ = spec.tensors()
    args = (q, q if spec.symmetric else k, scale, exclude, row_labels, key_labels, positive, spec.symmetric, name,
            spec.threshold)
    if torch.compiler.is_compiling():  # see ops/transforms.py
        return (lse_counted_op if return_dropped else lse_op)(*args)
    return LseFunction.apply(*args, bool(return_dropped))


def fused_lse_pair(a, b, scale, backend="auto"):
    """Both directions of a paired batch, e.g. CLIP's: ``(lse(a, b, s), lse(b, a, s))`` for
    checked (n, d) rows a, b and a 0-d ``scale``; the backward produces each side's gradient in
    one pass (the paired backward) instead of two general backward calls. A backend with
    ``forward_pair`` (triton) computes both directions from one sweep over the score tiles;
    the others run two row passes."""
    op = lse_pair_op if torch.compiler.is_compiling() else LsePairFunction.apply  # see ops/transforms.py
    return op(a, b, scale, resolve_backend(backend, a.device))


def lse_backward_paired(grad, q, k, scale, spec: Exclusion, lse, key_grad, key_lse, key_spec: Exclusion,
                        row_offset: int, backend="auto"):
    """Gradient on q when the keys are rows of a log-sum-exp too (no autograd; see
    ``_lse_bwd_paired`` in csrc/): ``dq_i = s sum_j (W_ij + V_ji) k_j``; returns (dq, dscale of
    the row side).

    q (M, d), k (N, d); ``grad``/``lse`` (M,) belong to the rows of q, ``key_grad``/``key_lse``
    (N,) to the keys as rows; ``spec`` numbers keys like k; ``key_spec`` (from
    ``spec.keys_as_rows``) numbers the rows of q from ``row_offset``. Each side's threshold rule
    (``spec.threshold`` (M,), ``key_spec.threshold`` (N,)) drops that side's pairs. The
    distributed losses use it for a rank's rows against the all-gathered rows.
    """
    keys = k.shape[0]
    if key_grad.shape != (keys,) or key_lse.shape != (keys,):
        raise ValueError(f"key_grad and key_lse must have shape ({keys},), one entry per key")
    ke = key_spec.exclude
    if ke.dtype != torch.int64 or ke.dim() != 2 or ke.shape[0] != keys or ke.shape[1] > 2:
        raise ValueError(f"key_exclude must be int64 of shape ({keys}, E) with E <= 2, got {ke.dtype} "
                         f"{tuple(ke.shape)}")
    if (spec.labels or key_spec.threshold is not None) and (key_spec.positive is None
                                                             or key_spec.positive.shape != (keys,)):
        raise ValueError(f"key_positive must have shape ({keys},) with the label rule or a key threshold")
    if key_spec.threshold is not None and key_spec.threshold.shape != (keys,):
        raise ValueError(f"key_threshold must have shape ({keys},), one entry per key, got "
                         f"{tuple(key_spec.threshold.shape)}")
    if int(row_offset) < 0:
        raise ValueError(f"row_offset must be >= 0, got {row_offset}")
    name = resolve_backend(backend, q.device)
    key_positive = key_spec.positive if key_spec.positive is not None else ke.new_empty(0)
    exclude, row_labels, key_labels, positive, _ = spec.tensors()
    return lse_backward_paired_op(grad, q, k, scale, exclude, row_labels, key_labels, positive, lse, key_grad,
                                  key_lse, key_spec.exclude, key_positive, int(row_offset), name, spec.threshold,
                                  key_spec.threshold)


def paired_backward(grad, q, k, scale, exclude, labels, lse, key_grad, key_lse, key_exclude, key_positive,
                    row_offset, backend="auto", *, threshold=None, positive=None, key_threshold=None):
    """:func:`lse_backward_paired` with the exclusions as tensors: ``exclude`` (M, E), ``labels``
    None or (row_labels, key_labels, positive), ``key_exclude`` (N, E') and ``key_positive`` (N,)
    (empty without labels and key threshold) numbering the rows of q from ``row_offset``;
    ``threshold`` (M,) / ``key_threshold`` (N,) each side's threshold rule (``positive`` (M,)
    is the rows' positive when there are no labels)."""
    if labels is None and positive is not None:
        spec = Exclusion(exclude, positive=positive, threshold=threshold)
    else:
        spec = Exclusion(exclude, *(labels or ()), threshold=threshold)
    return lse_backward_paired(grad, q, k, scale, spec, lse, key_grad, key_lse,
                               spec.keys_as_rows(key_exclude, key_positive, key_threshold), row_offset, backend)
