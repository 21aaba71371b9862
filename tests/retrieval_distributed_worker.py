"""Worker for the gloo tests of the retrieval losses (tests/test_compat_sentence_transformers.py):
one process of a group, spawned. Every rank holds the same model and global batch and takes its
own rows (``sizes`` per rank).

- sentence-transformers' MultipleNegativesRankingLoss with ``gather_across_devices=True``: with
  equal batches, this rank's loss and gradients equal sentence-transformers' on this rank; with
  uneven ones (which sentence-transformers does not support), the mean over ranks of the loss and
  the DDP-averaged gradients equal its single-process loss of the whole batch.
- the native :func:`infonce_kernels.retrieval_info_nce` with a pool of negatives of uneven size per
  rank, without and with the false-negative filter: the same against the single-process call.
"""

import torch
import torch.distributed as dist
from distributed_worker import _ddp_step, _group

import infonce_kernels as ik
from infonce_kernels.compat.sentence_transformers import MultipleNegativesRankingLoss

TOLERANCE = 1e-10
CONFIGS = [
    dict(),
    dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
         hardness_mode="in_batch_negatives", hardness_strength=2.0),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", scale=3.0, dot=True),
    dict(hardness_mode="all_negatives", hardness_strength=1.0, scale=5.0),
]


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=TOLERANCE, atol=TOLERANCE, msg=what)


def problem(sizes):
    """The global batch (columns anchor, positive, 2 negatives; a pool of negatives) and the model,
    the same in every process."""
    torch.manual_seed(0)
    total, dtype = sum(sizes), torch.float64
    columns = [torch.randn(total, 7, dtype=dtype) for _ in range(4)]
    pool = torch.randn(2 * total, 7, dtype=dtype)
    return columns, pool, torch.nn.Linear(7, 5).to(dtype)


def _kwargs(config, cos_sim, dot_score):
    kw = {k: v for k, v in config.items() if k != "dot"}
    kw["similarity_fct"] = dot_score if config.get("dot") else cos_sim
    return kw


def single_process(sizes):
    """sentence-transformers' loss and parameter gradients of the whole batch, one per config
    (computed by the test process, which has sentence-transformers imported)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as Theirs
    from sentence_transformers.util import cos_sim, dot_score

    columns, _, model = problem(sizes)
    out = []
    for config in CONFIGS:
        theirs = Theirs(None, **_kwargs(config, cos_sim, dot_score))
        out.append(_ddp_step(list(model.parameters()), 1,
                             lambda: theirs.compute_loss_from_embeddings([model(x) for x in columns], None)))
    return out


def run(rank, world, init_file, sizes, expected=None):
    """``expected`` None: equal batches, compared on each rank with sentence-transformers'
    distributed loss (imported here); else :func:`single_process`'s values for uneven batches."""
    from infonce_kernels.compat.sentence_transformers import cos_sim, dot_score

    with _group(rank, world, init_file):
        columns, pool, model = problem(sizes)
        params = list(model.parameters())
        lo = sum(sizes[:rank])
        mine = slice(lo, lo + sizes[rank])

        def embed(rows):
            return [model(x[rows]) for x in columns]

        for index, config in enumerate(CONFIGS):
            ours = MultipleNegativesRankingLoss(None, gather_across_devices=True, backend="cpu",
                                                **_kwargs(config, cos_sim, dot_score))
            if expected is None:  # this rank's loss and gradients, not averaged
                from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as Theirs
                from sentence_transformers.util import cos_sim as st_cos, dot_score as st_dot

                got = _ddp_step(params, 1, lambda: ours.compute_loss_from_embeddings(embed(mine)))
                theirs = Theirs(None, gather_across_devices=True, **_kwargs(config, st_cos, st_dot))
                want = _ddp_step(params, 1, lambda: theirs.compute_loss_from_embeddings(embed(mine), None))
            else:
                got = list(_ddp_step(params, world, lambda: ours.compute_loss_from_embeddings(embed(mine))))
                dist.all_reduce(got[0])
                got[0] /= world
                want = expected[index]
            _close(got[0], want[0], f"{config} loss")
            for i, (g, h) in enumerate(zip(got[1], want[1])):
                _close(g, h, f"{config} gradient {i}")

        # the native loss, a pool of negatives of another size on every rank
        cuts = [0] + torch.tensor([2 * s for s in sizes]).cumsum(0).tolist()

        def native(rows, negatives, **kw):
            q, d = model(columns[0][rows]), model(columns[1][rows])
            return ik.retrieval_info_nce(q, d, model(negatives), temperature=0.2, backend="cpu",
                                         directions=("query_to_doc", "doc_to_doc"), **kw)

        for kw in ({}, {"false_negative_margin": -0.2}):
            got = list(_ddp_step(params, world, lambda: native(mine, pool[cuts[rank]: cuts[rank + 1]],
                                                               gather_distributed=True, **kw)))
            dist.all_reduce(got[0])
            got[0] /= world
            want = _ddp_step(params, 1, lambda: native(slice(None), pool, **kw))
            _close(got[0], want[0], f"native pool loss {kw}")
            for i, (g, h) in enumerate(zip(got[1], want[1])):
                _close(g, h, f"native pool gradient {i} {kw}")
