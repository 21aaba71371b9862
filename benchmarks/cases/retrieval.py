"""Retrieval InfoNCE with hard negatives (sentence-transformers' MultipleNegativesRankingLoss): B
queries, their B positive documents and K = 7 hard negatives per query, every document a
candidate of every query (B x 8B logits), cosine similarity, scale 20."""

import torch

import infonce_kernels as ik

from .base import Case, Inputs, Provider, randn

SCALE = 20.0
NEGATIVES = 7


def make_inputs(rows, dim, dtype, device, requires_grad, generator):
    return Inputs((randn(generator, (rows, dim), dtype, device, requires_grad),
                   randn(generator, (rows, dim), dtype, device, requires_grad),
                   randn(generator, (rows, NEGATIVES, dim), dtype, device, requires_grad)))


def _sentence_transformers(aux):
    """sentence-transformers' own loss on the embeddings: the (B, 8B) cosine matrix, logsumexp."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    loss = MultipleNegativesRankingLoss(None, scale=SCALE)
    return lambda q, d, n: loss.compute_loss_from_embeddings([q, d, *n.unbind(1)], None)


def _sentence_transformers_cached(aux):
    """The loss stage of sentence-transformers' CachedMultipleNegativesRankingLoss: the rows in
    mini-batches of 32 against all documents, each mini-batch's backward run at once (to the
    embeddings), so one (32, 8B) matrix lives at a time. Its returned loss is detached: the
    step's ``backward()`` is a no-op on a stand-in leaf, the gradients being already computed."""
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    loss = CachedMultipleNegativesRankingLoss(torch.nn.Sequential(torch.nn.Identity()), scale=SCALE, mini_batch_size=32)

    def step(q, d, n):
        value = loss.calculate_loss([[q], [d], *([x] for x in n.unbind(1))], with_backward=True)
        return value.requires_grad_()

    return step


CASE = Case(
    kind="retrieval",
    rows_label="B",
    settings=f"scale {SCALE:g} (tau 0.05), cosine, B queries with {NEGATIVES} hard negatives each",
    make_inputs=make_inputs,
    fused=lambda aux, backend: lambda q, d, n: ik.retrieval_info_nce(q, d, n, temperature=1 / SCALE,
                                                                      backend=backend),
    baselines=(
        Provider("sentence_transformers", _sentence_transformers, needs=("sentence_transformers",)),
        Provider("sentence_transformers_cached", _sentence_transformers_cached, needs=("sentence_transformers",),
                 max_rows=4096),
    ),
)
