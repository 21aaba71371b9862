"""retrieval_info_nce: hard negatives (own or a shared pool), every direction and partition mode,
the hardness penalty and false-negative filtering, against a per-pair float64 textbook written
below, on every CPU backend (triton under the interpreter); float32 under the 2x same-precision
rule; the dropped pairs' gradients exactly zero and their fraction reported; bad input."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import ALL_CPU_BACKENDS, F64, assert_within

import infonce_kernels as ik

GTE = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def textbook(q, d, negatives, tau, *, directions=("query_to_doc",), partition_mode="joint", hardness_mode=None,
             hardness_strength=0.0, false_negative_margin=None, false_negative_ratio=None, normalize=True,
             dtype=F64):
    """(per-query losses, dropped pairs, candidate pairs), candidate by candidate: query i's
    candidates in each direction, each logit s sim (+ a stop_grad(sim) when penalised), the
    filter's drops left out, then one log-sum-exp per direction (joint: over all of them)."""
    unit = (lambda x: F.normalize(x, dim=-1)) if normalize else (lambda x: x)
    q, d = unit(q.to(dtype)), unit(d.to(dtype))
    b, s, alpha = q.shape[0], 1.0 / tau, hardness_strength if hardness_mode else 0.0
    if negatives is None:
        docs, owner = [d[j] for j in range(b)], list(range(b))
    elif negatives.dim() == 3:  # own negatives; as sentence-transformers orders them (order is immaterial)
        n = unit(negatives.to(dtype))
        docs = [d[j] for j in range(b)] + [n[j, k] for k in range(n.shape[1]) for j in range(b)]
        owner = list(range(b)) + [j for k in range(n.shape[1]) for j in range(b)]
    else:  # a pool: nobody's own
        pool = unit(negatives.to(dtype))
        docs, owner = [d[j] for j in range(b)] + list(pool), list(range(b)) + [-1] * pool.shape[0]
    losses, dropped, total = [], 0, 0
    for i in range(b):
        pos = q[i] @ d[i]
        limit = None
        if false_negative_margin is not None:
            limit = pos.detach() + false_negative_margin
        if false_negative_ratio is not None:
            limit = pos.detach() * false_negative_ratio

        def keep(sim, is_positive=False):
            nonlocal dropped, total
            total += 1
            out = is_positive or limit is None or not bool(sim.detach() > limit)
            dropped += not out
            return out

        per = {}
        logits = []
        for x, (doc, who) in enumerate(zip(docs, owner)):
            sim = q[i] @ doc
            is_positive = x == i
            penalised = (hardness_mode == "in_batch_negatives" and who != i) or \
                        (hardness_mode == "hard_negatives" and who == i and x >= b) or \
                        (hardness_mode == "all_negatives" and not is_positive)
            if keep(sim, is_positive):
                logits.append(s * sim + (alpha * sim.detach() if penalised else 0.0))
        per["query_to_doc"] = logits
        if "query_to_query" in directions:
            per["query_to_query"] = [s * q[i] @ q[j] for j in range(b) if j != i and keep(q[i] @ q[j])]
        if "doc_to_query" in directions:
            per["doc_to_query"] = [s * d[i] @ q[j] for j in range(b) if keep(d[i] @ q[j], j == i)]
        if "doc_to_doc" in directions:
            per["doc_to_doc"] = [s * d[i] @ doc for doc, who in zip(docs, owner) if who != i and keep(d[i] @ doc)]
        terms = [torch.logsumexp(torch.stack(v), 0) for v in per.values() if v]
        if partition_mode == "joint":
            log_z = torch.logsumexp(torch.stack([x for v in per.values() for x in v]), 0)
        else:
            log_z = sum(terms) / len(terms)
        losses.append(log_z - s * pos)
    return torch.stack(losses), dropped, total


def _inputs(b, k, dim, kind, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, d = torch.randn(b, dim, generator=gen, dtype=F64), torch.randn(b, dim, generator=gen, dtype=F64)
    d = d + 0.8 * q  # positives more similar than chance, so the filter keeps most candidates
    n = {"none": None, "own": torch.randn(b, k, dim, generator=gen, dtype=F64),
         "pool": torch.randn(k, dim, generator=gen, dtype=F64)}[kind]
    return [None if t is None else t.to(dtype) for t in (q, d, n)]


def _grads(fn, tensors, tau):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    tau = torch.tensor(tau, dtype=F64 if tensors[0].dtype == F64 else torch.float32, requires_grad=True)
    out = fn(*leaves, tau)
    value = out[0] if isinstance(out, tuple) else out
    wrt = [t for t in leaves + [tau] if t is not None]
    grads = torch.autograd.grad(value.sum(), wrt)
    return out, grads


# (options, negatives kind, K); every direction set, both partitions, every hardness mode, both filters
CASES = [
    (dict(), "none", 0),
    (dict(), "own", 2),
    (dict(directions=GTE), "own", 2),
    (dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"), "pool", 3),
    (dict(directions=("query_to_doc", "query_to_query"), hardness_mode="in_batch_negatives",
          hardness_strength=2.0), "own", 1),
    (dict(hardness_mode="hard_negatives", hardness_strength=4.0), "own", 2),
    (dict(directions=("query_to_doc", "doc_to_doc"), hardness_mode="all_negatives", hardness_strength=1.5), "pool", 2),
    (dict(false_negative_margin=0.05), "own", 2),
    (dict(directions=GTE, false_negative_margin=-0.1, hardness_mode="in_batch_negatives", hardness_strength=1.0),
     "own", 1),
    (dict(directions=("query_to_doc", "doc_to_query"), false_negative_ratio=0.9), "pool", 3),
    (dict(false_negative_ratio=1.1, hardness_mode="hard_negatives", hardness_strength=2.0, normalize=False),
     "own", 2),
]


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo group of this process alone: ``gather_distributed=True`` then runs the cross-process
    path (gathers, the O(N) backward's row and key sides) with every row on this rank."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class TestRetrievalInfoNCE:
    # the Triton interpreter's log2 of an empty row's zero sum (a row the filter empties in one call)
    @pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
    @pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
    @pytest.mark.parametrize("case", range(len(CASES)))
    def test_float64_matches_textbook(self, case, backend):
        options, kind, k = CASES[case]
        tensors = _inputs(5, k, 6, kind, seed=case)
        want, want_grads = _grads(lambda q, d, n, t: textbook(q, d, n, t, **options)[0].mean(), tensors, 0.3)
        (got, dropped), grads = _grads(lambda q, d, n, t: ik.retrieval_info_nce(
            q, d, n, temperature=t, backend=backend, return_dropped=True, **options), tensors, 0.3)
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
        for g, h in zip(grads, want_grads):
            torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-11)
        _, count, total = textbook(*tensors, 0.3, **options)
        assert float(dropped) == pytest.approx(count / total, abs=1e-12)
        if "false_negative_margin" in options or "false_negative_ratio" in options:
            assert 0 < count < total, "the filter case must drop some pairs and keep others"

    @pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
    @pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
    @pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
    def test_gathered_backward_matches_one_process(self, group_of_one, backend):
        """Every case with ``gather_distributed=True`` in a world of one: values, gradients (the
        paired passes' row and key sides, the hardness factor, each side's thresholds and
        positives) and the dropped fraction equal the one-process loss's. Worlds of 3 and 2 with
        uneven batches and the traffic: tests/retrieval_distributed_worker.py. Under the Triton
        interpreter, three cases that hold every kind of pass (seconds each)."""
        for case in [6, 8, 10] if backend == "triton" else range(len(CASES)):
            options, kind, k = CASES[case]
            tensors = _inputs(4, k, 5, kind, seed=70 + case)
            outs = [_grads(lambda q, d, n, t: ik.retrieval_info_nce(  # noqa: B023 (called at once)
                q, d, n, temperature=t, backend=backend, return_dropped=True, gather_distributed=spread,
                **options), tensors, 0.3) for spread in (True, False)]
            (got, dropped), grads = outs[0]
            (want, want_dropped), want_grads = outs[1]
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"case {case}")
            torch.testing.assert_close(dropped, want_dropped, rtol=0, atol=1e-15, msg=f"case {case}")
            for g, h in zip(grads, want_grads):
                torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12, msg=f"case {case}")

    @pytest.mark.parametrize("case", [2, 8])
    def test_float32_within_twice_plain_error(self, case):
        options, kind, k = CASES[case]
        exact = _inputs(6, k, 8, kind, seed=50 + case)
        single = [None if t is None else t.float() for t in exact]
        rounded = [None if t is None else t.double() for t in single]  # the oracle on the same inputs
        want, want_grads = _grads(lambda q, d, n, t: textbook(q, d, n, t, **options)[0], rounded, 0.3)
        base, base_grads = _grads(lambda q, d, n, t: textbook(q, d, n, t, dtype=torch.float32, **options)[0],
                                  single, 0.3)
        got, grads = _grads(lambda q, d, n, t: ik.retrieval_info_nce(q, d, n, temperature=t, backend="cpu",
                                                                     reduction="none", **options), single, 0.3)
        eps = torch.finfo(torch.float32).eps
        assert got.dtype == torch.float32 and got.shape == (6,)
        assert_within(got, want, base, "loss", rtol=2 * eps)
        for i, (g, h, c) in enumerate(zip(grads, want_grads, base_grads)):
            assert_within(g, h, c, f"gradient {i}", rtol=2 * eps)

    @pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
    def test_dropped_pairs_get_exactly_zero_gradient(self, backend):
        """A pool key far more similar to every query than its positive is dropped for every row:
        its gradient is exactly zero, and the module reports the fraction dropped."""
        gen = torch.Generator().manual_seed(1)
        direction = torch.randn(8, dtype=F64, generator=gen)
        q = direction + 0.3 * torch.randn(4, 8, dtype=F64, generator=gen)
        d = torch.randn(4, 8, dtype=F64, generator=gen)
        pool = torch.cat([direction[None], torch.randn(3, 8, dtype=F64, generator=gen)]).requires_grad_()
        loss = ik.RetrievalInfoNCELoss(0.2, false_negative_margin=0.0, backend=backend)
        loss(q, d, pool).backward()
        assert torch.equal(pool.grad[0], torch.zeros(8, dtype=F64))
        assert pool.grad[1:].abs().min() > 0
        _, count, total = textbook(q, d, pool.detach(), 0.2, false_negative_margin=0.0)
        assert count >= 4 and float(loss.last_dropped_fraction) == pytest.approx(count / total)
        plain = ik.RetrievalInfoNCELoss(0.2, backend=backend)
        plain(q, d, pool)
        assert float(plain.last_dropped_fraction) == 0.0

    def test_module_forms_and_symmetric_variant(self):
        q, d, n = _inputs(4, 2, 5, "own", seed=9)
        symmetric = ik.SymmetricRetrievalInfoNCELoss(0.1, backend="cpu")
        want = textbook(q, d, n, 0.1, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")[0]
        torch.testing.assert_close(symmetric(q, d, n), want.mean(), rtol=1e-12, atol=1e-12)
        learnable = ik.RetrievalInfoNCELoss(ik.LearnableTemperature(0.1), reduction="sum", directions=GTE)
        assert any(p.requires_grad for p in learnable.parameters())
        torch.testing.assert_close(learnable(q, d, n), textbook(q, d, n, 0.1, directions=GTE)[0].sum(),
                                   rtol=1e-5, atol=1e-5)
        assert "query_to_query" in repr(learnable)

    def test_bad_input(self):
        q, d, n = _inputs(3, 2, 4, "own")
        cases = [
            (dict(negative_keys=n[:2]), ValueError, "one row of negatives per query"),
            (dict(negative_keys=n[None]), ValueError, r"\(B, K, d\)"),
            (dict(negative_keys=n.float()), TypeError, "same dtype"),
            (dict(negative_keys=[1.0]), TypeError, "negative_keys must be a torch.Tensor"),
            (dict(directions="query_to_doc"), TypeError, "tuple of direction names"),
            (dict(directions=("doc_to_doc",)), ValueError, "query_to_doc"),
            (dict(directions=GTE, partition_mode="per_direction"), ValueError, "per_direction"),
            (dict(hardness_mode="soft"), ValueError, "hardness_mode"),
            (dict(hardness_mode="hard_negatives", hardness_strength=float("nan")), ValueError, "hardness_strength"),
            (dict(false_negative_margin=0.1, false_negative_ratio=0.5), ValueError, "not both"),
            (dict(false_negative_ratio=0.0), ValueError, "false_negative_ratio"),
            (dict(false_negative_margin="0.1"), TypeError, "false_negative_margin"),
            (dict(temperature=-1.0), ValueError, "temperature"),
            (dict(reduction="avg"), ValueError, "reduction"),
        ]
        for kwargs, error, message in cases:
            with pytest.raises(error, match=message):
                ik.retrieval_info_nce(q, d, **kwargs)
        with pytest.raises(ValueError, match="same number of rows"):
            ik.retrieval_info_nce(q, d[:2])
        bad = q.clone()
        bad[0, 0] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            ik.retrieval_info_nce(bad, d)
        with pytest.raises(RuntimeError, match="init_process_group"):
            ik.retrieval_info_nce(q, d, gather_distributed=True)
