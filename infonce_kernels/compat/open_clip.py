"""Drop-in replacement for open_clip's ``ClipLoss``.

    from open_clip.loss import ClipLoss                          # before
    from infonce_kernels.compat.open_clip import ClipLoss        # after

Same constructor and ``forward(image_features, text_features, logit_scale, logit_bias=None,
output_dict=False)``: ``(CE(s img txt^T, arange) + CE(s txt img^T, arange)) / 2`` with the
features used as given (open_clip's models normalise them; the loss does not) and ``logit_scale``
already exponentiated, which gets its gradient. A ``logit_bias`` adds the same constant to every
logit of a row and cancels in the cross-entropies, as in open_clip. No B x B logits are built.

With ``world_size > 1`` (torch.distributed initialised) and ``gather_with_grad=True`` the loss
runs over every rank's features through :mod:`infonce_kernels.distributed` (O(N) gradient
traffic): ``local_loss=True`` returns open_clip's local loss (this rank's rows against all ranks'),
``local_loss=False`` the loss of the whole batch on every rank; both with open_clip's gradients.
``gather_with_grad=False`` is rejected: gathering without gradients drops the terms in which this
rank's features are other ranks' negatives, so open_clip's gradient there is not the batch's.
Horovod is not supported.
"""

from torch import nn

import infonce_kernels as ik
from infonce_kernels import distributed

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
        if world_size > 1 and not gather_with_grad:
            raise ValueError("infonce_kernels.compat.open_clip.ClipLoss: world_size > 1 needs gather_with_grad=True "
                             "(gathering without gradients loses the terms in which this rank's features are "
                             "other ranks' negatives, so the gradient is not the batch's)")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod, self.backend = rank, world_size, use_horovod, backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size == 1:
            loss = ik.clip_loss(image_features, text_features, logit_scale, normalize=False, backend=self.backend)
        else:
            # (world / N) * sum over this rank's pairs: open_clip's local loss for equal batches.
            loss = ik.clip_loss(image_features, text_features, logit_scale, normalize=False, backend=self.backend,
                                gather_distributed=True)
            if not self.local_loss:  # the whole batch's loss on every rank, same gradients
                loss = distributed.all_reduce_with_grad(loss) / self.world_size
        return {"contrastive_loss": loss} if output_dict else loss
