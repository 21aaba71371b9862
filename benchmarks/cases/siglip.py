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


def siglip_kernel_loss(fused_siglip_loss, image, text, logit_scale, logit_bias, **options):
    """The siglip-kernel package's loss (``siglip_kernel.fused_siglip_loss``, a fused GPU baseline)
    in this package's convention, i.e. equal to ``ik.siglip_loss(image, text, logit_scale,
    logit_bias)`` (reduction "mean") with the gradients in ``logit_scale`` itself.

    siglip-kernel takes the log temperature (its temperature is ``exp(log_temperature)``) where
    SigLIP models and this package pass t = exp(log t) already exponentiated; its loss is
    ``-sum_ij log sigmoid(z_ij (t <img_i, txt_j> + b)) / B``, our mean over the B rows. The log
    is taken inside autograd, so d/dt = (d/d log t) / t. Shapes: image, text (B, d); t, b ().
    ``options`` go to ``fused_siglip_loss`` (e.g. ``backend``; default "auto")."""
    return fused_siglip_loss(image, text, logit_scale.log(), logit_bias, **options)


def siglip_kernel_dscale_rounding(image, text, logit_scale, logit_bias):
    """A bound on the rounding error of siglip-kernel's fused backends' d loss / d t beyond the
    plain computation's, for unit-norm rows in the inputs' dtype (float64 arithmetic; the
    comparisons of its gradient add it to the 2x same-precision tolerance).

    With c = <img_i, txt_j>, l = t c + b and G = (sigmoid(l) - [i = j]) / B, its kernels form
    d loss / d log t = sum G l - b sum G from float32 sums that cancel (each of size about
    |b| sum |G| where the result is t sum G c), and the logits c they read are rounded to the
    inputs' dtype: 2 eps_fp32 (sum |G l| + |b| sum |G|) / t + eps_dtype sum |G| |c|."""
    c = image.double() @ text.double().T
    t, b = float(logit_scale), float(logit_bias)
    logits = t * c + b
    g = (torch.sigmoid(logits) - torch.eye(*c.shape, dtype=c.dtype, device=c.device)) / c.shape[0]
    fp32 = torch.finfo(torch.float32).eps
    eps = torch.finfo(image.dtype).eps
    return (2 * fp32 * ((g * logits).abs().sum() + abs(b) * g.abs().sum()) / t + eps * (g.abs() * c.abs()).sum()).item()


def siglip_kernel_backend_ran(module, call):
    """``(name, call())``: ``name`` is the loss function of the siglip-kernel package ``module``
    that ``call()`` (a call of ``module.fused_siglip_loss``) reached; its "auto" backend routes
    by dtype and GPU architecture. Each loss function of the package's namespace, where the router
    looks it up, is wrapped to note its call for the duration of ``call()``, then restored; None
    if none was reached."""
    called = []

    def noting(name, fn):
        def wrapper(*a, **k):
            called.append(name)
            return fn(*a, **k)
        return wrapper

    entries = {n: f for n, f in vars(module).items()
               if "siglip" in n and n != "fused_siglip_loss" and callable(f) and not isinstance(f, type)}
    try:
        for name, fn in entries.items():
            setattr(module, name, noting(name, fn))
        result = call()
    finally:
        for name, fn in entries.items():
            setattr(module, name, fn)
    return (called[0] if called else None), result


def _siglip_kernel(aux):
    from siglip_kernel import fused_siglip_loss  # noqa: PLC0415 - imports only where it runs (CUDA)
    return lambda i, t, scale, bias: siglip_kernel_loss(fused_siglip_loss, i, t, scale, bias)


CASE = Case(
    kind="siglip",
    rows_label="B",
    settings=f"logit scale {LOGIT_SCALE:g}, bias {LOGIT_BIAS:g} (differentiated), unit-norm features, B pairs",
    make_inputs=make_inputs,
    fused=lambda aux, backend: lambda i, t, scale, bias: ik.siglip_loss(i, t, scale, bias, backend=backend),
    baselines=(
        *materialised(open_clip_siglip_loss),
        _OpenClipPeer("open_clip", _open_clip),
        # the fused GPU baseline (pip install siglip-kernel; its package import needs a CUDA device)
        Provider("siglip_kernel", _siglip_kernel, needs=("siglip_kernel",), devices=("cuda",)),
    ),
)
