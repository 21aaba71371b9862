"""infonce_kernels.compat.sentence_transformers against the installed sentence-transformers (6.2):
values and parameter gradients of a tiny SentenceTransformer (a one-layer BERT with a word-level
tokenizer, both made here, no download), float64 and float32 (the 2x same-precision rule), every
``directions`` / ``partition_mode`` / ``hardness_mode``, with and without hard negatives, cosine
and dot product, plain and gradient-cached; one process here, gloo processes in
tests/retrieval_distributed_worker.py."""

import os
import pathlib
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import F64, assert_within

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (test extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sentence_transformers.sentence_transformer import losses as theirs  # noqa: E402

from infonce_kernels.compat import sentence_transformers as ours  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # spawned workers import retrieval_distributed_worker

WORDS = "the a cat dog sat ran on mat log fast slow red blue big small house tree car road sun".split()
TEXTS = ["the cat sat on the mat", "a dog ran fast", "red car on the road", "big tree", "the sun",
         "small blue house on a road", "a slow cat", "the big red dog sat", "sun on the tree", "fast car"]

GTE = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
# (constructor arguments, hard-negative columns, batch size); every directions setting, both
# partition modes, every hardness mode, dot product, with and without negatives
CASES = [
    (dict(), 0, 4),
    (dict(), 2, 3),
    (dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"), 1, 4),
    (dict(directions=("query_to_doc", "doc_to_query")), 0, 3),
    (dict(directions=("query_to_doc", "query_to_query")), 1, 5),
    (dict(directions=("query_to_doc", "doc_to_doc")), 2, 4),
    (dict(directions=GTE), 1, 4),
    (dict(directions=GTE, hardness_mode="in_batch_negatives", hardness_strength=3.0), 2, 4),
    (dict(hardness_mode="hard_negatives", hardness_strength=5.0, scale=10.0), 2, 3),
    (dict(hardness_mode="all_negatives", hardness_strength=2.0), 1, 5),
    (dict(similarity_fct="dot", scale=1.0, directions=("query_to_doc", "doc_to_query"),
          partition_mode="per_direction"), 1, 4),
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A one-layer BERT (hidden 16, no dropout) and a word-level tokenizer, saved to a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def tiny_model(folder, dtype):
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    encoder = Transformer(folder, max_seq_length=16)
    model = st.SentenceTransformer(modules=[encoder, Pooling(encoder.get_embedding_dimension(), "mean")],
                                   device="cpu")
    return model.to(dtype)


def _features(model, batch, negatives, seed):
    """Tokenised columns (anchor, positive, negative_1, ...) of ``batch`` rows drawn from TEXTS."""
    gen = torch.Generator().manual_seed(seed)
    columns = []
    for _ in range(2 + negatives):
        rows = torch.randint(0, len(TEXTS), (batch,), generator=gen).tolist()
        columns.append(model.preprocess([TEXTS[r] for r in rows]))
    return columns


def _similarity(kwargs):
    from sentence_transformers.util import cos_sim, dot_score

    kwargs = dict(kwargs)
    kwargs["similarity_fct"] = dot_score if kwargs.get("similarity_fct") == "dot" else cos_sim
    return kwargs


def _loss_and_grads(loss_cls, model, features, **kwargs):
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loss = loss_cls(model, **kwargs)(features, None)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    return loss.detach(), grads


class TestSentenceTransformersCompat:
    @pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
    @pytest.mark.parametrize("case", range(len(CASES)))
    def test_float64_matches_sentence_transformers(self, tiny_model_dir, case, cached):
        kwargs, negatives, batch = CASES[case]
        kwargs = _similarity(kwargs)
        model = tiny_model(tiny_model_dir, F64)
        features = _features(model, batch, negatives, seed=case)
        extra = {"mini_batch_size": 2} if cached else {}
        name = ("Cached" if cached else "") + "MultipleNegativesRankingLoss"
        want, want_grads = _loss_and_grads(getattr(theirs, name), model, features, **kwargs, **extra)
        got, grads = _loss_and_grads(getattr(ours, name), model, features, backend="cpu", **kwargs, **extra)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert len(grads) == len(want_grads) > 10
        for g, h in zip(grads, want_grads):
            torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-11)

    @pytest.mark.parametrize("case", [1, 6, 7])
    def test_float32_within_twice_sentence_transformers_error(self, tiny_model_dir, case):
        """float32: our loss's and gradients' error against sentence-transformers in float64 is at
        most twice sentence-transformers' own float32 error (plus a few float32 ulps)."""
        kwargs, negatives, batch = CASES[case]
        kwargs = _similarity(kwargs)
        exact = tiny_model(tiny_model_dir, F64)
        single = tiny_model(tiny_model_dir, torch.float32)
        features = _features(exact, batch, negatives, seed=100 + case)
        want, want_grads = _loss_and_grads(theirs.MultipleNegativesRankingLoss, exact, features, **kwargs)
        base, base_grads = _loss_and_grads(theirs.MultipleNegativesRankingLoss, single, features, **kwargs)
        got, grads = _loss_and_grads(ours.MultipleNegativesRankingLoss, single, features, backend="cpu", **kwargs)
        eps = torch.finfo(torch.float32).eps
        assert got.dtype == torch.float32
        assert_within(got, want, base, "loss", rtol=4 * eps)
        # a few ulps of the largest gradient: some parameters' gradients vanish analytically
        # (attention key biases), and there both errors are float32 noise on that scale
        scale = max(h.abs().max().item() for h in want_grads)
        for i, (g, h, b) in enumerate(zip(grads, want_grads, base_grads)):
            assert_within(g, h, b, f"gradient {i}", rtol=4 * eps, atol=4 * eps * scale)

    def test_symmetric_losses_match(self, tiny_model_dir):
        model = tiny_model(tiny_model_dir, F64)
        features = _features(model, 4, 1, seed=7)
        for name, extra in (("MultipleNegativesSymmetricRankingLoss", {}),
                            ("CachedMultipleNegativesSymmetricRankingLoss", {"mini_batch_size": 3})):
            want, want_grads = _loss_and_grads(getattr(theirs, name), model, features, scale=7.0, **extra)
            with pytest.warns(DeprecationWarning, match="deprecated"):
                getattr(ours, name)(model)
            got, grads = _loss_and_grads(getattr(ours, name), model, features, scale=7.0, **extra)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            for g, h in zip(grads, want_grads):
                torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-11)

    def test_cached_token_budget_and_no_grad(self, tiny_model_dir):
        """mini_batch_num_tokens splits by attended tokens; under no_grad the loss is returned
        without a graph and equals the plain loss."""
        model = tiny_model(tiny_model_dir, F64)
        features = _features(model, 5, 1, seed=3)
        want, want_grads = _loss_and_grads(ours.MultipleNegativesRankingLoss, model, features)
        got, grads = _loss_and_grads(ours.CachedMultipleNegativesRankingLoss, model, features,
                                     mini_batch_num_tokens=9)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for g, h in zip(grads, want_grads):
            torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-11)
        with torch.no_grad():
            value = ours.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)(features, None)
        assert not value.requires_grad and torch.allclose(value, want)
        assert ours._ranges(features[0], 32, 9)[0][0] == 0 and len(ours._ranges(features[0], 32, 9)) > 1

    def test_arguments_are_checked_as_sentence_transformers_checks_them(self, tiny_model_dir):
        model = tiny_model(tiny_model_dir, F64)
        with pytest.raises(ValueError, match="similarity_fct"):
            ours.MultipleNegativesRankingLoss(model, similarity_fct=lambda a, b: -torch.cdist(a, b))
        from sentence_transformers.util import manhattan_sim

        with pytest.raises(ValueError, match="cosine similarity"):
            ours.CachedMultipleNegativesRankingLoss(model, similarity_fct=manhattan_sim)
        ours.MultipleNegativesRankingLoss(model, similarity_fct=model.similarity)  # the model's cosine
        mirrored = [(dict(scale=0.0), "Scale must be a positive"), (dict(directions=()), "At least one direction"),
                    (dict(directions=("doc_to_query",)), "query_to_doc"),
                    (dict(directions=("query_to_doc", "sideways")), "Invalid directions"),
                    (dict(partition_mode="both"), "partition_mode"),
                    (dict(directions=GTE, partition_mode="per_direction"), "per_direction"),
                    (dict(hardness_mode="hardest"), "hardness_mode"),
                    (dict(hardness_mode="hard_negatives", hardness_strength=-1.0), "non-negative")]
        for kwargs, message in mirrored:  # refused by sentence-transformers too
            with pytest.raises(ValueError):
                theirs.MultipleNegativesRankingLoss(model, **kwargs)
        for kwargs, message in mirrored + [(dict(false_negative_margin=0.1, false_negative_ratio=0.9), "not both"),
                                           (dict(mini_batch_size=0), "mini_batch_size"),
                                           (dict(mini_batch_num_tokens=0), "mini_batch_num_tokens")]:
            with pytest.raises(ValueError, match=message):
                ours.CachedMultipleNegativesRankingLoss(model, **kwargs)
        loss = ours.MultipleNegativesRankingLoss(model)
        with pytest.raises(ValueError, match="at least 2"):
            loss.compute_loss_from_embeddings([torch.randn(3, 4)], None)
        assert loss.get_config_dict()["similarity_fct"] == "cos_sim" and loss.temperature == 1 / 20

    def test_worked_example_training_loop(self, tiny_model_dir):
        """docs/retrieval.md's loop: preprocess the columns, the drop-in loss with the filter, an
        optimiser step; the dropped fraction is there for logging."""
        model = tiny_model(tiny_model_dir, torch.float32)
        loss_fn = ours.MultipleNegativesRankingLoss(model, scale=20.0, false_negative_margin=0.1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        before = [p.detach().clone() for p in model.parameters()]
        model.train()
        for step in range(2):
            anchors, positives, negatives = (TEXTS[i::3][:3] for i in range(3))
            features = [model.preprocess(list(column)) for column in (anchors, positives, negatives)]
            loss = loss_fn(features, None)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            assert torch.isfinite(loss) and 0.0 <= float(loss_fn.last_dropped_fraction) <= 1.0
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))

    @pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
    def test_gloo_matches_sentence_transformers(self, tmp_path):
        """gather_across_devices over gloo, one world of 3 processes for every check (spawning
        costs seconds of imports per process): equal batches, each rank's loss and embedding
        gradients equal sentence-transformers' on that rank; uneven batches, the mean over ranks
        of the loss and the DDP-averaged gradients equal sentence-transformers' single-process
        whole batch; the native loss (hard negatives, pools, the filter with the hardness penalty,
        every backend; also in a group of 2) and the module and cached forms against one process,
        with the backward's traffic O(N) (see tests/retrieval_distributed_worker.py)."""
        from retrieval_distributed_worker import EQUAL, run, single_process

        mp.spawn(run, args=(len(EQUAL), str(tmp_path / "rendezvous"), single_process()), nprocs=len(EQUAL),
                 join=True)
