"""In-batch InfoNCE for text-embedding and retrieval training: hard negatives, the multi-direction
denominator (GTE's "improved contrastive loss", sentence-transformers' ``directions``), the
hardness penalty and false-negative filtering, as compositions of the fused row log-sum-exp.

Notation. B pairs (q_i, d_i) (query, positive document), optionally hard negatives: K per query,
n_ik (a (B, K, d) tensor, "own" negatives), or a flat pool of P keys shared by all queries.
With ``normalize`` the rows are unit vectors (cosine similarity); sim(x, y) = <x, y>; s = 1/tau.
The keys of the query_to_doc direction are every document, D = [d_1..d_B; every negative]; row
i's positive is d_i. Per query i, each selected direction contributes candidates:

    query_to_doc    s sim(q_i, x), x in D                      (holds the positive s sim(q_i, d_i))
    query_to_query  s sim(q_i, q_j), j != i
    doc_to_query    s sim(d_i, q_j), every j                   (holds s sim(d_i, q_i), the positive again)
    doc_to_doc      s sim(d_i, x), x in D but not d_i nor n_ik (the documents of query i)

    loss_i = log Z_i - s sim(q_i, d_i)
    Z_i    = sum over the candidates of every direction        (partition_mode="joint")
    log Z_i = mean over directions of log Z_i(direction)       ("per_direction": query_to_doc and
                                                                 doc_to_query only)

as sentence-transformers 6.2 computes it (so in the joint form with doc_to_query the positive
logit appears twice, once per direction that holds it, as in GTE's formula). Each log Z_i is a
log-sum-exp over a concatenation of key blocks, computed by :func:`~infonce_kernels.ops.fused_lse`
with the blocks' exclusions expressed by the label rule: rows are labelled by their query's
global index, a block's keys by their query's index (``ids``) or -1 (kept), so "row i skips
the keys of its own query" is one rule, except the designated positive. No B x B(1+K) matrix.

Hardness penalty (Lan et al. 2025; EmbeddingGemma), on query_to_doc only: a penalised candidate's
logit is ``s sim + a stop_grad(sim)``: its forward scale is s + a, its gradient scale s. The
penalised keys go through one fused log-sum-exp at scale s + a whose (q, k) gradients are
multiplied by s / (s + a) (:class:`_ScaleGrad`; the scale's own gradient is untouched). The
query's own documents (positive, own negatives) are O(B K d) and use plain autograd.

False-negative filtering (Qwen3-Embedding's margin, NV-Retriever's positive-aware ratio): with
``false_negative_margin=m`` a candidate x of query i is dropped when sim(., x) > sim(q_i, d_i) + m,
with ``false_negative_ratio=r`` when sim(., x) > r sim(q_i, d_i); in every direction, never the
positive itself (d_i in query_to_doc, q_i in doc_to_query). The kernels apply the rule as a
per-row logit threshold (``Exclusion.threshold``: dropped pairs add nothing and get exactly zero
gradient) and count the dropped pairs in the same sweep: the fraction is returned with
``return_dropped=True`` and kept by the module as ``last_dropped_fraction``.

Distributed (``gather_distributed=True``; batches may differ per rank): each rank's rows meet
every rank's queries, documents and negatives, all-gathered in the forward without autograd (the
queries too, even when no direction uses them as keys), with each call's per-row log-sum-exp and
threshold. The backward all-gathers each call's per-row upstream gradient, O(N) floats, and
nothing else, in every configuration: each rank computes the whole gradient of its own queries,
documents and negatives, as rows and as keys of every rank's rows
(:func:`infonce_kernels.distributed.gathered_block_lse`; the calls are described by the same
:class:`_Rows` as in one process, their labels and positives in the gathered numbering). Own
negatives are then ordered rank by rank (the order of a log-sum-exp's keys is immaterial) and
need the same K on every rank. The choice, against the plain gather whose backward
reduce-scatters the (B(1+K), d) document and negative gradients: B d floats more in the forward
(the queries) for B(1+K) d fewer in the backward (docs/retrieval.md).
"""

import math
import numbers

import torch

from .. import _validation as v
from .. import distributed
from ..ops import Exclusion, accumulation_dtype, fused_lse
from ._common import LossModule, inverse_temperature, l2_normalize, reduce_rows, row_dot, shared_doc

__all__ = ["retrieval_info_nce", "RetrievalInfoNCELoss", "SymmetricRetrievalInfoNCELoss", "DIRECTIONS",
           "PARTITION_MODES", "HARDNESS_MODES", "check_directions", "check_hardness", "check_filter"]

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
DEFAULT_TEMPERATURE = 0.05  # sentence-transformers' scale 20


def check_directions(directions, partition_mode) -> tuple:
    """The directions as a tuple, checked as sentence-transformers checks them."""
    if isinstance(directions, str):
        raise TypeError(f"directions must be a tuple of direction names, got the string {directions!r}")
    directions = tuple(directions)
    if not directions:
        raise ValueError("At least one direction must be specified (directions is empty).")
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"Invalid directions: {unknown}. Valid: {set(DIRECTIONS)}")
    if "query_to_doc" not in directions:
        raise ValueError("directions: 'query_to_doc' is required (it contains the positive pair).")
    if partition_mode not in PARTITION_MODES:
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError("partition_mode='per_direction' requires every direction's candidates to include the "
                         "positive pair; 'query_to_query' and 'doc_to_doc' never do. Use partition_mode='joint'.")
    return directions


def check_hardness(hardness_mode, hardness_strength) -> float:
    """The hardness strength as a float (0 when the mode is None)."""
    if hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be one of {HARDNESS_MODES}, got {hardness_mode!r}")
    if isinstance(hardness_strength, bool) or not isinstance(hardness_strength, numbers.Real):
        raise TypeError(f"hardness_strength must be a float, got {type(hardness_strength).__name__}")
    if not math.isfinite(hardness_strength) or hardness_strength < 0:
        raise ValueError(f"hardness_strength must be non-negative and finite, got {hardness_strength}")
    return 0.0 if hardness_mode is None else float(hardness_strength)


def check_filter(false_negative_margin, false_negative_ratio):
    """(kind, value): ("margin", m), ("ratio", r) or (None, None)."""
    if false_negative_margin is not None and false_negative_ratio is not None:
        raise ValueError("pass false_negative_margin or false_negative_ratio, not both")
    for name, value in (("false_negative_margin", false_negative_margin),
                        ("false_negative_ratio", false_negative_ratio)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value) or (name == "false_negative_ratio" and value <= 0):
            raise ValueError(f"{name} must be {'positive and ' if 'ratio' in name else ''}finite, got {value}")
        return name.rsplit("_", 1)[1], float(value)
    return None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by the constant ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _Sets:
    """The vectors of one loss evaluation, by set: "q" queries, "d" documents, "n" negatives
    (each query's own, flattened, or the shared pool). ``local``: this rank's rows; ``every``:
    every rank's (the same tensors in one process; gathered without autograd across processes);
    ``wheres``: their :class:`~infonce_kernels.distributed.RankRows`, None in one process;
    ``owner``: (rows of every "n",) the index of each own negative's query."""

    def __init__(self, local, every, wheres=None, owner=None):
        self.local, self.every, self.wheres, self.owner = local, every, wheres, owner

    def labels(self, name, labels):
        """A block's key labels as a tensor: "ids" (each key's index in its set), "owner", None."""
        if labels == "owner":
            return self.owner
        if labels == "ids":
            return torch.arange(self.every[name].shape[0], device=self.every[name].device)
        return labels


class _Rows:
    """The rows of one fused log-sum-exp: the local rows of set ``name`` ("q" or "d"), labelled
    by their index ``row_ids`` (b,), against the concatenation of key blocks, each every rank's
    rows of a set with key labels "ids" (the key's index), "owner" (own negatives: their
    query's index) or None (keep all)."""

    def __init__(self, sets, name, row_ids):
        self.sets, self.name, self.row_ids, self.blocks = sets, name, row_ids, []
        self.positive, self.positive_labelled = None, False

    def add(self, name, labels=None, *, positive=False):
        """Adds a block; ``positive``: row i's positive is the block's key ``row_ids[i]``
        (kept by the label rule and never dropped by the filter)."""
        keys = self.sets.every.get(name)
        if keys is None or keys.shape[0] == 0:
            return
        if labels == "owner" and self.sets.owner is None:  # a pool: nobody's own
            labels = None
        start = sum(self.sets.every[n].shape[0] for n, _, _ in self.blocks)
        if positive:
            self.positive, self.positive_labelled = start + self.row_ids, labels is not None
        self.blocks.append((name, labels, positive))

    def candidates(self) -> int:
        """Keys per row after the label rule (the same for every row)."""
        out = int(self.positive_labelled)  # the positive, labelled like its row, stays
        for name, labels, _ in self.blocks:
            own = 0 if labels is None else int((self.sets.labels(name, labels) == self.row_ids[:1]).sum())
            out += self.sets.every[name].shape[0] - own
        return out


class _Context:
    """What every fused call of one loss evaluation shares: the sets, backend, filter thresholds
    (in similarity units, per local row) and the dropped-pair tally."""

    def __init__(self, sets, backend, threshold):
        self.sets, self.backend, self.threshold = sets, backend, threshold
        self.dropped, self.candidates = [], 0  # candidates: pairs (row, key) the filter could see

    def logit_threshold(self, scale):
        """(b,) the filter's thresholds in logit units at ``scale``, or None without a filter."""
        return None if self.threshold is None else (scale.detach() * self.threshold).to(scale.dtype)

    def lse(self, rows: _Rows, scale, grad_factor=None):
        """(b,) log-sum-exp of ``rows`` at ``scale``; ``grad_factor``: multiply the (x, keys)
        gradients by it. None when the rows have no candidate. Across processes: the values
        only (no autograd; :meth:`terms` attaches the backward)."""
        per_row = rows.candidates()
        if per_row == 0:
            return None
        sets = self.sets
        x = sets.local[rows.name]
        keys = torch.cat([sets.every[n] for n, _, _ in rows.blocks]) if len(rows.blocks) > 1 \
            else sets.every[rows.blocks[0][0]]
        if sets.wheres is not None:
            x = x.detach()
        elif grad_factor is not None:
            x, keys = _ScaleGrad.apply(x, grad_factor), _ScaleGrad.apply(keys, grad_factor)
        m, device = x.shape[0], x.device
        labelled = any(labels is not None for _, labels, _ in rows.blocks)
        no_positive = torch.full((m,), -1, dtype=torch.int64, device=device)
        positive = no_positive if rows.positive is None else rows.positive
        fields = {}
        if labelled:
            key_labels = torch.cat([torch.full((sets.every[n].shape[0],), -1, dtype=torch.int64, device=device)
                                    if labels is None else sets.labels(n, labels) for n, labels, _ in rows.blocks])
            fields.update(row_labels=rows.row_ids, key_labels=key_labels, positive=positive)
        exclude = torch.empty(m, 0, dtype=torch.int64, device=device)
        self.candidates += per_row * m
        if self.threshold is None:
            return fused_lse(x, keys, scale, Exclusion(exclude, **fields), self.backend)
        fields.update(positive=positive, threshold=self.logit_threshold(scale))
        lse, dropped = fused_lse(x, keys, scale, Exclusion(exclude, **fields), self.backend, return_dropped=True)
        self.dropped.append(dropped.sum())
        empty = dropped == per_row
        if v.tracing() or not bool(empty.any()):
            return lse
        # Rows whose every candidate was dropped hold no term of this call (-inf): computed again
        # without them, since a row without keys is outside the op's contract (its gradient).
        kept = (~empty).nonzero().flatten()
        out = torch.full_like(lse, float("-inf"))
        if kept.numel():
            sub = {name: t if name == "key_labels" else t[kept] for name, t in fields.items()}
            out = out.index_put((kept,), fused_lse(x[kept], keys, scale, Exclusion(exclude[kept], **sub),
                                                   self.backend))
        return out

    def terms(self, calls):
        """Each call's (b,) log-sum-exp (None without candidates): ``calls`` a list of (rows,
        scale, gradient factor or None). Across processes every call's values come from
        :meth:`lse` and one :func:`~infonce_kernels.distributed.gathered_block_lse` attaches
        their O(N)-traffic backward."""
        if self.sets.wheres is None:
            return [self.lse(rows, scale, factor) if rows.blocks else None for rows, scale, factor in calls]
        with torch.no_grad():
            out = [self.lse(rows, scale, factor) if rows.blocks else None for rows, scale, factor in calls]
        made = [i for i, r in enumerate(out) if r is not None]
        blocks = [distributed.LseCall(
            calls[i][0].name,
            tuple(distributed.LseBlock(n, "ids" if labels == "ids" else self.sets.labels(n, labels), positive)
                  for n, labels, positive in calls[i][0].blocks),
            calls[i][1], out[i], None if calls[i][2] is None else float(calls[i][2]),
            self.logit_threshold(calls[i][1])) for i in made]
        attached = distributed.gathered_block_lse(blocks, self.sets.local, self.sets.every, self.sets.wheres,
                                                  backend=self.backend)
        for i, r in zip(made, attached):
            out[i] = r
        return out

    def drop_dense(self, sim, logits):
        """Own negatives' (b, K) logits with the filter applied (dropped: -inf, zero gradient)."""
        self.candidates += sim.numel()
        if self.threshold is None:
            return logits
        drop = sim.detach() > self.threshold[:, None]
        self.dropped.append(drop.sum())
        return logits.masked_fill(drop, float("-inf"))

    def dropped_fraction(self, dtype):
        if not self.dropped or self.candidates == 0:
            return torch.zeros((), dtype=dtype)
        return (torch.stack(self.dropped).sum().to(dtype) / self.candidates).detach()


def _check_inputs(query, positive_key, negative_keys):
    v.check_features("query", query)
    v.check_features("positive_key", positive_key)
    v.check_same_kind("query", query, "positive_key", positive_key, same_rows=True)
    tensors = {"query": query, "positive_key": positive_key}
    if negative_keys is None:
        return tensors, None
    if not isinstance(negative_keys, torch.Tensor):
        raise TypeError(f"negative_keys must be a torch.Tensor, got {type(negative_keys).__name__}")
    if negative_keys.dim() == 3:
        if negative_keys.shape[0] != query.shape[0]:
            raise ValueError(f"negative_keys of shape (B, K, d) must have B = {query.shape[0]} (one row of "
                             f"negatives per query), got shape {tuple(negative_keys.shape)}")
        if negative_keys.shape[2] == 0:
            raise ValueError("negative_keys has feature size 0")
        v.check_same_kind("query", query, "negative_keys", negative_keys.reshape(-1, negative_keys.shape[2]))
        kind = "own"
    elif negative_keys.dim() == 2:
        v.check_features("negative_keys", negative_keys, min_rows=0)
        v.check_same_kind("query", query, "negative_keys", negative_keys)
        kind = "pool"
    else:
        raise ValueError(f"negative_keys must be (B, K, d) (each query's own hard negatives) or (P, d) (a pool "
                         f"shared by every query), got shape {tuple(negative_keys.shape)}")
    if negative_keys.dtype not in v.FLOAT_DTYPES:
        raise TypeError(f"negative_keys must be float16, bfloat16, float32 or float64, got {negative_keys.dtype}")
    tensors["negative_keys"] = negative_keys
    return tensors, kind


@shared_doc
def retrieval_info_nce(query, positive_key, negative_keys=None, *, temperature=DEFAULT_TEMPERATURE,
                       directions=("query_to_doc",), partition_mode="joint", hardness_mode=None,
                       hardness_strength=0.0, false_negative_margin=None, false_negative_ratio=None,
                       normalize=True, reduction="mean", backend="auto", gather_distributed=False, group=None,
                       return_dropped=False):
    """In-batch InfoNCE with hard negatives and the multi-direction denominator (module docstring).

    Args:
        query: (B, d) queries (anchors); positive_key: (B, d), row i is query i's positive document.
        negative_keys: optional hard negatives: (B, K, d), K >= 0, each query's own negatives (every
            query also sees the others' as in-batch negatives, as sentence-transformers does), or
            (P, d), a pool shared by every query (no owner).
        temperature: $temperature Default 0.05 (sentence-transformers' ``scale=20``).
        directions: a tuple of "query_to_doc" (required), "query_to_query", "doc_to_query",
            "doc_to_doc".
        partition_mode: "joint" (one denominator) or "per_direction" (the mean of each direction's
            log-denominator; query_to_doc and doc_to_query only).
        hardness_mode: None, "in_batch_negatives" (every document of other queries),
            "hard_negatives" (the query's own negatives) or "all_negatives" (every candidate but
            the positive): those query_to_doc logits get ``hardness_strength * stop_grad(sim)``
            added (unscaled by the temperature).
        hardness_strength: a >= 0.
        false_negative_margin, false_negative_ratio: at most one: drop candidates whose similarity
            exceeds the positive's plus the margin, or times the ratio (module docstring).
        normalize: L2-normalise every row first (cosine similarity); False: dot product.
        reduction: "mean" | "sum" over the B queries, or "none" for (B,).
        backend: $backend
        gather_distributed: each rank's queries meet every rank's documents (and queries, for
            the query_to_query / doc_to_query directions) of ``group``; batch sizes may differ.
        return_dropped: also return the fraction of candidate pairs the filter dropped (a
            detached 0-d tensor; 0 without a filter), over this rank's rows.

    Returns:
        $returns With ``return_dropped``: (loss, dropped fraction).
    """
    directions = check_directions(directions, partition_mode)
    alpha = check_hardness(hardness_mode, hardness_strength)
    kind, level = check_filter(false_negative_margin, false_negative_ratio)
    tensors, negatives = _check_inputs(query, positive_key, negative_keys)
    v.check_reduction(reduction)
    tau, scale = inverse_temperature(temperature, query)
    v.check_values(tensors, inverse={"temperature": tau})

    b, device = query.shape[0], query.device
    q, d = query, positive_key
    neg = negative_keys if negatives is not None and negative_keys.shape[0] * negative_keys.shape[1] else None
    if normalize:
        q, d = l2_normalize(q), l2_normalize(d)
        if neg is not None:
            neg = l2_normalize(neg.reshape(-1, neg.shape[-1])).reshape(neg.shape)
    pos_sim = row_dot(q, d)
    pos = scale * pos_sim

    # Every rank's rows of each set: queries "q", documents "d", negatives "n" (flat).
    where = distributed.rank_rows(b, device, group) if gather_distributed else None
    offset = 0 if where is None else where.offset
    total = b if where is None else where.total
    row_ids = offset + torch.arange(b, device=device)
    all_ids = torch.arange(total, device=device)
    local, wheres, owner, own = {"q": q, "d": d}, {"q": where, "d": where}, None, None
    if negatives == "own" and neg is not None:
        k = neg.shape[1]
        own = neg
        if where is None:  # [n_1 of every query; n_2 ...], as sentence-transformers
            local["n"], owner = neg.transpose(0, 1).reshape(b * k, -1), all_ids.repeat(k)
        else:  # rank by rank, each rank's queries' n_1..n_K in turn
            local["n"], owner = neg.reshape(b * k, -1), all_ids.repeat_interleave(k)
            wheres["n"] = distributed.rank_rows(b * k, device, group)
            if wheres["n"].sizes != [k * size for size in where.sizes]:
                ks = [n // max(m, 1) for n, m in zip(wheres["n"].sizes, where.sizes)]
                raise ValueError("negative_keys of shape (B, K, d) must have the same K on every rank with "
                                 f"gather_distributed=True, got K = {ks}")
    elif negatives == "pool" and neg is not None:
        local["n"] = neg
        if where is not None:
            wheres["n"] = distributed.rank_rows(neg.shape[0], device, group)
    if where is None:
        sets = _Sets(local, local, owner=owner)
    else:  # gathered without autograd: the backward sends every row's upstream gradient, O(N)
        every = {name: distributed.gather_rows(x.detach(), wheres[name]) for name, x in local.items()}
        sets = _Sets(local, every, wheres, owner)

    threshold = None
    if kind == "margin":
        threshold = pos_sim.detach() + level
    elif kind == "ratio":
        threshold = pos_sim.detach() * level
    ctx = _Context(sets, backend, threshold)
    joint = partition_mode == "joint"

    # query_to_doc (with query_to_query in the same rows: they only occur in the joint form). The
    # penalised keys (hardness) form their own rows at scale s + a; the query's own documents, O(B K),
    # are dense logits.
    q_rows, penalised = _Rows(sets, "q", row_ids), _Rows(sets, "q", row_ids)
    q_terms = []  # (b, 1) log-terms and (b, K) logits, all candidates of query i in these directions
    own_sim = None if own is None else torch.einsum("bd,bkd->bk", q.to(pos.dtype), own.to(pos.dtype))
    if alpha == 0 or hardness_mode == "hard_negatives":
        q_rows.add("d", "ids", positive=True)
        if alpha == 0:
            q_rows.add("n")
        else:  # every document but the own negatives, whose logits carry the penalty
            q_rows.add("n", "owner")
            if own_sim is not None:
                q_terms.append(ctx.drop_dense(own_sim, scale * own_sim + alpha * own_sim.detach()))
    elif hardness_mode == "in_batch_negatives":  # the other queries' documents are penalised
        q_terms.append(pos[:, None])
        ctx.candidates += b
        if own_sim is not None:
            q_terms.append(ctx.drop_dense(own_sim, scale * own_sim))
        penalised.add("d", "ids")
        penalised.add("n", "owner")
    else:  # all_negatives: every document but the positive is penalised (own negatives among N)
        q_terms.append(pos[:, None])
        ctx.candidates += b
        penalised.add("d", "ids")
        penalised.add("n")
    if "query_to_query" in directions:
        q_rows.add("q", "ids")
    # doc_to_query and doc_to_doc: rows are the local positive documents
    d_rows = _Rows(sets, "d", row_ids)
    if "doc_to_query" in directions:
        d_rows.add("q", "ids", positive=True)
    if "doc_to_doc" in directions:
        d_rows.add("d", "ids")
        d_rows.add("n", "owner")
    factor = (scale / (scale + alpha)).detach()
    q_term, d_term, penalised_term = ctx.terms([(q_rows, scale, None), (d_rows, scale, None),
                                                (penalised, scale + alpha, factor)])
    for term in (q_term, penalised_term):
        if term is not None:
            q_terms.append(term[:, None])

    per_direction = [torch.logsumexp(torch.cat(q_terms, 1), 1)]
    if d_term is not None:
        per_direction.append(d_term)
    if joint:
        log_z = torch.logsumexp(torch.stack(per_direction, 1), 1) if len(per_direction) > 1 else per_direction[0]
    else:
        log_z = torch.stack(per_direction, 1).mean(1)
    loss = reduce_rows(log_z - pos, reduction, where)
    if return_dropped:
        return loss, ctx.dropped_fraction(pos.dtype)
    return loss


class RetrievalInfoNCELoss(LossModule):
    """Module form of :func:`retrieval_info_nce`:
    ``RetrievalInfoNCELoss(0.05, directions=...)(query, positive_key, negative_keys=None)``.
    After each call ``last_dropped_fraction`` holds the fraction of candidate pairs the
    false-negative filter dropped (a detached 0-d tensor; 0 without a filter)."""

    default_directions = ("query_to_doc",)
    default_partition_mode = "joint"

    def __init__(self, temperature=DEFAULT_TEMPERATURE, *, directions=None, partition_mode=None,
                 hardness_mode=None, hardness_strength=0.0, false_negative_margin=None, false_negative_ratio=None,
                 normalize=True, reduction="mean", backend="auto", gather_distributed=False, group=None):
        super().__init__(temperature, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, group=group)
        partition_mode = self.default_partition_mode if partition_mode is None else partition_mode
        self.directions = check_directions(self.default_directions if directions is None else directions,
                                           partition_mode)
        self.partition_mode = partition_mode
        check_hardness(hardness_mode, hardness_strength)
        check_filter(false_negative_margin, false_negative_ratio)
        self.hardness_mode, self.hardness_strength = hardness_mode, hardness_strength
        self.false_negative_margin, self.false_negative_ratio = false_negative_margin, false_negative_ratio
        self.last_dropped_fraction = None

    def forward(self, query, positive_key, negative_keys=None):
        loss, self.last_dropped_fraction = retrieval_info_nce(
            query, positive_key, negative_keys, temperature=self.temperature, directions=self.directions,
            partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength, false_negative_margin=self.false_negative_margin,
            false_negative_ratio=self.false_negative_ratio, return_dropped=True, **self.options())
        return loss

    def _settings(self):
        return f"directions={self.directions}, partition_mode={self.partition_mode!r}"


class SymmetricRetrievalInfoNCELoss(RetrievalInfoNCELoss):
    """:class:`RetrievalInfoNCELoss` with both directions, query->documents and document->queries,
    each its own softmax, averaged (sentence-transformers' symmetric ranking loss)."""

    default_directions = ("query_to_doc", "doc_to_query")
    default_partition_mode = "per_direction"
