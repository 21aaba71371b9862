"""Drop-in replacement for open_clip's ``ClipLoss``.

    from open_clip.loss import ClipLoss                          # before
    from infonce_kernels.compat.open_clip import ClipLoss        # after

Same constructor and ``forward(image_features, text_features, logit_scale, logit_bias=None,
output_dict=False)``: ``(CE(s img txt^T, arange) + CE(s txt img^T, arange)) / 2`` with the
features used as given (open_clip's models normalise them; the loss does not) and ``logit_scale``
already exponentiated, which gets its gradient. A ``logit_bias`` adds the same constant to every
logit of a row and cancels in the cross-entropies, as in open_clip. No B x B logits are built.

``world_size > 1`` (distributed gathering) is not supported yet and raises ``ValueError``.
"""

import torch
from torch import nn

import infonce_kernels as ik

__all__ = ["ClipLoss"]


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
    world_size=1, use_horovod=False)``."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, backend="auto"):
        super().__init__()
        if world_size > 1 or use_horovod:
            raise ValueError("infonce_kernels.compat.open_clip.ClipLoss: distributed gathering "
                             f"(world_size={world_size}, use_horovod={use_horovod}) is not supported yet; "
                             "use world_size=1, or gather the features yourself and pass the global batch")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod, self.backend = rank, world_size, use_horovod, backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = ik.clip_loss(image_features, text_features, logit_scale, normalize=False, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
