"""Drop-in replacement for open_clip's ``ClipLoss``.

    from open_clip.loss import ClipLoss                          # before
    from infonce_kernels.compat.open_clip import ClipLoss        # after

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

import torch
import torch.distributed as dist
from torch import nn

import infonce_kernels as ik
from infonce_kernels import distributed

from ._common import row_dot

__all__ = ["ClipLoss"]


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
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ClipLoss(world_size > 1) needs torch.distributed to be initialised "
                               "(torch.distributed.init_process_group, e.g. under torchrun)")
        if (self.rank, self.world_size) != (dist.get_rank(), dist.get_world_size()):
            raise ValueError(f"ClipLoss(rank={self.rank}, world_size={self.world_size}) does not match this process "
                             f"(rank {dist.get_rank()} of {dist.get_world_size()})")

    def _gather_without_grad(self, x):
        """(N, d) every rank's rows in rank order, gathered without gradient; this rank's own rows
        keep theirs unless ``local_loss`` (open_clip's ``gather_features``), and their offset."""
        where = distributed.rank_rows(x.shape[0], x.device)
        everyone = distributed.gather_rows(x.detach(), where)
        lo, hi = where.offset, where.offset + x.shape[0]
        if not self.local_loss:
            everyone = torch.cat([everyone[:lo], x, everyone[hi:]])
        return everyone, lo

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if logit_bias is not None and torch.as_tensor(logit_bias).numel() != 1:
            raise ValueError("logit_bias: only a scalar bias is supported (it cancels in the cross-entropies); "
                             f"got {tuple(torch.as_tensor(logit_bias).shape)}")
        if self.world_size > 1:
            self._check_group()
        if self.world_size == 1:
            loss = ik.clip_loss(image_features, text_features, logit_scale, normalize=False, backend=self.backend)
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
            loss = ik.clip_loss(image_features, text_features, logit_scale, normalize=False, backend=self.backend,
                                gather_distributed=True)
            if not self.local_loss:  # the whole batch's loss on every rank, same gradients
                loss = distributed.all_reduce_with_grad(loss) / self.world_size
        if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
            loss = loss + 0 * logit_bias.sum()  # open_clip's zero gradient for the cancelling bias
        return {"contrastive_loss": loss} if output_dict else loss
