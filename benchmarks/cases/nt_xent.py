"""NT-Xent (SimCLR): two views of B samples, 2B anchors, each view's partner the positive."""

import torch
import torch.nn.functional as F

import infonce_kernels as ik

from .base import Case, Inputs, Provider, materialised, randn

TEMPERATURE = 0.5


def make_inputs(rows, dim, dtype, device, requires_grad, generator):
    b = rows // 2
    return Inputs((randn(generator, (b, dim), dtype, device, requires_grad),
                   randn(generator, (b, dim), dtype, device, requires_grad)))


def simclr_loss(z1, z2, aux):
    """NT-Xent as SimCLR code writes it: the 2B x 2B logits z z^T / tau with the diagonal masked,
    one cross-entropy whose target for row i is its other view (i + B mod 2B)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / TEMPERATURE
    logits.fill_diagonal_(float("-inf"))
    n = z.shape[0]
    targets = (torch.arange(n, device=z.device) + n // 2) % n
    return F.cross_entropy(logits, targets)


def _lightly(aux):
    from lightly.loss import NTXentLoss

    return NTXentLoss(temperature=TEMPERATURE)


def _pml(aux):
    from pytorch_metric_learning.losses import NTXentLoss, SelfSupervisedLoss

    return SelfSupervisedLoss(NTXentLoss(temperature=TEMPERATURE))


CASE = Case(
    kind="nt_xent",
    rows_label="2B",
    settings=f"tau = {TEMPERATURE}, two views of 2B/2 samples",
    make_inputs=make_inputs,
    fused=lambda aux, backend: lambda z1, z2: ik.nt_xent(z1, z2, TEMPERATURE, backend=backend),
    baselines=(
        *materialised(simclr_loss),
        Provider("lightly", _lightly, needs=("lightly.loss",)),
        # its NT-Xent builds a (positive pairs x negative pairs) mask: O(N^3) memory
        Provider("pml", _pml, needs=("pytorch_metric_learning.losses",), max_rows=256),
    ),
)
