"""What is benchmarked: loss kinds, their inputs, and the providers that compute them.

A provider is one implementation of one loss kind: each backend of infonce_kernels available on
the device (``ours:<backend>``) and, when importable, the peers (lightly, pytorch-metric-learning,
Inf-CL) and an open_clip-style materialising ``ClipLoss`` written out here (open_clip itself
needs torchvision). ``build(kind, provider, rows, dim, dtype, device)`` returns
``(inputs, fn)``: the leaf tensors (requiring grad) and ``fn(*inputs) -> scalar loss``.

Shapes: ``rows`` is the number of anchors of the similarity matrix, 2B for NT-Xent and SupCon
(two views of B samples), B (image-text pairs) for CLIP.
"""

import importlib.util

import torch
import torch.nn.functional as F

import infonce_kernels as ik

KINDS = ("nt_xent", "clip", "supcon")
TEMPERATURE = 0.5
LOGIT_SCALE = 1 / 0.07
SUPCON_CLASSES = 100  # labels of the supcon kind: rows // 2 samples in this many classes


def _has(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def open_clip_style_loss(image_features, text_features, logit_scale):
    """open_clip's ClipLoss (world_size 1), as open_clip computes it: B x B logits, two CEs."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _inf_cl_clip(img, txt, scale):
    """Inf-CL's cal_inf_loss in both directions (GPU only); returns the symmetric CLIP loss."""
    import inspect

    from inf_cl import cal_inf_loss

    params = inspect.signature(cal_inf_loss).parameters
    labels = torch.arange(img.shape[0], device=img.device)

    def one(q, k):
        if "labels" in params:
            out = cal_inf_loss(q, k, labels=labels, scale=scale)
        else:
            out = cal_inf_loss(q, k, scale=scale)
        return out.mean()

    return 0.5 * (one(img, txt) + one(txt, img))


def providers(kind, device):
    """Names of the providers of ``kind`` that can run on ``device``."""
    device = torch.device(device)
    names = [f"ours:{b}" for b in ik.available_backends(device)]
    if kind == "supcon" and not _has_supcon():
        names = []
    if kind == "nt_xent":
        if _has("lightly"):
            names.append("lightly")
        if _has("pytorch_metric_learning"):
            names.append("pml")
    elif kind == "clip":
        names.append("open_clip_style")
        if device.type == "cuda" and _has("inf_cl"):
            names.append("inf_cl")
    elif kind == "supcon" and _has("pytorch_metric_learning"):
        names.append("pml")
    return names


def _has_supcon():
    return hasattr(ik, "supcon") or _has("infonce_kernels.supcon")


def _supcon_fn():
    if hasattr(ik, "supcon"):
        return ik.supcon
    from infonce_kernels.supcon import supcon

    return supcon


def build(kind, provider, rows, dim, dtype, device, requires_grad=True):
    """(inputs, fn) for one case; see the module docstring."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def leaf(*shape):
        x = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    backend = provider.split(":", 1)[1] if provider.startswith("ours:") else None
    if kind == "nt_xent":
        b = rows // 2
        inputs = (leaf(b, dim), leaf(b, dim))
        if backend:
            return inputs, lambda z1, z2: ik.nt_xent(z1, z2, TEMPERATURE, backend=backend)
        if provider == "lightly":
            from lightly.loss import NTXentLoss

            loss = NTXentLoss(temperature=TEMPERATURE)
            return inputs, loss
        if provider == "pml":
            from pytorch_metric_learning.losses import NTXentLoss, SelfSupervisedLoss

            loss = SelfSupervisedLoss(NTXentLoss(temperature=TEMPERATURE))
            return inputs, loss
    elif kind == "clip":
        inputs = (leaf(rows, dim), leaf(rows, dim))
        scale = torch.tensor(LOGIT_SCALE, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
        if backend:
            return inputs, lambda i, t: ik.clip_loss(i, t, scale, backend=backend)
        if provider == "open_clip_style":
            return inputs, lambda i, t: open_clip_style_loss(F.normalize(i, dim=1), F.normalize(t, dim=1),
                                                             scale.to(i.dtype))
        if provider == "inf_cl":
            return inputs, lambda i, t: _inf_cl_clip(F.normalize(i, dim=1), F.normalize(t, dim=1), scale)
    elif kind == "supcon":
        b = rows // 2
        labels = torch.randint(0, SUPCON_CLASSES, (b,), generator=g).to(device)
        inputs = (leaf(b, 2, dim),)
        if backend:
            supcon = _supcon_fn()
            return inputs, lambda f: supcon(f, labels, TEMPERATURE, backend=backend)
        if provider == "pml":
            from pytorch_metric_learning.losses import SupConLoss

            loss = SupConLoss(temperature=TEMPERATURE)
            both = torch.cat([labels, labels])
            return inputs, lambda f: loss(torch.cat([f[:, 0], f[:, 1]]), both)
    raise ValueError(f"unknown provider {provider!r} for kind {kind!r}")
