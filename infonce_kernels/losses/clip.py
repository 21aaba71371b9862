"""The symmetric CLIP loss: both directions of ``lse(img, txt, s) - s<img_i, txt_i>``."""

from .. import _validation as v
from .. import distributed
from ..ops import accumulation_dtype, fused_lse_pair
from ._common import LossModule, l2_normalize, reduce_rows, row_dot, shared_doc

__all__ = ["clip_loss", "ClipLoss"]


@shared_doc
def clip_loss(image_features, text_features, logit_scale, *, normalize=True, reduction="mean",
              backend="auto", gather_distributed=False, group=None):
    """The symmetric CLIP loss: the mean of the image->text and text->image cross-entropies.

        d_i = s <img_i, txt_i>
        loss = 1/2 mean_i(lse_j(s <img_i, txt_j>) - d_i) + 1/2 mean_i(lse_j(s <txt_i, img_j>) - d_i)

    Args:
        image_features, text_features: (B, d) paired embeddings, same dtype and device.
        logit_scale: s > 0, the already exponentiated scale as open_clip passes it
            (``model.logit_scale.exp()``): a float or a one-element tensor, which gets its gradient.
        normalize: L2-normalise both sides first (a no-op on features that already are).
        reduction: "mean" | "sum", or "none" for the (B,) per-pair losses
            ``(loss_img_i + loss_txt_i) / 2``.
        backend: $backend
        gather_distributed: each rank's images meet the texts of every rank of ``group`` and
            its texts every rank's images, with the O(N)-traffic backward of
            :mod:`infonce_kernels.distributed` (the open_clip ``local_loss=False,
            gather_with_grad=True`` semantics, computed without gathering gradients).

    Returns:
        A 0-d tensor (or (B,)), float32 (float64 for float64 inputs), in nats.
    """
    v.check_features("image_features", image_features)
    v.check_features("text_features", text_features)
    v.check_same_kind("image_features", image_features, "text_features", text_features, same_rows=True)
    v.check_reduction(reduction)
    scale = v.positive_scalar("logit_scale", logit_scale, device=image_features.device,
                              dtype=accumulation_dtype(image_features.dtype))
    v.check_values({"image_features": image_features, "text_features": text_features},
                   positive={"logit_scale": scale})
    img, txt = image_features, text_features
    if normalize:
        img, txt = l2_normalize(img), l2_normalize(txt)
    diag = row_dot(img, txt) * scale
    if gather_distributed:
        where = distributed.rank_rows(img.shape[0], img.device, group)
        r, t = distributed.gathered_lse_pair(img, txt, scale, where, backend=backend)
    else:
        where = None
        r, t = fused_lse_pair(img, txt, scale, backend)
    return reduce_rows(0.5 * (r + t) - diag, reduction, where)


class ClipLoss(LossModule):
    """Module form of :func:`clip_loss`: ``ClipLoss()(image_features, text_features, logit_scale)``."""

    def __init__(self, *, normalize=True, reduction="mean", backend="auto", gather_distributed=False,
                 group=None):
        super().__init__(None, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, group=group)

    def forward(self, image_features, text_features, logit_scale):
        return clip_loss(image_features, text_features, logit_scale, **self.options())
