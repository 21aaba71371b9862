"""NT-Xent (SimCLR), InfoNCE and CLIP losses as thin compositions over the fused :func:`lse`.

Only O(N d) work happens here (normalisation, the positive logits); the O(N^2 d) part is the
fused op, so no N x N tensor exists in any of these losses. Losses are float32 (float64 for
float64 inputs) whatever the input precision, in nats.
"""

import torch
import torch.nn.functional as F

from . import _validation as v
from . import distributed
from .ops import _lse_dtype, fused_lse, fused_lse_pair

__all__ = ["nt_xent", "info_nce", "clip_loss", "NTXentLoss", "InfoNCELoss", "ClipLoss"]

def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, ``x / max(||x||, eps)``; the norm is taken in float32 (or
    float64).

    eps is 1e-12, except for float16 where it is float16's smallest normal number (6.1e-5): it
    stays non-zero in float16, and the gradient at a zero row, 1/eps times the upstream
    gradient, stays below float16's maximum (65504) instead of overflowing to inf.
    """
    eps = torch.finfo(torch.float16).tiny if x.dtype == torch.float16 else 1e-12
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.normalize(x.float(), dim=1, eps=eps).to(x.dtype)
    return F.normalize(x, dim=1, eps=eps)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(rows,) <a_i, b_i> accumulated in the lse dtype."""
    dtype = _lse_dtype(a.dtype)
    return (a.to(dtype) * b.to(dtype)).sum(1)


def _inverse_temperature(temperature, like: torch.Tensor) -> torch.Tensor:
    """0-d tensor 1/tau in the lse dtype; differentiable when ``temperature`` is a tensor."""
    tau = v.positive_scalar("temperature", temperature, device=like.device, dtype=_lse_dtype(like.dtype))
    return tau.reciprocal()


def check_views(name, z1, z2, reduction, gather_distributed=False):
    """z1, z2: two (B, d) views of one batch; B >= 2 unless the batch is gathered over ranks."""
    v.check_features("z1", z1)
    v.check_features("z2", z2)
    v.check_same_kind("z1", z1, "z2", z2, same_rows=True)
    if z1.shape[0] < 2 and not gather_distributed:
        raise ValueError(f"{name} needs a batch of at least 2 pairs (z1 has 1 row): with one pair an "
                         "anchor has no negative and the loss is constant")
    v.check_reduction(reduction)


def two_views(name, z1, z2, temperature, normalize, reduction, gather_distributed=False):
    """Checked ``(z, B, scale)``: z = cat[z1, z2] (2B, d), rows normalised when ``normalize``,
    scale = 1/temperature as a 0-d tensor of the lse dtype."""
    check_views(name, z1, z2, reduction, gather_distributed)
    scale = _inverse_temperature(temperature, z1)
    v.check_values({"z1": z1, "z2": z2}, positive={"temperature": scale})
    z = torch.cat([z1, z2])
    return (l2_normalize(z) if normalize else z), z1.shape[0], scale


def nt_xent(z1, z2, temperature=0.5, *, normalize=True, reduction="mean", backend="auto",
            gather_distributed=False, group=None):
    """NT-Xent, the SimCLR loss, over 2B anchors.

    With z = cat[z1, z2] (rows normalised when ``normalize``) and pos(i) the other view of row i,

        loss_i = -log( exp(<z_i, z_pos(i)>/tau) / sum_{j != i} exp(<z_i, z_j>/tau) ),

    i.e. each anchor's own row is excluded, its positive stays in the denominator and the
    negatives are the 2B - 2 other rows of both views.

    Args:
        z1, z2: (B, d) embeddings of two views of the same B samples, B >= 2; float16, bfloat16,
            float32 or float64 on one device.
        temperature: tau > 0, a float or a one-element tensor (learnable).
        normalize: L2-normalise the rows first (cosine similarity), as SimCLR does.
        reduction: "mean" | "sum" over the 2B anchors, or "none" for the (2B,) per-anchor losses
            ordered [anchors of z1; anchors of z2].
        backend: see :func:`infonce_kernels.lse`.
        gather_distributed: each rank's 2B rows are anchors against the rows of every rank of
            ``group`` (default: the world); see :mod:`infonce_kernels.distributed` for the loss
            convention under DistributedDataParallel and the O(N) gradient traffic.

    Returns:
        A 0-d tensor (or (2B,) for "none"), float32 (float64 for float64 inputs), in nats.
    """
    z, b, scale = two_views("nt_xent", z1, z2, temperature, normalize, reduction, gather_distributed)
    n = z.shape[0]
    self_index = torch.arange(n, device=z.device)[:, None]
    pos = _row_dot(z[:b], z[b:]) * scale
    if gather_distributed:
        where = distributed.rank_rows(n, z.device, group)
        r = distributed.gathered_lse(z, scale, *distributed.pair_exclusions(where, False), where, backend=backend)
        return distributed.scale_loss(r - torch.cat([pos, pos]), reduction, where)
    r = fused_lse(z, z, scale, self_index, True, backend)
    return v.reduce(r - torch.cat([pos, pos]), reduction)


def info_nce(query, positive_key, negative_keys=None, *, temperature=0.1, normalize=True,
             reduction="mean", backend="auto", gather_distributed=False, group=None):
    """InfoNCE with in-batch negatives, or with a shared bank of negatives.

    In-batch (``negative_keys=None``): key j != i is a negative for query i,

        loss_i = lse_j(<q_i, k_j>/tau) - <q_i, k_i>/tau.

    With a bank (e.g. a MoCo queue): only the bank's rows are negatives, and the bank gets no
    gradient (it is detached),

        loss_i = logaddexp(pos_i, lse_j(<q_i, n_j>/tau)) - pos_i,   pos_i = <q_i, k_i>/tau.

    Args:
        query: (M, d); positive_key: (M, d), row i is query i's positive.
        negative_keys: optional (K, d) bank shared by every query.
        temperature: tau > 0, a float or a one-element tensor (learnable).
        normalize: L2-normalise query, keys and bank rows first.
        reduction: "mean" | "sum" over the M queries, or "none" for (M,).
        backend: see :func:`infonce_kernels.lse`.
        gather_distributed: in-batch only: each rank's queries meet the keys of every rank of
            ``group``; the keys are gathered with a gather whose backward reduce-scatters their
            gradients (the general, asymmetric case of :mod:`infonce_kernels.distributed`).

    Returns:
        A 0-d tensor (or (M,)), float32 (float64 for float64 inputs), in nats.
    """
    v.check_features("query", query)
    if gather_distributed and negative_keys is not None:
        raise ValueError("gather_distributed=True applies to in-batch negatives; with negative_keys each rank "
                         "already holds the whole bank")
    v.check_features("positive_key", positive_key)
    v.check_same_kind("query", query, "positive_key", positive_key, same_rows=True)
    tensors = {"query": query, "positive_key": positive_key}
    if negative_keys is not None:
        v.check_features("negative_keys", negative_keys)
        v.check_same_kind("query", query, "negative_keys", negative_keys)
        tensors["negative_keys"] = negative_keys
    v.check_reduction(reduction)
    scale = _inverse_temperature(temperature, query)
    v.check_values(tensors, positive={"temperature": scale})
    if normalize:
        query, positive_key = l2_normalize(query), l2_normalize(positive_key)
    pos = _row_dot(query, positive_key) * scale
    no_exclusion = torch.empty(query.shape[0], 0, dtype=torch.int64, device=query.device)
    if negative_keys is None and gather_distributed:
        where = distributed.rank_rows(query.shape[0], query.device, group)
        keys = distributed.gather_rows_with_grad(positive_key, where)
        return distributed.scale_loss(fused_lse(query, keys, scale, no_exclusion, False, backend) - pos,
                                      reduction, where)
    if negative_keys is None:
        loss = fused_lse(query, positive_key, scale, no_exclusion, False, backend) - pos
    else:
        bank = negative_keys.detach()
        if normalize:
            bank = l2_normalize(bank)
        neg = fused_lse(query, bank, scale, no_exclusion, False, backend)
        loss = torch.logaddexp(pos, neg) - pos
    return v.reduce(loss, reduction)


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
        backend: see :func:`infonce_kernels.lse`.
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
                              dtype=_lse_dtype(image_features.dtype))
    v.check_values({"image_features": image_features, "text_features": text_features},
                   positive={"logit_scale": scale})
    img, txt = image_features, text_features
    if normalize:
        img, txt = l2_normalize(img), l2_normalize(txt)
    diag = _row_dot(img, txt) * scale
    if gather_distributed:
        where = distributed.rank_rows(img.shape[0], img.device, group)
        r, t = distributed.gathered_lse_pair(img, txt, scale, where, backend=backend)
        return distributed.scale_loss(0.5 * (r + t) - diag, reduction, where)
    r, t = fused_lse_pair(img, txt, scale, backend)
    return v.reduce(0.5 * (r + t) - diag, reduction)


class NTXentLoss(torch.nn.Module):
    """Module form of :func:`nt_xent`: ``loss = NTXentLoss(temperature=0.5)(z1, z2)``."""

    def __init__(self, temperature=0.5, *, normalize=True, reduction="mean", backend="auto",
                 gather_distributed=False, group=None):
        super().__init__()
        v.check_reduction(reduction)
        self.temperature, self.normalize, self.reduction, self.backend = temperature, normalize, reduction, backend
        self.gather_distributed, self.group = gather_distributed, group

    def forward(self, z1, z2):
        return nt_xent(z1, z2, self.temperature, normalize=self.normalize, reduction=self.reduction,
                       backend=self.backend, gather_distributed=self.gather_distributed, group=self.group)

    def extra_repr(self):
        return f"temperature={self.temperature}, normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}"


class InfoNCELoss(torch.nn.Module):
    """Module form of :func:`info_nce`: ``InfoNCELoss(temperature=0.1)(query, positive_key, negative_keys=None)``."""

    def __init__(self, temperature=0.1, *, normalize=True, reduction="mean", backend="auto",
                 gather_distributed=False, group=None):
        super().__init__()
        v.check_reduction(reduction)
        self.temperature, self.normalize, self.reduction, self.backend = temperature, normalize, reduction, backend
        self.gather_distributed, self.group = gather_distributed, group

    def forward(self, query, positive_key, negative_keys=None):
        return info_nce(query, positive_key, negative_keys, temperature=self.temperature,
                        normalize=self.normalize, reduction=self.reduction, backend=self.backend,
                        gather_distributed=self.gather_distributed, group=self.group)

    def extra_repr(self):
        return f"temperature={self.temperature}, normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}"


class ClipLoss(torch.nn.Module):
    """Module form of :func:`clip_loss`: ``ClipLoss()(image_features, text_features, logit_scale)``."""

    def __init__(self, *, normalize=True, reduction="mean", backend="auto", gather_distributed=False,
                 group=None):
        super().__init__()
        v.check_reduction(reduction)
        self.normalize, self.reduction, self.backend = normalize, reduction, backend
        self.gather_distributed, self.group = gather_distributed, group

    def forward(self, image_features, text_features, logit_scale):
        return clip_loss(image_features, text_features, logit_scale, normalize=self.normalize,
                         reduction=self.reduction, backend=self.backend,
                         gather_distributed=self.gather_distributed, group=self.group)

    def extra_repr(self):
        return f"normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}"
