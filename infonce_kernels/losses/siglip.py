"""The pairwise sigmoid loss of SigLIP: every image-text pair is a binary classification.

    l_ij = t <img_i, txt_j> + b,   z_ij = +1 for a positive pair, -1 otherwise
    loss = -(1/B) sum_i sum_j log sigmoid(z_ij l_ij)

One fused op computes it (:func:`infonce_kernels.ops.fused_sigmoid`), with no B x B tensor.
Over several processes each rank gathers the features once and computes the complete gradient of
its own rows on both sides, so the backward exchanges nothing (:class:`_GatheredSigmoid`).
"""

import torch

from .. import _validation as v
from .. import distributed
from ..ops import accumulation_dtype, fused_sigmoid, sigmoid_backward, sigmoid_with_grad
from ..ops.pairwise_sigmoid import backward_run, scaled_gradients, finite_scalar, resolve_sigmoid_backend
from ._common import LossModule, shared_doc

__all__ = ["siglip_loss", "SigLipLoss"]


def _check(image_features, text_features, logit_scale, logit_bias, labels, reduction):
    """Checked (scale, bias, labels): 0-d tensors of the accumulation dtype, labels None or (B,) int64."""
    v.check_features("image_features", image_features)
    v.check_features("text_features", text_features)
    v.check_same_kind("image_features", image_features, "text_features", text_features)
    rows = image_features.shape[0]
    if text_features.shape[0] != rows:
        rule = "one label per pair" if labels is not None else "the default diagonal positives (pair i is (image i, text i))"
        raise ValueError(f"image_features and text_features must have the same number of rows for {rule}, "
                         f"got {rows} and {text_features.shape[0]}")
    v.check_reduction(reduction)
    device, acc = image_features.device, accumulation_dtype(image_features.dtype)
    scale = finite_scalar("logit_scale", logit_scale, device=device, dtype=acc)
    bias = (torch.zeros((), device=device, dtype=acc) if logit_bias is None else
            finite_scalar("logit_bias", logit_bias, device=device, dtype=acc))
    if labels is not None:
        labels = v._int_vector("labels", labels, rows, "image-text pair", device)
    v.check_values({"image_features": image_features, "text_features": text_features, "logit_scale": scale,
                    "logit_bias": bias})
    return scale, bias, labels


@shared_doc
def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, labels=None, reduction="mean",
                backend="auto", gather_distributed=False, group=None):
    """The sigmoid loss of SigLIP (Zhai et al., 2023), fused: no B x B logits exist.

        l_ij = logit_scale <img_i, txt_j> + logit_bias
        loss_i = -sum_j log sigmoid(z_ij l_ij),  z_ij = +1 if (i, j) is a positive pair else -1

    Args:
        image_features, text_features: (B, d) paired embeddings, same dtype (float16, bfloat16,
            float32; float64 on CPU) and device, used as given (SigLIP models L2-normalise them).
        logit_scale: t, already exponentiated (``model.logit_scale.exp()``), a float or a
            one-element tensor, which gets its gradient. Any finite value.
        logit_bias: b (``model.logit_bias``), a float, a one-element tensor (gets its gradient) or
            None (no bias).
        labels: optional (B,) integer labels, one per pair: every pair (i, j) with equal labels is
            positive (several positives per row). Default: the diagonal, (image i, text i).
        reduction: "mean" (``sum_i loss_i / B``, SigLIP's and open_clip's normalisation), "sum",
            or "none" for the (B,) per-image losses.
        backend: $backend
        gather_distributed: each rank's images meet the texts of every rank of ``group`` (default:
            the world) and its texts every rank's images. The features are all-gathered once in
            the forward and the backward exchanges nothing: each rank computes the complete
            gradient of its own rows on both sides. Loss convention of
            :mod:`infonce_kernels.distributed`: "mean" returns ``world / B_global * sum_{local i}
            loss_i``, so the mean over ranks is the whole batch's loss and DDP-averaged gradients
            (logit_scale and logit_bias included) equal the single-process ones. For "mean" and
            "sum" every rank must back-propagate the same upstream gradient into its loss
            (``loss.backward()``, or a loss scaled by a factor common to all ranks, as
            GradScaler does); "none" all-gathers the (B,) upstream gradients instead.

    Returns:
        $returns
    """
    scale, bias, labels = _check(image_features, text_features, logit_scale, logit_bias, labels, reduction)
    img, txt = image_features, text_features
    if gather_distributed:
        where = distributed.rank_rows(img.shape[0], img.device, group)
        return _gathered_siglip(img, txt, scale, bias, labels, reduction, where, backend)
    pair_labels = None if labels is None else (labels, labels)
    if reduction == "none":
        return fused_sigmoid(img, txt, scale, bias, pair_labels, 0, backend)
    total = fused_sigmoid(img, txt, scale, bias, pair_labels, 0, backend, total=True)
    return total / img.shape[0] if reduction == "mean" else total


class _GatheredSigmoid(torch.autograd.Function):
    """This rank's images against every rank's texts, and every rank's images against its texts,
    over features all-gathered once.

    Forward: ``rows_i`` for this rank's images i against all texts (offset = this rank's first
    row in the gathered batch). With ``total`` (reductions "mean"/"sum") the output is their
    0-d sum and the fused sweeps produce the gradients in the forward: this rank's images against
    all texts give dx and the (t, b) share of the pairs in this rank's rows; this rank's texts
    against all images (the same logits transposed, same offset) give dy. The backward scales
    them by the upstream scalar, the same on every rank: no communication. Without ``total``
    the backward all-gathers the (B,) upstream gradients and recomputes (general backward).
    """

    @staticmethod
    def forward(ctx, x, y, scale, bias, labels, where, total, backend):
        all_x, all_y = distributed.gather_rows(x, where), distributed.gather_rows(y, where)
        start = where.offset
        every = None if labels is None else distributed.gather_rows(labels, where)
        pairs = None if labels is None else (labels, every)  # (this rank's labels, every rank's)
        ctx.where, ctx.total, ctx.backend, ctx.start = where, total, backend, start
        if not total:
            ctx.save_for_backward(x, y, all_x, all_y, scale, bias, *(pairs or ()))
            return fused_sigmoid(x, all_y, scale, bias, pairs, start, backend)
        if not any(ctx.needs_input_grad[:4]):
            return fused_sigmoid(x, all_y, scale, bias, pairs, start, backend).sum()
        rows, dx, _, dscale, dbias = sigmoid_with_grad(x, all_y, scale, bias, pairs, start, backend)
        _, dy, _, _, _ = sigmoid_with_grad(y, all_x, scale, bias, pairs, start, backend)
        ctx.save_for_backward(dx, dy, dscale, dbias, x, y, scale, bias)
        return rows.sum()

    @staticmethod
    def backward(ctx, g):
        # Through backward_run: a gradient taken with create_graph=True raises when differentiated again.
        if ctx.total:
            return (*backward_run(scaled_gradients, g, *ctx.saved_tensors), None, None, None, None)
        x, y, all_x, all_y, scale, bias, *labels = ctx.saved_tensors
        own, every = labels if labels else (None, None)
        all_g = distributed.gather_rows(g.contiguous(), ctx.where)
        start = ctx.start

        def gradients(*inputs):
            # this rank's images against all texts: dx and the (t, b) share of this rank's rows
            dx, _, dscale, dbias = sigmoid_backward(g, x, all_y, scale, bias, None if own is None else (own, every),
                                                    start, ctx.backend)
            # every image (with its rank's upstream gradient) against this rank's texts: dy
            _, dy, _, _ = sigmoid_backward(all_g, all_x, y, scale, bias, None if own is None else (every, own),
                                           -start, ctx.backend)
            return dx, dy, dscale, dbias

        return (*backward_run(gradients, x, y, scale, bias), None, None, None, None)


def _gathered_siglip(img, txt, scale, bias, labels, reduction, where, backend):
    """The loss of this rank's rows against every rank's, under the convention of
    :mod:`infonce_kernels.distributed`."""
    distributed._ordinary_autograd(img, txt, scale, bias)
    name = resolve_sigmoid_backend(backend, img.device)
    out = _GatheredSigmoid.apply(img, txt, scale, bias, labels, where, reduction != "none", name)
    if reduction == "mean":
        return out * (where.world / where.total)
    if reduction == "sum":
        return out * where.world
    return out


class SigLipLoss(LossModule):
    """Module form of :func:`siglip_loss`:
    ``SigLipLoss()(image_features, text_features, logit_scale, logit_bias, labels=None)``."""

    def __init__(self, *, reduction="mean", backend="auto", gather_distributed=False, group=None):
        super().__init__(None, normalize=False, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, group=group)

    def forward(self, image_features, text_features, logit_scale, logit_bias, labels=None):
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, labels=labels,
                           reduction=self.reduction, backend=self.backend,
                           gather_distributed=self.gather_distributed, group=self.group)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, backend={self.backend!r}"
