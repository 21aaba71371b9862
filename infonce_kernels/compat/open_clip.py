"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``.

    from open_clip.loss import ClipLoss, SigLipLoss                          # before
    from infonce_kernels.compat.open_clip import ClipLoss, SigLipLoss        # after

``SigLipLoss`` is described in its class docstring; the rest of this note is ``ClipLoss``'s.

Same constructor and ``forward(image_features, text_features, logit_scale, logit_bias=None,
output_dict=False)``: ``(CE(s img txt^T, arange) + CE(s txt img^T, arange)) / 2`` with the
features used as given (open_clip's models normalise them; the loss does not) and ``logit_scale``
already exponentiated, which gets its gradient. A scalar ``logit_bias`` adds the same constant to
every logit and cancels in the cross-entropies, as in open_clip: its gradient is zero (a
parameter still takes part in the graph, as DistributedDataParallel expects); a bias of more
than one element is rejected. No B x B logits are built.

With ``world_size > 1`` (torch.distributed initialised; ``rank`` and ``world_size`` must be this
process's) the loss runs over every rank's features, with open_clip's values and gradients:

- ``gather_with_grad=True``: through :mod:`infonce_kernels.distributed` (O(N) gradient traffic).
  ``local_loss=True`` returns the local loss (this rank's rows against all ranks'),
  ``local_loss=False`` the loss of the whole batch on every rank.
- ``gather_with_grad=False`` (open_clip's default): the other ranks' features are gathered without
  gradient. ``local_loss=False``: every rank computes the whole batch's loss (B·world rows, as
  open_clip) with gradients through its own features only, the exact gradient of that loss with
  respect to them, which DistributedDataParallel's average then divides by the world size.
  ``local_loss=True``: the local loss, with gradients through this rank's rows only (open_clip
  splices its own features into the gathered ones only when ``local_loss=False``).

Horovod is not supported.
"""

import math

import torch
import torch.distributed as dist
from torch import nn

import infonce_kernels as ik
from infonce_kernels import distributed

from ._common import acc, autocast_off, row_dot

__all__ = ["ClipLoss", "SigLipLoss"]


def _check_group(loss: nn.Module):
    """``loss.rank`` and ``loss.world_size`` (> 1) must be this process's in an initialised group."""
    name = type(loss).__name__
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name}(world_size > 1) needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    if (loss.rank, loss.world_size) != (dist.get_rank(), dist.get_world_size()):
        raise ValueError(f"{name}(rank={loss.rank}, world_size={loss.world_size}) does not match this process "
                         f"(rank {dist.get_rank()} of {dist.get_world_size()})")


class _MeanGradOverRanks(torch.autograd.Function):
    """Identity whose backward averages the gradient over the ranks: every rank then holds the
    gradient of the whole batch's loss, as open_clip's ``local_loss=False`` gives each rank."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / dist.get_world_size()


def _any_sign_clip_loss(img, txt, logit_scale, backend):
    """open_clip's loss for a ``logit_scale`` of any sign (open_clip computes a finite loss for
    s <= 0 too): s <img_i, txt_j> = |s| <-img_i, txt_j>, so s < 0 is the positive scale on the
    negated images; at s = 0 every logit is 0 and the loss is log B + s (<mean img, mean txt> -
    mean_i <img_i, txt_i>), which carries open_clip's gradient for s (zero for the features)."""
    s = torch.as_tensor(logit_scale)
    if bool((s > 0).all()):
        return ik.clip_loss(img, txt, logit_scale, normalize=False, backend=backend)
    if bool((s < 0).all()):
        return ik.clip_loss(-img, txt, -logit_scale, normalize=False, backend=backend)
    a, t = acc(img), acc(txt)
    slope = (a.mean(0) * t.mean(0)).sum() - row_dot(img, txt).mean()
    return math.log(img.shape[0]) + acc(s).reshape(()) * slope


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
    world_size=1, use_horovod=False)``."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, backend="auto"):
        super().__init__()
        if use_horovod:
            raise ValueError("infonce_kernels.compat.open_clip.ClipLoss: use_horovod=True is not supported; "
                             "use torch.distributed")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod, self.backend = rank, world_size, use_horovod, backend

    def _check_group(self):
        _check_group(self)

    def _gather_without_grad(self, x):
        """(N, d) every rank's rows in rank order, gathered without gradient; this rank's own rows
        keep theirs unless ``local_loss`` (open_clip's ``gather_features``), and their offset."""
        where = distributed.rank_rows(x.shape[0], x.device)
        everyone = distributed.gather_rows(x.detach(), where)
        lo, hi = where.offset, where.offset + x.shape[0]
        if not self.local_loss:
            everyone = torch.cat([everyone[:lo], x, everyone[hi:]])
        return everyone, lo

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """open_clip's labels: ``arange(num_logits)``, offset by ``num_logits * rank`` for the
        local loss over several processes."""
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's ``(logits_per_image, logits_per_text)``: this materialises the logits, as
        open_clip returns them (for logging or retrieval accuracy); the loss never does. Over
        several processes, this rank's rows against every rank's (``local_loss``) or the whole
        batch's logits, gathered without gradient from the other ranks."""
        img, txt = image_features, text_features
        if self.world_size > 1:
            self._check_group()
            all_img, _ = self._gather_without_grad(img)
            all_txt, _ = self._gather_without_grad(txt)
            if not self.local_loss:
                img, txt = all_img, all_txt
        else:
            all_img, all_txt = img, txt
        logits_per_image = logit_scale * img @ all_txt.T
        logits_per_text = logit_scale * txt @ all_img.T
        if logit_bias is not None:
            logits_per_image, logits_per_text = logits_per_image + logit_bias, logits_per_text + logit_bias
        return logits_per_image, logits_per_text

    @autocast_off
    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if logit_bias is not None and torch.as_tensor(logit_bias).numel() != 1:
            raise ValueError("logit_bias: only a scalar bias is supported (it cancels in the cross-entropies); "
                             f"got {tuple(torch.as_tensor(logit_bias).shape)}")
        if self.world_size > 1:
            self._check_group()
        if self.world_size == 1:
            loss = _any_sign_clip_loss(image_features, text_features, logit_scale, self.backend)
        elif not self.gather_with_grad:
            all_img, lo = self._gather_without_grad(image_features)
            all_txt, _ = self._gather_without_grad(text_features)
            if self.local_loss:  # this rank's rows against every rank's, labels offset by the rank
                n = image_features.shape[0]
                r = ik.lse(image_features, all_txt, logit_scale, backend=self.backend)
                t = ik.lse(text_features, all_img, logit_scale, backend=self.backend)
                pos_i = logit_scale * row_dot(image_features, all_txt[lo: lo + n])
                pos_t = logit_scale * row_dot(text_features, all_img[lo: lo + n])
                loss = ((r - pos_i).mean() + (t - pos_t).mean()) / 2
            else:
                loss = ik.clip_loss(all_img, all_txt, logit_scale, normalize=False, backend=self.backend)
        else:
            # (world / N) * sum over this rank's pairs: open_clip's local loss for equal batches.
            if not self.local_loss and isinstance(logit_scale, torch.Tensor) and logit_scale.requires_grad:
                # this rank's pairs give their part of d loss / d scale; open_clip's rank computes
                # the whole batch's loss, so each rank gets the gradient of all pairs
                logit_scale = _MeanGradOverRanks.apply(logit_scale)
            loss = ik.clip_loss(image_features, text_features, logit_scale, normalize=False, backend=self.backend,
                                gather_distributed=True)
            if not self.local_loss:  # the whole batch's loss on every rank, same gradients
                loss = distributed.all_reduce_with_grad(loss) / self.world_size
        if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
            loss = loss + 0 * logit_bias.sum()  # open_clip's zero gradient for the cancelling bias
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None)`` (open_clip
    3.3): ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)``
    returns ``-sum_ij log sigmoid(z_ij (t <img_i, txt_j> + b)) / B`` (z = +1 on the diagonal, -1
    elsewhere) through :func:`infonce_kernels.siglip_loss`, with no B x B logits; the features are
    used as given, ``logit_scale`` is already exponentiated, ``logit_bias`` may be None.

    With ``world_size > 1`` (torch.distributed initialised; ``rank`` and ``world_size`` must be
    this process's) every rank's loss is its images against the texts of every rank, divided by
    its own batch size, and its gradients (features, scale, bias) are open_clip's on that rank, for
    each ``dist_impl`` ("bidir", "shift", "reduce", "gather": open_clip's neighbour exchanges give
    one and the same loss). Here the features are all-gathered once and the backward exchanges
    nothing (:func:`infonce_kernels.siglip_loss` with ``gather_distributed=True``); open_clip's
    exchanges need equal batches on every rank, this one also runs with uneven batches (the
    whole batch's loss convention of :mod:`infonce_kernels.distributed`).
    """

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, *, backend="auto"):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be one of 'bidir', 'shift', 'reduce', 'gather' (or None), got "
                             f"{dist_impl!r}")
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.backend = backend
        self.prev_num_logits, self.labels = 0, {}  # open_clip's (unused) label cache state

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        """open_clip's (num_logits, num_logits) labels, +1 on the diagonal (-1 everywhere with
        ``negative_only``) and -1 elsewhere; materialised, as open_clip returns them (the loss
        never builds them)."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's ``logit_scale * img @ txt.T (+ logit_bias)``, materialised (for logging or
        retrieval accuracy); the loss never builds it."""
        logits = logit_scale * image_features @ text_features.T
        return logits if logit_bias is None else logits + logit_bias

    @autocast_off
    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        gathered = self.world_size > 1
        if gathered:
            _check_group(self)
        loss = ik.siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                              gather_distributed=gathered)
        return {"contrastive_loss": loss} if output_dict else loss
