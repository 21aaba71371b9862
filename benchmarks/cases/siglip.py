"""SigLIP: B image-text pairs, the pairwise sigmoid loss over the B x B logits (SigLIP's
initialisation t = 10, b = -10), on L2-normalised features; t and b are differentiated too.

    l_ij = t <img_i, txt_j> + b,   loss = -(1/B) sum_ij log sigmoid(z_ij l_ij),  z = 2I - 1
"""

import functools
import importlib
import importlib.util
import os

import torch
import torch.nn.functional as F

import infonce_kernels as ik

from .base import Case, Inputs, Provider, materialised, randn

LOGIT_SCALE, LOGIT_BIAS = 10.0, -10.0


def make_inputs(rows, dim, dtype, device, requires_grad, generator):
    """Leaves (image (B, d), text (B, d), logit_scale (), logit_bias ()): unit-norm feature rows,
    as a SigLIP model hands them to its loss; t and b in the accumulation dtype."""
    def features():
        x = randn(generator, (rows, dim), dtype, device, False)
        return F.normalize(x.float(), dim=1).to(dtype).requires_grad_(requires_grad)

    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def scalar(value):
        return torch.tensor(value, device=device, dtype=scale_dtype, requires_grad=requires_grad)

    return Inputs((features(), features(), scalar(LOGIT_SCALE), scalar(LOGIT_BIAS)))


def open_clip_siglip_loss(image, text, scale, bias, aux):
    """open_clip's SigLipLoss (world size 1) as open_clip computes it: the B x B logits
    ``logit_scale * image @ text.T + logit_bias``, the B x B labels ``2 I - 1`` in the logits'
    dtype, ``-logsigmoid(labels * logits).sum() / B``."""
    logits = scale * image @ text.T + bias
    rows = image.shape[0]
    labels = 2 * torch.eye(rows, device=image.device, dtype=image.dtype) - torch.ones(
        rows, rows, device=image.device, dtype=image.dtype)
    return -F.logsigmoid(labels * logits).sum() / rows


@functools.lru_cache(maxsize=None)
def _open_clip_loss_module():
    """open_clip's loss module, or None. Its package ``__init__`` imports torchvision, which has
    no build for every torch; in a source checkout the tests' peer loader
    (tests/peers/load.py) imports the loss module without it."""
    try:
        return importlib.import_module("open_clip.loss")
    except Exception:  # noqa: BLE001 - absent, or its torchvision import failed
        pass
    loader = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "peers", "load.py")
    if not os.path.exists(loader):
        return None
    spec = importlib.util.spec_from_file_location("_infonce_peer_load", loader)
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    return load.module("open_clip.loss")


class _OpenClipPeer(Provider):
    """A provider available where :func:`_open_clip_loss_module` finds open_clip's loss module."""

    def available(self, device):
        return torch.device(device).type in self.devices and _open_clip_loss_module() is not None


def _open_clip(aux):
    loss = _open_clip_loss_module().SigLipLoss()
    return lambda i, t, scale, bias: loss(i, t, scale, bias)


CASE = Case(
    kind="siglip",
    rows_label="B",
    settings=f"logit scale {LOGIT_SCALE:g}, bias {LOGIT_BIAS:g} (differentiated), unit-norm features, B pairs",
    make_inputs=make_inputs,
    fused=lambda aux, backend: lambda i, t, scale, bias: ik.siglip_loss(i, t, scale, bias, backend=backend),
    baselines=(
        *materialised(open_clip_siglip_loss),
        _OpenClipPeer("open_clip", _open_clip),
    ),
)
