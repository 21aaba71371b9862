"""Worker for the gloo test of the retrieval losses (tests/test_compat_sentence_transformers.py):
one process of a world of 3, spawned once for every check below (each spawn costs seconds of
imports). Every rank holds the same model and global batches and takes its own rows.

- sentence-transformers' MultipleNegativesRankingLoss with ``gather_across_devices=True``, equal
  batches (``EQUAL``): this rank's loss and gradients equal sentence-transformers' on this rank.
- the same with uneven batches (``UNEVEN``, which sentence-transformers does not support): the
  mean over ranks of the loss and the DDP-averaged gradients equal its single-process loss of the
  whole batch (computed by the test process, :func:`single_process`).
- the native :func:`infonce_kernels.retrieval_info_nce` (``NATIVE``: own (B, K, d) negatives, a
  pool of another size on every rank, no negatives; every direction set, the false-negative
  filter with the hardness penalty, a learnable temperature; cpu, reference and triton backends)
  and the module forms against the single-process call, in the world of 3 and in a group of 2;
  the dropped fraction; and the backward's traffic: the backward calls one collective, an
  all_gather of the largest rank's row count × (fused calls, at most 3) upstream gradients,
  never an N×d tensor (infonce_kernels/distributed.py, ``gathered_block_lse``).
- the cached (gradient-cache) loss across processes against the plain one; own negatives with
  another K on one rank refused on every rank.
"""

import contextlib
import gc
import math

import torch
import torch.distributed as dist
from distributed_worker import _ddp_step, _group

import infonce_kernels as ik
from infonce_kernels.compat.sentence_transformers import CachedMultipleNegativesRankingLoss, \
    MultipleNegativesRankingLoss

TOLERANCE = 1e-10
EQUAL, UNEVEN = [2, 2, 2], [3, 1, 2]
GTE = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
CONFIGS = [
    dict(),
    dict(directions=GTE, hardness_mode="in_batch_negatives", hardness_strength=2.0),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", scale=3.0, dot=True),
    dict(hardness_mode="all_negatives", hardness_strength=1.0, scale=5.0),
]
# (keyword arguments, negatives: "own" (B, 2, d) | "pool" (2 per row, on its rank) | None, backend)
NATIVE = [
    (dict(directions=GTE, hardness_mode="in_batch_negatives", hardness_strength=2.0,
          false_negative_margin=0.1), "own", "cpu"),
    (dict(hardness_mode="hard_negatives", hardness_strength=1.5, false_negative_ratio=0.8), "own", "cpu"),
    (dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
          hardness_mode="all_negatives", hardness_strength=1.0, false_negative_margin=0.05), "pool", "cpu"),
    (dict(directions=("query_to_doc", "query_to_query"), normalize=False), None, "cpu"),
    (dict(directions=("query_to_doc", "doc_to_doc"), false_negative_margin=-0.2), "pool", "cpu"),
    (dict(directions=GTE, false_negative_ratio=0.9), "pool", "reference"),
    (dict(directions=GTE, hardness_mode="hard_negatives", hardness_strength=1.0, false_negative_margin=0.1),
     "own", "triton"),
]
IN_GROUP_OF_2 = (0, 2)  # NATIVE entries also run in a group of ranks 0 and 1


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=TOLERANCE, atol=TOLERANCE, msg=what)


def problem(sizes):
    """The global batch (columns anchor, positive, 2 negatives; a pool of 2 negatives per row)
    and the model, the same in every process."""
    torch.manual_seed(0)
    total, dtype = sum(sizes), torch.float64
    columns = [torch.randn(total, 7, dtype=dtype) for _ in range(4)]
    pool = torch.randn(2 * total, 7, dtype=dtype)
    return columns, pool, torch.nn.Linear(7, 5).to(dtype)


def _kwargs(config, cos_sim, dot_score):
    kw = {k: v for k, v in config.items() if k != "dot"}
    kw["similarity_fct"] = dot_score if config.get("dot") else cos_sim
    return kw


def single_process():
    """sentence-transformers' loss and parameter gradients of the whole ``UNEVEN`` batch, one per
    config (computed by the test process, which has sentence-transformers imported)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as Theirs
    from sentence_transformers.util import cos_sim, dot_score

    columns, _, model = problem(UNEVEN)
    out = []
    for config in CONFIGS:
        theirs = Theirs(None, **_kwargs(config, cos_sim, dot_score))
        out.append(_ddp_step(list(model.parameters()), 1,
                             lambda: theirs.compute_loss_from_embeddings([model(x) for x in columns], None)))
    return out


def _mine(sizes, rank):
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


def _mean_over_ranks(loss, world, group=None):
    loss = loss.clone()
    dist.all_reduce(loss, group=group)
    return loss / world


def _sentence_transformers(rank, world, sizes, expected):
    """``expected`` None: equal batches, compared on each rank with sentence-transformers'
    distributed loss (imported here); else :func:`single_process`'s values for uneven batches."""
    from infonce_kernels.compat.sentence_transformers import cos_sim, dot_score

    columns, _, model = problem(sizes)
    params, mine = list(model.parameters()), _mine(sizes, rank)

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
            got[0] = _mean_over_ranks(got[0], world)
            want = expected[index]
        _close(got[0], want[0], f"{config} loss")
        for i, (g, h) in enumerate(zip(got[1], want[1])):
            _close(g, h, f"{config} gradient {i}")


@contextlib.contextmanager
def sent_tensors():
    """Records (collective, tensor handed to it) for every all_gather, reduce_scatter,
    all_to_all and all_reduce called inside the block (torch.distributed's functions wrapped)."""
    record, originals = [], {}
    for name in ("all_gather", "reduce_scatter", "all_to_all", "all_reduce"):
        originals[name] = original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            payload = args[0] if _name == "all_reduce" else args[1]
            for t in payload if isinstance(payload, (list, tuple)) else [payload]:
                record.append((_name, tuple(t.shape)))
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    try:
        yield record
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _native_step(params, world, group, compute):
    """(loss, DDP-averaged gradients, dropped fraction, what the backward sent) of one step."""
    for p in params:
        p.grad = None
    loss, dropped = compute()
    with sent_tensors() as sent:
        loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    if world > 1:
        for g in grads:
            dist.all_reduce(g, group=group)
            g /= world
    return loss.detach(), grads, dropped, sent


def _native(rank, world, sizes, entries, group=None):
    """``NATIVE[entries]`` on ``world`` ranks of ``group`` holding ``sizes`` rows against the
    single-process call on the whole batch; with a learnable temperature."""
    columns, pool, model = problem(sizes)
    log_tau = torch.nn.Parameter(torch.tensor(math.log(0.2), dtype=torch.float64))
    params, mine = [*model.parameters(), log_tau], _mine(sizes, rank)
    cuts = [0] + torch.tensor([2 * s for s in sizes]).cumsum(0).tolist()
    for index in entries:
        kw, negatives, backend = NATIVE[index]

        def loss(rows, pool_rows, **extra):
            q, d = model(columns[0][rows]), model(columns[1][rows])
            neg = {"own": lambda: torch.stack([model(columns[2][rows]), model(columns[3][rows])], 1),
                   "pool": lambda: model(pool[pool_rows]), None: lambda: None}[negatives]()
            return ik.retrieval_info_nce(q, d, neg, temperature=log_tau.exp(), backend=backend,
                                         return_dropped=True, **kw, **extra)

        what = f"native {index} {kw} {negatives} {backend} world {world}"
        got, grads, dropped, sent = _native_step(params, world, group, lambda: loss(
            mine, slice(cuts[rank], cuts[rank + 1]), gather_distributed=True, group=group))
        want, want_grads, want_dropped, _ = _native_step(params, 1, None,
                                                         lambda: loss(slice(None), slice(None)))
        _close(_mean_over_ranks(got, world, group), want, f"{what}: loss")
        for i, (g, h) in enumerate(zip(grads, want_grads)):
            _close(g, h, f"{what}: gradient {i}")
        # the dropped fraction is over this rank's rows, whose candidates number alike
        share = dropped * sizes[rank] / sum(sizes)
        _close(_mean_over_ranks(share, world, group) * world, want_dropped, f"{what}: dropped fraction")
        if "margin" in str(kw) or "ratio" in str(kw):
            assert float(want_dropped) > 0, f"{what}: the filter dropped nothing; the check is empty"
        # O(N) backward traffic: one all-gather of the rows' upstream gradients (a column per
        # fused call, at most 3), nothing else
        assert len(sent) == 1 and sent[0][0] == "all_gather" and sent[0][1][0] == max(sizes) \
            and len(sent[0][1]) == 2 and sent[0][1][1] <= 3, f"{what}: the backward sent {sent}"


def _modules(rank, world, sizes):
    """RetrievalInfoNCELoss / SymmetricRetrievalInfoNCELoss across processes, with the filter:
    loss, gradients and ``last_dropped_fraction``."""
    columns, _, model = problem(sizes)
    params, mine = list(model.parameters()), _mine(sizes, rank)
    for cls in (ik.RetrievalInfoNCELoss, ik.SymmetricRetrievalInfoNCELoss):
        spread = cls(0.1, false_negative_margin=0.0, backend="cpu", gather_distributed=True)
        alone = cls(0.1, false_negative_margin=0.0, backend="cpu")
        got = _ddp_step(params, world, lambda: spread(model(columns[0][mine]), model(columns[1][mine]),
                                                      torch.stack([model(columns[2][mine])], 1)))
        want = _ddp_step(params, 1, lambda: alone(model(columns[0]), model(columns[1]),
                                                  torch.stack([model(columns[2])], 1)))
        _close(_mean_over_ranks(got[0], world), want[0], f"{cls.__name__} loss")
        for i, (g, h) in enumerate(zip(got[1], want[1])):
            _close(g, h, f"{cls.__name__} gradient {i}")
        share = spread.last_dropped_fraction * sizes[rank] / sum(sizes)
        _close(_mean_over_ranks(share, world) * world, alone.last_dropped_fraction, f"{cls.__name__} dropped")


class _Encoder(torch.nn.Module):
    """A model called as sentence-transformers calls one: features dict -> {"sentence_embedding"}."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, features):
        return {"sentence_embedding": self.linear(features["x"])}


def _cached(rank, world, sizes):
    """CachedMultipleNegativesRankingLoss (mini-batches of 2) across processes: this rank's loss
    and gradients equal the plain loss's (itself checked against sentence-transformers)."""
    columns, _, model = problem(sizes)
    params, mine, encoder = list(model.parameters()), _mine(sizes, rank), _Encoder(model)
    kw = dict(directions=GTE, hardness_mode="in_batch_negatives", hardness_strength=1.0,
              false_negative_margin=0.1, gather_across_devices=True, backend="cpu")
    cached = CachedMultipleNegativesRankingLoss(encoder, mini_batch_size=2, **kw)
    plain = MultipleNegativesRankingLoss(encoder, **kw)
    got = _ddp_step(params, 1, lambda: cached([{"x": x[mine]} for x in columns], None))
    want = _ddp_step(params, 1, lambda: plain.compute_loss_from_embeddings([model(x[mine]) for x in columns]))
    _close(got[0], want[0], "cached loss")
    for i, (g, h) in enumerate(zip(got[1], want[1])):
        _close(g, h, f"cached gradient {i}")
    _close(cached.last_dropped_fraction, plain.last_dropped_fraction, "cached dropped fraction")


def _different_k(rank):
    """Own (B, K, d) negatives need one K on every rank: every rank refuses alike."""
    x = torch.randn(2, 5, dtype=torch.float64)
    try:
        ik.retrieval_info_nce(x, x, torch.randn(2, 1 + (rank == 0), 5, dtype=torch.float64),
                              gather_distributed=True, backend="cpu")
    except ValueError as error:
        assert "same K on every rank" in str(error), error
    else:
        raise AssertionError("own negatives with another K on one rank were not refused")


def _in_group_of_2(rank):
    """``IN_GROUP_OF_2`` on ranks 0 and 1 (``group=``); the group is destroyed before returning."""
    pair = dist.new_group([0, 1])
    try:
        if rank < 2:
            _native(rank, 2, UNEVEN[:2], IN_GROUP_OF_2, group=pair)
    finally:
        dist.destroy_process_group(pair)


def run(rank, world, init_file, expected):
    """Every check of the module docstring in one group of ``world`` = 3 processes."""
    assert world == len(EQUAL) == len(UNEVEN)
    with _group(rank, world, init_file):
        _sentence_transformers(rank, world, EQUAL, None)
        _sentence_transformers(rank, world, UNEVEN, expected)
        _native(rank, world, UNEVEN, range(len(NATIVE)))
        _in_group_of_2(rank)
        _modules(rank, world, UNEVEN)
        _cached(rank, world, UNEVEN)
        _different_k(rank)
        gc.collect()  # a process group held only by cyclic garbage would outlive destroy_process_group
