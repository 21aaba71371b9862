"""Drop-in replacements for sentence-transformers' in-batch ranking losses (6.2).

    from sentence_transformers.losses import MultipleNegativesRankingLoss                  # before
    from infonce_kernels.compat.sentence_transformers import MultipleNegativesRankingLoss  # after

``MultipleNegativesRankingLoss``, ``MultipleNegativesSymmetricRankingLoss`` and their gradient-cache
forms ``CachedMultipleNegativesRankingLoss`` / ``CachedMultipleNegativesSymmetricRankingLoss``: the
installed version's constructor arguments (``model, scale, similarity_fct, gather_across_devices,
directions, partition_mode, hardness_mode, hardness_strength``; ``mini_batch_size,
mini_batch_num_tokens, show_progress_bar`` for the cached ones) and
``forward(sentence_features, labels)``, which embeds the columns (anchor, positive, negative_1, ...)
with the model as sentence-transformers does and computes the same loss through
:func:`infonce_kernels.retrieval_info_nce`: one fused log-sum-exp per row side, no
B x B(1+K) score matrix (values and parameter gradients equal to sentence-transformers').

``similarity_fct`` must be cosine (sentence-transformers' ``cos_sim``, this module's
:func:`cos_sim`, or a model's ``similarity`` with ``similarity_fn_name="cosine"``) or the dot
product (``dot_score`` / :func:`dot_score` / ``"dot"``); any other function is refused at
construction (the fused kernels compute scaled inner products only).

``gather_across_devices=True`` under torch.distributed: every rank's anchors meet every rank's
candidates; each rank's loss is its rows' share of the whole batch's loss (for equal batches, the
mean over its rows, as sentence-transformers returns) and its embeddings get the gradient of the
sum over ranks, so DistributedDataParallel's average is the gradient of the whole batch. Batches
may differ in size between ranks (sentence-transformers assumes equal ones). The backward sends
O(N) floats (each row's upstream gradient), not the N×d embedding gradients that
sentence-transformers' gather with gradients sends back; the forward gathers the anchors,
positives and negatives (docs/retrieval.md).

Extra keyword-only arguments: ``false_negative_margin`` / ``false_negative_ratio`` (false-negative
filtering, see :mod:`infonce_kernels.losses.retrieval`; after each call ``last_dropped_fraction``
holds the fraction of candidate pairs dropped) and ``backend`` (see :func:`infonce_kernels.lse`).

The cached forms follow sentence-transformers' gradient cache (and the recipe of
:mod:`infonce_kernels.grad_cache`): every column is embedded in mini-batches without a graph, the
loss and its gradient with respect to the embeddings are computed once on the whole batch, and
``loss.backward()`` re-embeds each mini-batch with a graph (with the random state of the first
pass) and back-propagates its slice of the cached gradient. The loss itself is computed in one
fused call, not in mini-batches of rows.
"""

import contextlib
import logging
import warnings

import torch
from torch import nn

from infonce_kernels import grad_cache
from infonce_kernels.losses.retrieval import check_directions, check_filter, check_hardness, retrieval_info_nce

from ._common import world_size

__all__ = ["MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss",
           "CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss", "cos_sim",
           "dot_score"]

logger = logging.getLogger(__name__)

SYMMETRIC = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}


def cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosine similarities of the rows of a and b (the default ``similarity_fct``)."""
    return nn.functional.normalize(a, dim=-1) @ nn.functional.normalize(b, dim=-1).T


def dot_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) dot products of the rows of a and b."""
    return a @ b.T


# sentence-transformers' similarity functions by name (sentence_transformers.util), and the
# similarity_fn_name of a model's bound ``similarity``: does the loss normalise the rows?
_ST_FUNCTIONS = {"cos_sim": True, "pytorch_cos_sim": True, "dot_score": False}
_MODEL_SIMILARITIES = {"cosine": True, "dot": False}


def _normalizes(similarity_fct) -> bool:
    """True for a cosine similarity, False for the dot product; anything else is refused."""
    if similarity_fct is cos_sim or similarity_fct is dot_score:
        return similarity_fct is cos_sim
    name = getattr(similarity_fct, "__name__", None)
    module = getattr(similarity_fct, "__module__", None) or ""
    if module.startswith("sentence_transformers") and name in _ST_FUNCTIONS:
        return _ST_FUNCTIONS[name]
    owner = getattr(similarity_fct, "__self__", None)
    if name == "similarity" and owner is not None and hasattr(owner, "similarity_fn_name"):
        fn_name = str(getattr(owner.similarity_fn_name, "value", owner.similarity_fn_name) or "cosine")
        if fn_name in _MODEL_SIMILARITIES:
            return _MODEL_SIMILARITIES[fn_name]
    raise ValueError(f"similarity_fct={similarity_fct!r} is not supported: the fused losses compute cosine "
                     "similarity (sentence_transformers.util.cos_sim) or the dot product "
                     "(sentence_transformers.util.dot_score) only; use sentence-transformers' own loss for "
                     "another similarity")


def _similarity_name(similarity_fct) -> str:
    return getattr(similarity_fct, "__name__", type(similarity_fct).__name__)


def _embed_columns(model, sentence_features):
    """One (B, d) embedding per column, computed as sentence-transformers' loss computes them
    (its ``embed_columns``, which embeds the candidate columns in one forward when they allow it);
    one forward per column where that helper is not importable."""
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:
        return [model(features)["sentence_embedding"] for features in sentence_features]
    return embed_columns(model, sentence_features)


class MultipleNegativesRankingLoss(nn.Module):
    """sentence-transformers' ``MultipleNegativesRankingLoss(model, scale=20.0, similarity_fct=cos_sim,
    gather_across_devices=False, directions=("query_to_doc",), partition_mode="joint",
    hardness_mode=None, hardness_strength=0.0)``."""

    def __init__(self, model, scale=20.0, similarity_fct=cos_sim, gather_across_devices=False,
                 directions=("query_to_doc",), partition_mode="joint", hardness_mode=None, hardness_strength=0.0,
                 *, false_negative_margin=None, false_negative_ratio=None, backend="auto"):
        super().__init__()
        self.model = model
        if not scale > 0:
            raise ValueError("Scale must be a positive value.")
        self.scale = scale
        self.normalize = _normalizes(similarity_fct)
        self.similarity_fct = similarity_fct
        self.gather_across_devices = gather_across_devices
        self.directions = check_directions(directions, partition_mode)
        self.partition_mode = partition_mode
        check_hardness(hardness_mode, hardness_strength)
        self.hardness_mode, self.hardness_strength = hardness_mode, hardness_strength
        if hardness_mode is not None and hardness_strength == 0.0:
            logger.warning(f"hardness_mode={hardness_mode!r} is set but hardness_strength=0.0, so hardness weighting "
                           "has no effect. Set hardness_strength to a positive value to enable hardness weighting.")
        check_filter(false_negative_margin, false_negative_ratio)
        self.false_negative_margin, self.false_negative_ratio = false_negative_margin, false_negative_ratio
        self.backend = backend
        self.last_dropped_fraction = None

    def forward(self, sentence_features, labels):
        return self.compute_loss_from_embeddings(_embed_columns(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings, labels=None):
        """The loss of the columns' embeddings [anchors (B, d), positives (B, d), negatives_1 (B, d), ...]."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        negatives = torch.stack(list(embeddings[2:]), 1) if len(embeddings) > 2 else None
        loss, self.last_dropped_fraction = retrieval_info_nce(
            embeddings[0], embeddings[1], negatives, temperature=1.0 / self.scale, directions=self.directions,
            partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength, false_negative_margin=self.false_negative_margin,
            false_negative_ratio=self.false_negative_ratio, normalize=self.normalize, backend=self.backend,
            gather_distributed=bool(self.gather_across_devices) and world_size() > 1, return_dropped=True)
        return loss

    def get_config_dict(self):
        return {"scale": self.scale, "similarity_fct": _similarity_name(self.similarity_fct),
                "gather_across_devices": self.gather_across_devices, "directions": self.directions,
                "partition_mode": self.partition_mode, "hardness_mode": self.hardness_mode,
                "hardness_strength": self.hardness_strength}

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' (deprecated) ``MultipleNegativesSymmetricRankingLoss(model, scale=20.0,
    similarity_fct=cos_sim, gather_across_devices=False)``: directions query_to_doc and
    doc_to_query, per_direction."""

    def __init__(self, model, scale=20.0, similarity_fct=cos_sim, gather_across_devices=False, *,
                 false_negative_margin=None, false_negative_ratio=None, backend="auto"):
        warnings.warn("MultipleNegativesSymmetricRankingLoss is deprecated in sentence-transformers: use "
                      "MultipleNegativesRankingLoss(directions=('query_to_doc', 'doc_to_query'), "
                      "partition_mode='per_direction')", DeprecationWarning, stacklevel=2)
        super().__init__(model, scale, similarity_fct, gather_across_devices, **SYMMETRIC,
                         false_negative_margin=false_negative_margin, false_negative_ratio=false_negative_ratio,
                         backend=backend)


# ------------------------------------------------------------------------- gradient caching
def _batch_size(features: dict) -> int:
    for key in ("input_ids", "attention_mask"):
        if isinstance(features.get(key), torch.Tensor):
            return features[key].shape[0]
    return next(t.shape[0] for t in features.values() if isinstance(t, torch.Tensor) and t.dim() > 0)


def _ranges(features: dict, mini_batch_size: int, mini_batch_num_tokens):
    """[(begin, end)] of the mini-batches: ``mini_batch_size`` rows each, or, with
    ``mini_batch_num_tokens``, as many rows as fit that many attended tokens (at least one)."""
    rows = _batch_size(features)
    if mini_batch_num_tokens is None:
        return [(b, min(b + mini_batch_size, rows)) for b in range(0, rows, mini_batch_size)]
    if "attention_mask" not in features:
        raise ValueError("mini_batch_num_tokens needs the inputs' attention_mask (per-sequence token counts); "
                         "use mini_batch_size instead")
    tokens = features["attention_mask"].sum(1).tolist()
    out, begin = [], 0
    while begin < rows:
        end, used = begin, 0
        while end < rows and (end == begin or used + tokens[end] <= mini_batch_num_tokens):
            used += tokens[end]
            end += 1
        out.append((begin, end))
        begin = end
    return out


def _slice(features: dict, begin: int, end: int, rows: int) -> dict:
    """Rows [begin, end) of every tensor indexed by sample (first dimension ``rows``); other values as given."""
    return {k: t[begin:end] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows else t
            for k, t in features.items()}


def _ddp(model):
    m = getattr(model, "_orig_mod", model)
    return m if isinstance(m, nn.parallel.DistributedDataParallel) else None


def _progress(items, show, what):
    if not show:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=what)


class CachedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss(model, scale=20.0,
    similarity_fct=cos_sim, mini_batch_size=32, mini_batch_num_tokens=None,
    gather_across_devices=False, directions=("query_to_doc",), partition_mode="joint",
    show_progress_bar=False, hardness_mode=None, hardness_strength=0.0)``: the same loss with
    gradient caching (module docstring); ``forward`` returns the loss, whose ``backward()``
    accumulates the parameter gradients mini-batch by mini-batch."""

    uses_gradient_cache = True

    def __init__(self, model, scale=20.0, similarity_fct=cos_sim, mini_batch_size=32, mini_batch_num_tokens=None,
                 gather_across_devices=False, directions=("query_to_doc",), partition_mode="joint",
                 show_progress_bar=False, hardness_mode=None, hardness_strength=0.0, *, false_negative_margin=None,
                 false_negative_ratio=None, backend="auto"):
        super().__init__(model, scale, similarity_fct, gather_across_devices, directions, partition_mode,
                         hardness_mode, hardness_strength, false_negative_margin=false_negative_margin,
                         false_negative_ratio=false_negative_ratio, backend=backend)
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        if mini_batch_num_tokens is not None and (not isinstance(mini_batch_num_tokens, int)
                                                  or mini_batch_num_tokens <= 0):
            raise ValueError("mini_batch_num_tokens must be a positive integer or None.")
        self.mini_batch_size, self.mini_batch_num_tokens = mini_batch_size, mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar

    def calculate_loss(self, reps, labels=None, *, with_backward=False):
        """The loss of the mini-batch embeddings ``reps`` (one list of (b, d) tensors per column);
        ``with_backward``: back-propagate it to them (their ``.grad``) and return it detached."""
        loss = self.compute_loss_from_embeddings([torch.cat(column) for column in reps], labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features, labels):
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(features)}")
        ranges = [_ranges(f, self.mini_batch_size, self.mini_batch_num_tokens) for f in features]
        rows = [_batch_size(f) for f in features]
        grad_enabled = torch.is_grad_enabled()
        devices = grad_cache._cuda_devices(
            [self.model], [tuple(t for t in f.values() if isinstance(t, torch.Tensor)) for f in features])
        # pass 1: embeddings without a graph, the random state before each mini-batch
        reps, states = [], []
        with torch.no_grad():
            for f, n, column in zip(features, rows, ranges):
                reps.append([]), states.append([])
                for begin, end in _progress(column, self.show_progress_bar, "Embed mini-batches"):
                    states[-1].append(grad_cache._rng_state(devices))
                    z = self.model(_slice(f, begin, end, n))["sentence_embedding"]
                    reps[-1].append(z.detach().requires_grad_(grad_enabled))
        if not grad_enabled:
            return self.calculate_loss(reps, labels)
        # pass 2: the loss once, and its gradient with respect to the embeddings (the cache)
        loss = self.calculate_loss(reps, labels, with_backward=True)
        cache = [[z.grad for z in column] for column in reps]
        unused = [str(i) for i, column in enumerate(cache) if any(g is None for g in column)]
        if unused:
            raise ValueError(f"The loss did not use input column(s) {', '.join(unused)}: remove them from the dataset")
        loss = loss.requires_grad_()
        loss.register_hook(lambda grad: self._replay(grad, features, rows, ranges, states, cache, devices))
        return loss

    def _replay(self, grad_output, features, rows, ranges, states, cache, devices):
        """pass 3 (at ``loss.backward()``): each mini-batch again with a graph, back-propagating its
        slice of the cached gradient times ``grad_output``; a DistributedDataParallel model
        synchronises on the last one only."""
        ddp = _ddp(self.model)
        remaining = sum(len(column) for column in ranges)
        with torch.enable_grad(), torch.random.fork_rng(devices=devices):
            for f, n, column, column_states, grads in zip(features, rows, ranges, states, cache):
                for (begin, end), state, g in zip(column, column_states, grads):
                    remaining -= 1
                    grad_cache._set_rng_state(state, devices)
                    sync = ddp is None or remaining == 0
                    with contextlib.nullcontext() if sync else ddp.no_sync():
                        z = self.model(_slice(f, begin, end, n))["sentence_embedding"]
                        torch.autograd.backward(z, (g * grad_output).to(z.dtype))

    def get_config_dict(self):
        config = super().get_config_dict()
        config.update(mini_batch_size=self.mini_batch_size, mini_batch_num_tokens=self.mini_batch_num_tokens)
        return config


class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    """sentence-transformers' (deprecated) ``CachedMultipleNegativesSymmetricRankingLoss(model,
    scale=20.0, similarity_fct=cos_sim, mini_batch_size=32, mini_batch_num_tokens=None,
    gather_across_devices=False, show_progress_bar=False)``."""

    def __init__(self, model, scale=20.0, similarity_fct=cos_sim, mini_batch_size=32, mini_batch_num_tokens=None,
                 gather_across_devices=False, show_progress_bar=False, *, false_negative_margin=None,
                 false_negative_ratio=None, backend="auto"):
        warnings.warn("CachedMultipleNegativesSymmetricRankingLoss is deprecated in sentence-transformers: use "
                      "CachedMultipleNegativesRankingLoss(directions=('query_to_doc', 'doc_to_query'), "
                      "partition_mode='per_direction')", DeprecationWarning, stacklevel=2)
        super().__init__(model, scale, similarity_fct, mini_batch_size, mini_batch_num_tokens, gather_across_devices,
                         show_progress_bar=show_progress_bar, false_negative_margin=false_negative_margin,
                         false_negative_ratio=false_negative_ratio, backend=backend, **SYMMETRIC)
