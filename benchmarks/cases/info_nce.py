"""InfoNCE with in-batch negatives: B queries, each key of the other pairs a negative."""

import torch
import torch.nn.functional as F

import infonce_kernels as ik

from .base import Case, Inputs, Provider, materialised, randn

TEMPERATURE = 0.1


def make_inputs(rows, dim, dtype, device, requires_grad, generator):
    return Inputs((randn(generator, (rows, dim), dtype, device, requires_grad),
                   randn(generator, (rows, dim), dtype, device, requires_grad)))


def in_batch_loss(query, key, aux):
    """The B x B logits q k^T / tau of the normalised features, cross-entropy against the diagonal."""
    logits = F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


def _info_nce_pytorch(aux):
    from info_nce import InfoNCE

    return InfoNCE(temperature=TEMPERATURE)


CASE = Case(
    kind="info_nce",
    rows_label="B",
    settings=f"tau = {TEMPERATURE}, B queries, in-batch negatives",
    make_inputs=make_inputs,
    fused=lambda aux, backend: lambda q, k: ik.info_nce(q, k, temperature=TEMPERATURE, backend=backend),
    baselines=(
        *materialised(in_batch_loss),
        Provider("info_nce_pytorch", _info_nce_pytorch, needs=("info_nce",)),
    ),
)
