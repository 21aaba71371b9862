"""CLIP: B image-text pairs, the symmetric cross-entropy over the B x B logits (logit scale 1/0.07)."""

import torch
import torch.nn.functional as F

import infonce_kernels as ik

from .base import Case, Inputs, Provider, materialised, randn

LOGIT_SCALE = 1 / 0.07


def make_inputs(rows, dim, dtype, device, requires_grad, generator):
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return Inputs((randn(generator, (rows, dim), dtype, device, requires_grad),
                   randn(generator, (rows, dim), dtype, device, requires_grad)),
                  {"scale": torch.tensor(LOGIT_SCALE, device=device, dtype=scale_dtype)})


def open_clip_loss(image, text, aux):
    """open_clip's ClipLoss (world size 1) as open_clip computes it: the B x B logits both ways,
    two cross-entropies against the diagonal, after normalising the features."""
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    scale = aux["scale"].to(image.dtype)
    logits_per_image = scale * image @ text.T
    logits_per_text = scale * text @ image.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _open_clip(aux):
    from open_clip.loss import ClipLoss

    loss = ClipLoss()
    return lambda i, t: loss(F.normalize(i, dim=1), F.normalize(t, dim=1), aux["scale"].to(i.dtype))


def _inf_cl(aux):
    """Inf-CL's cal_inf_loss in both directions (its signature changed: labels optional)."""
    import inspect

    from inf_cl import cal_inf_loss

    takes_labels = "labels" in inspect.signature(cal_inf_loss).parameters
    scale = aux["scale"]

    def one(q, k):
        labels = torch.arange(q.shape[0], device=q.device)
        kwargs = {"labels": labels} if takes_labels else {}
        return cal_inf_loss(q, k, scale=scale, **kwargs).mean()

    def loss(i, t):
        i, t = F.normalize(i, dim=1), F.normalize(t, dim=1)
        return (one(i, t) + one(t, i)) / 2

    return loss


CASE = Case(
    kind="clip",
    rows_label="B",
    settings="logit scale 1/0.07, B pairs",
    make_inputs=make_inputs,
    fused=lambda aux, backend: lambda i, t: ik.clip_loss(i, t, aux["scale"], backend=backend),
    baselines=(
        *materialised(open_clip_loss),
        Provider("open_clip", _open_clip, needs=("open_clip.loss",)),
        Provider("inf_cl", _inf_cl, needs=("inf_cl",), devices=("cuda",)),
    ),
)
