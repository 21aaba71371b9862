"""SupCon: two views of 2B/2 samples with labels from 100 classes, 2B anchors."""

import torch

import infonce_kernels as ik

from .base import Case, Inputs, Provider, randn

TEMPERATURE = 0.5
CLASSES = 100


def make_inputs(rows, dim, dtype, device, requires_grad, generator):
    b = rows // 2
    features = randn(generator, (b, 2, dim), dtype, device, requires_grad)
    labels = torch.randint(0, CLASSES, (b,), generator=generator).to(device)
    return Inputs((features,), {"labels": labels})


def _pml(aux):
    from pytorch_metric_learning.losses import SupConLoss

    loss = SupConLoss(temperature=TEMPERATURE)
    both = torch.cat([aux["labels"], aux["labels"]])
    return lambda f: loss(torch.cat([f[:, 0], f[:, 1]]), both)


CASE = Case(
    kind="supcon",
    rows_label="2B",
    settings=f"tau = {TEMPERATURE}, two views of 2B/2 samples, labels from {CLASSES} classes",
    make_inputs=make_inputs,
    fused=lambda aux, backend: lambda f: ik.supcon(f, aux["labels"], TEMPERATURE, backend=backend),
    baselines=(Provider("pml", _pml, needs=("pytorch_metric_learning.losses",)),),
)
