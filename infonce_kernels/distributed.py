"""Contrastive losses over a batch spread across processes (torch.distributed; docs/design.md, "Distributed").

Each rank keeps its own rows as queries against the rows of every rank, all-gathered; memory per
rank is O(global N · d) and nothing O(local N × global N) exists.

Gradient traffic. The plain scheme all-gathers the keys with a gather whose backward
reduce-scatters their gradients: N×d floats in each direction. When the keys are rows of the
same loss (NT-Xent/SupCon/DCL: z against all z; CLIP: images against all texts and texts
against all images), the gradient of a rank's row a only needs every row's log-sum-exp r_j and
upstream gradient g_j:

    dz_a = s · Σ_j (g_a P_aj + g_j P_ja) z_j,   P_ja = exp(s <z_j, z_a> − r_j)

so these losses all-gather r in the forward and g in the backward (O(N) floats) and each rank
computes the complete gradient of its own rows (``lse_bwd_paired``); no N×d tensor goes back.
:func:`gathered_block_lse` does the same for losses made of several log-sum-exps over sets of
rows and keys (the retrieval losses: queries, documents, negatives): a key's gradient on its
owner rank needs every row's vector (gathered in the forward, also where the rows are not keys),
r, g, threshold and positive.

Loss convention. With ``gather_distributed=True`` a loss returns, on each rank,
``world_size / N_global · Σ_{local rows} loss_i`` for ``reduction="mean"`` (``world_size · Σ``
for "sum"; the per-row losses for "none"). Averaged over the ranks this is the loss of the whole
batch, and its gradients, after DistributedDataParallel averages them over the ranks, equal the
single-process gradients of the whole batch, for every parameter (the temperature too).

Gathering without gradients (``all_gather`` on detached tensors, as many SimCLR codebases do) is
wrong: each rank then back-propagates only through its own rows' terms, and the terms in which
its rows serve as another rank's negatives are lost, so the gradient is roughly 1/world of
the true one for the negatives' part (and DDP's averaging shrinks it further).
"""

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd import forward_ad

from . import ops
from .ops import Exclusion

if dist.is_available():
    # torch.distributed.nn.functional binds the default process group into default arguments
    # (group=group.WORLD) when it is first imported, and torch imports it lazily: torch._dynamo
    # does, on the first call of any torch.library custom op. Imported after init_process_group,
    # it keeps the default group alive past destroy_process_group, and that group's gloo worker
    # threads then race interpreter shutdown (std::terminate, SIGABRT at exit). Importing it
    # here, normally before any group exists, keeps destroy_process_group effective.
    import torch.distributed.nn.functional  # noqa: F401

__all__ = [
    "RankRows",
    "rank_rows",
    "gather_rows",
    "gather_rows_with_grad",
    "all_reduce_with_grad",
    "pair_exclusions",
    "gathered_lse",
    "gathered_lse_pair",
    "LseBlock",
    "LseCall",
    "gathered_block_lse",
    "scale_loss",
]


class RankRows:
    """Where this rank's rows sit in the concatenation of every rank's rows.

    Attributes: ``group``, ``world`` (ranks), ``rank``, ``sizes`` (rows per rank), ``offset``
    (index of this rank's first row), ``total`` (rows in all).
    """

    def __init__(self, group, sizes, rank):
        self.group, self.sizes, self.rank = group, sizes, rank
        self.world = len(sizes)
        self.offset = sum(sizes[:rank])
        self.total = sum(sizes)


def rank_rows(rows: int, device, group=None) -> RankRows:
    """Exchange row counts (one int per rank) and place this rank's ``rows`` in the gathered batch."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather_distributed=True needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    world = dist.get_world_size(group)
    count = torch.tensor([rows], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    return RankRows(group, [int(c) for c in counts], dist.get_rank(group))


def gather_rows(x: torch.Tensor, where: RankRows) -> torch.Tensor:
    """Concatenation over ranks of each rank's ``x`` (rows may differ per rank). No autograd."""
    largest = max(where.sizes)
    padded = x.new_zeros((largest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(where.world)]
    dist.all_gather(parts, padded.contiguous(), group=where.group)
    return torch.cat([p[:n] for p, n in zip(parts, where.sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """gather_rows whose backward hands each rank the sum over ranks of the gradient on its rows:
    a reduce-scatter of the (N, d) gradient."""

    @staticmethod
    def forward(ctx, x, where):
        ctx.where = where
        return gather_rows(x, where)

    @staticmethod
    def backward(ctx, grad):
        where = ctx.where
        largest = max(where.sizes)
        chunks = [torch.nn.functional.pad(c, (0, 0, 0, largest - c.shape[0])).contiguous()
                  for c in grad.split(where.sizes)]
        out = grad.new_empty((largest,) + tuple(grad.shape[1:]))
        dist.reduce_scatter(out, chunks, group=where.group)
        return out[: where.sizes[where.rank]], None


def _ordinary_autograd(*tensors) -> None:
    """The cross-process autograd here is reverse mode only: refuse torch.func transforms and
    forward-mode AD with one sentence instead of an error from inside them."""
    if torch.compiler.is_compiling():
        return
    if torch._C._are_functorch_transforms_active() or any(
            isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError("gather_distributed=True supports ordinary (reverse-mode) autograd only: torch.func "
                           "transforms (grad, vmap, jvp, ...) and forward-mode AD are not supported across "
                           "processes")


def gather_rows_with_grad(x: torch.Tensor, where: RankRows) -> torch.Tensor:
    """:func:`gather_rows` with the plain scheme's backward (N×d gradient traffic), for the
    asymmetric losses whose keys are not rows of the same loss."""
    _ordinary_autograd(x)
    return _GatherWithGrad.apply(x, where)


def pair_exclusions(where: RankRows, with_partner: bool):
    """Exclusions for ranks that each hold [view 1; view 2] of their samples (2b rows): every
    row excludes itself and, ``with_partner``, the other view of its sample. Returns this rank's
    and every row's :class:`~infonce_kernels.ops.Exclusion` (n and N rows), in gathered
    numbering, computed from the row counts alone (no collective)."""
    build = Exclusion.itself_and_partner if with_partner else Exclusion.itself
    every = torch.cat([build(size, "cpu", offset=offset, symmetric=False).exclude
                       for size, offset in zip(where.sizes, _offsets(where.sizes))])
    return Exclusion(every[where.offset: where.offset + where.sizes[where.rank]]), Exclusion(every)


def _offsets(sizes):
    return [sum(sizes[:rank]) for rank in range(len(sizes))]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward of a sum that every rank consumes is again a sum over ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group``; its backward sums the gradients over the ranks too."""
    _ordinary_autograd(x)
    return _AllReduceSum.apply(x, group)


class _GatheredSymmetricLSE(torch.autograd.Function):
    """r_a = lse_j(s <z_a, Z_j>) for this rank's rows z against all ranks' rows Z, with the
    one-sided O(N) backward of the module docstring."""

    @staticmethod
    def forward(ctx, z, scale, spec, all_spec, where, backend):
        all_z = gather_rows(z, where)
        r = ops.fused_lse(z, all_z, scale, spec, backend)
        all_r = gather_rows(r, where)
        ctx.save_for_backward(z, all_z, scale, r, all_r)
        ctx.specs, ctx.where, ctx.backend = (spec, all_spec), where, backend
        return r

    @staticmethod
    def backward(ctx, g):
        z, all_z, scale, r, all_r = ctx.saved_tensors
        spec, all_spec = ctx.specs
        all_g = gather_rows(g, ctx.where)
        dz, dscale = ops.lse_backward_paired(g, z, all_z, scale, spec, r, all_g, all_r, all_spec, ctx.where.offset,
                                             ctx.backend)
        return dz, dscale, None, None, None, None


def gathered_lse(z, scale, spec, all_spec, where: RankRows, *, backend="auto"):
    """(local N,) row log-sum-exp of this rank's rows ``z`` against every rank's rows.

    Args:
        z: (n, d) this rank's rows. scale: 0-d tensor (the accumulation dtype), may require grad.
        spec: this rank's rows' :class:`~infonce_kernels.ops.Exclusion`, keys numbered in the
            gathered batch (``where.offset + i`` is row i's own index); all_spec: the same for
            every rank's rows (the key side of the backward), e.g. from :func:`pair_exclusions`.
        where: from :func:`rank_rows`.
    """
    _ordinary_autograd(z, scale)
    name = ops.resolve_backend(backend, z.device)
    spec, all_spec = (Exclusion(s.exclude.to(z.device)) for s in (spec, all_spec))
    return _GatheredSymmetricLSE.apply(z, scale, spec, all_spec, where, name)


class _GatheredPairLSE(torch.autograd.Function):
    """CLIP's two directions over ranks: r = lse(a, all b), t = lse(b, all a), each side's
    gradient computed locally from the other side's gathered (lse, grad)."""

    @staticmethod
    def forward(ctx, a, b, scale, where, backend):
        all_a, all_b = gather_rows(a, where), gather_rows(b, where)
        none = Exclusion.none(a.shape[0], a.device)
        r = ops.fused_lse(a, all_b, scale, none, backend)
        t = ops.fused_lse(b, all_a, scale, none, backend)
        all_r, all_t = gather_rows(r, where), gather_rows(t, where)
        ctx.save_for_backward(a, b, all_a, all_b, scale, r, t, all_r, all_t)
        ctx.where, ctx.backend = where, backend
        return r, t

    @staticmethod
    def backward(ctx, g_r, g_t):
        a, b, all_a, all_b, scale, r, t, all_r, all_t = ctx.saved_tensors
        all_g_r, all_g_t = gather_rows(g_r, ctx.where), gather_rows(g_t, ctx.where)
        none, all_none = Exclusion.none(a.shape[0], a.device), Exclusion.none(ctx.where.total, a.device)
        offset = ctx.where.offset
        # a's rows against all b; every b row (as a row against all a) is the key side.
        da, ds_a = ops.lse_backward_paired(g_r, a, all_b, scale, none, r, all_g_t, all_t, all_none, offset,
                                           ctx.backend)
        db, ds_b = ops.lse_backward_paired(g_t, b, all_a, scale, none, t, all_g_r, all_r, all_none, offset,
                                           ctx.backend)
        return da, db, ds_a + ds_b, None, None


def gathered_lse_pair(a, b, scale, where: RankRows, *, backend="auto"):
    """(r, t): lse(a_i, all b) and lse(b_i, all a) for this rank's paired rows a, b (n, d)."""
    _ordinary_autograd(a, b, scale)
    name = ops.resolve_backend(backend, a.device)
    return _GatheredPairLSE.apply(a, b, scale, where, name)

class LseBlock(NamedTuple):
    """One block of the keys of an :class:`LseCall`: every rank's rows of the set ``keys``.

    ``labels``: the label rule's key labels, "ids" (each key's index in its set: with rows
    labelled by their own index, row i skips key i), a (rows of the set, all ranks) int64 tensor,
    or None (-1: every key kept). ``positive``: row i's designated positive is this block's key
    with row i's index (kept by the label rule, never dropped by the threshold rule)."""

    keys: str
    labels: object = None
    positive: bool = False


class LseCall(NamedTuple):
    """One fused log-sum-exp of a loss over sets of rows spread across the ranks: this rank's
    rows of the set ``rows`` (labelled by their index in the gathered set) against the
    concatenation of ``blocks``.

    ``scale``: 0-d tensor (may require grad); ``factor``: None or a float the gradients of the
    rows and keys (not the scale's) are multiplied by; ``threshold``: None or (n,) in logit units,
    this rank's rows' threshold rule; ``lse``: (n,) the forward's values, computed by the caller
    (rows whose every key was dropped hold -inf)."""

    rows: str
    blocks: tuple[LseBlock, ...]
    scale: torch.Tensor
    lse: torch.Tensor
    factor: float | None = None
    threshold: torch.Tensor | None = None


def _by_index(labels) -> bool:
    return isinstance(labels, str) and labels == "ids"


def _block_labels(block: LseBlock, total: int, device) -> torch.Tensor:
    """(total,) int64: the block's key labels over every rank's rows of its set."""
    if isinstance(block.labels, torch.Tensor):
        return block.labels
    if _by_index(block.labels):
        return torch.arange(total, device=device)
    return torch.full((total,), -1, dtype=torch.int64, device=device)


def _pairs_with(w, v) -> bool:
    """Whether the row side ``w`` = (call, block) and the key side ``v`` can share one paired
    pass: v's rows are w's keys and the other way round, the same scale and factor, and the label
    rule reads the same on both sides (every label is the vector's own index)."""
    (cw, bw), (cv, bv) = w, v
    return (cv.rows == bw.keys and bv.keys == cw.rows and cv.scale is cw.scale and cv.factor == cw.factor
            and _by_index(bw.labels) and _by_index(bv.labels))


def _gather_columns(columns, wheres):
    """``gather_rows`` of per-row vectors: ``columns[c]`` a list of (n_c,) tensors of call c,
    whose rows are placed by ``wheres[c]``; one all-gather per distinct RankRows (its columns
    stacked, in the first column's dtype). Returns the same nesting with every rank's rows."""
    out = [None] * len(columns)
    for where in {id(w): w for w in wheres}.values():
        members = [c for c, w in enumerate(wheres) if w is where]
        dtype = columns[members[0]][0].dtype
        stacked = torch.stack([t.to(dtype) for c in members for t in columns[c]], 1)
        every = gather_rows(stacked, where).unbind(1)
        start = 0
        for c in members:
            out[c], start = list(every[start: start + len(columns[c])]), start + len(columns[c])
    return out


class _GatheredBlockLSE(torch.autograd.Function):
    """The calls' log-sum-exps (their values computed by the caller) with the O(N) backward of
    :func:`gathered_block_lse`."""

    @staticmethod
    def forward(ctx, plan, *inputs):
        calls, names, wheres, _, _ = plan
        locals_, scales = inputs[:len(names)], inputs[len(names):]
        # every row's lse and threshold: O(N) floats, one gather per set of rows
        columns = [[c.lse.detach()] + ([] if c.threshold is None else [c.threshold.detach()]) for c in calls]
        gathered = _gather_columns(columns, [wheres[c.rows] for c in calls])
        ctx.plan, ctx.sides = plan, [(g[0], g[1] if len(g) > 1 else None) for g in gathered]
        ctx.save_for_backward(*locals_, *scales)
        return tuple(call.lse.detach().clone() for call in calls)

    @staticmethod
    def backward(ctx, *grads):
        calls, names, wheres, every, backend = ctx.plan
        saved = ctx.saved_tensors
        local = dict(zip(names, saved[:len(names)]))
        scales = saved[len(names):]
        lse, grad = [], []
        for call, g in zip(calls, grads):
            # Rows without a kept key (lse -inf) hold no term: their upstream gradient is 0.
            finite = torch.isfinite(call.lse)
            g = torch.zeros_like(call.lse) if g is None else g
            lse.append(torch.where(finite, call.lse, 0).detach())
            grad.append(torch.where(finite, g, 0).contiguous())
        every_g = [g[0] for g in _gather_columns([[g] for g in grad], [wheres[c.rows] for c in calls])]
        every_side = [(torch.where(torch.isfinite(r), r, 0), gr, t)
                      for (r, t), gr in zip(ctx.sides, every_g)]
        out = {name: torch.zeros_like(x) for name, x in local.items()}
        dscales = [torch.zeros_like(s) for s in scales]

        def run(x_name, y_name, w, v):
            """One paired pass: this rank's rows of set x against every rank's rows of set y;
            ``w`` (call index, block index) the row side, x's rows in that call against block y,
            ``v`` the key side, y's rows in that call against block x. A side that is None gets
            zero upstream gradients and a +inf log-sum-exp: every weight g exp(s<.,.> - r) of
            it is exactly 0 (the op layer has no one-sided pass; its exponentials are still
            evaluated)."""
            x, keys = local[x_name], every[y_name]
            if x.shape[0] == 0 or keys.shape[0] == 0:
                return
            wx, device = wheres[x_name], x.device
            n, total = x.shape[0], keys.shape[0]
            own, ids = wx.offset + torch.arange(n, device=device), torch.arange(total, device=device)
            call = calls[(w or v)[0]]
            scale, dtype = scales[(w or v)[0]], call.lse.dtype
            row_block = None if w is None else call.blocks[w[1]]
            key_block = None if v is None else calls[v[0]].blocks[v[1]]
            # The label rule only where a block's labels are not the vectors' own indices (own
            # negatives); "ids" labels are an exclusion list of one (the row's own index) or,
            # with the positive the row keeps, nothing.
            labelled = any(isinstance(blk.labels, torch.Tensor) for blk in (row_block, key_block) if blk)
            if w is not None:
                threshold, g, r = call.threshold, grad[w[0]], lse[w[0]]
                positive = own if row_block.positive else torch.full_like(own, -1)
                drop_own = _by_index(row_block.labels) and not row_block.positive
            else:
                threshold, g = None, torch.zeros(n, dtype=dtype, device=device)
                r, positive, drop_own = torch.full_like(g, float("inf")), torch.full_like(own, -1), False
            if v is not None:
                r_keys, g_keys, t_keys = every_side[v[0]]
                key_positive = ids if key_block.positive else torch.full_like(ids, -1)
                key_drop_own = _by_index(key_block.labels) and not key_block.positive
            else:
                g_keys, t_keys, key_drop_own = torch.zeros(total, dtype=dtype, device=device), None, False
                r_keys, key_positive = torch.full_like(g_keys, float("inf")), torch.full_like(ids, -1)
            exclude = own[:, None] if drop_own and not labelled else own.new_empty(n, 0)
            key_exclude = ids[:, None] if key_drop_own and not labelled else ids.new_empty(total, 0)
            if labelled:  # each side's labels: its block's, the rows of a call by their own index
                row_labels = own if w is not None else _block_labels(key_block, wx.total, device)[own]
                key_labels = _block_labels(row_block, total, device) if w is not None else ids
                spec = Exclusion(exclude, row_labels, key_labels, positive, threshold=threshold)
            else:
                spec = Exclusion(exclude, positive=None if threshold is None else positive, threshold=threshold)
            key_spec = spec.keys_as_rows(key_exclude, key_positive, t_keys)
            dx, dscale = ops.lse_backward_paired(g, x, keys, scale, spec, r, g_keys, r_keys, key_spec,
                                                 wx.offset, backend)
            out[x_name] += dx if call.factor is None else dx * call.factor
            if w is not None:
                dscales[w[0]] += dscale

        rows_side = [(c, b) for c, call in enumerate(calls) for b in range(len(call.blocks))]
        keys_side = list(rows_side)
        for w in rows_side:
            cw, bw = calls[w[0]], calls[w[0]].blocks[w[1]]
            v = next((v for v in keys_side if _pairs_with((cw, bw), (calls[v[0]], calls[v[0]].blocks[v[1]]))),
                     None)
            if v is not None:
                keys_side.remove(v)
            run(cw.rows, bw.keys, w, v)
        for v in keys_side:
            call = calls[v[0]]
            run(call.blocks[v[1]].keys, call.rows, None, v)
        return (None, *(out[name] for name in names), *dscales)


def gathered_block_lse(calls, local: dict, every: dict, wheres: dict, *, backend="auto"):
    """The log-sum-exps of ``calls`` (:class:`LseCall`) with an O(N) backward: each call's
    values (this rank's rows) with autograd to this rank's rows of every set and to the scales.

    A loss made of several fused log-sum-exps over sets of vectors spread across the ranks
    (retrieval: queries "q", documents "d", negatives "n"; each call: one set's rows against
    blocks of sets) gets, on each vector, the sum over every call of its gradient as a row
    and as a key. As a key of a call whose rows are every rank's rows X:

        dy_j = s Σ_i g_i exp(s <x_i, y_j> − r_i) x_i      (the pairs row i keeps)

    which its owner computes from X (gathered in the forward) and every row's r_i, g_i, threshold
    and positive: the forward gathers r and the thresholds, the backward gathers g (O(N) floats
    per call) and no N×d gradient is sent. Each (call, block) contributes one row side (the
    call's rows against the block) and one key side (the block's vectors against the call's
    rows); one paired pass (``ops.lse_backward_paired``) computes a row side and a key side that
    share the vectors, the scale and the label rule (e.g. query_to_doc's queries against
    documents with doc_to_query's documents against queries, or one set against itself), and a
    side without a partner runs alone, the other side's weights zero (zero upstream gradients,
    +inf log-sum-exps; the op layer has no one-sided pass, so that side's exponentials are
    evaluated for nothing: on the CPU backend such a pass costs about a whole dq + dk backward).
    The label rule runs only where a block's labels are not the vectors' own indices (own
    negatives); own-index labels become an exclusion list of one, or nothing with the positive.

    Args:
        calls: list of :class:`LseCall`, their ``lse`` computed by the caller on ``every``.
        local: set name -> this rank's rows (n_set, d), differentiable.
        every: set name -> every rank's rows (N_set, d) (``gather_rows`` of ``local``, no autograd).
        wheres: set name -> :class:`RankRows`. A block with ``positive`` needs its set and the
            call's rows numbered alike (one RankRows).
    Returns:
        a list, per call, of its (n,) log-sum-exps.
    """
    names = list(local)
    _ordinary_autograd(*local.values(), *(c.scale for c in calls))
    name = ops.resolve_backend(backend, next(iter(local.values())).device)
    plan = (list(calls), names, wheres, every, name)
    return list(_GatheredBlockLSE.apply(plan, *(local[n] for n in names), *(c.scale for c in calls)))


def scale_loss(per_row: torch.Tensor, reduction: str, where: RankRows) -> torch.Tensor:
    """This rank's share of the batch loss under the convention of the module docstring."""
    if reduction == "mean":
        return per_row.sum() * (where.world / where.total)
    if reduction == "sum":
        return per_row.sum() * where.world
    return per_row
