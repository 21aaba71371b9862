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


def scale_loss(per_row: torch.Tensor, reduction: str, where: RankRows) -> torch.Tensor:
    """This rank's share of the batch loss under the convention of the module docstring."""
    if reduction == "mean":
        return per_row.sum() * (where.world / where.total)
    if reduction == "sum":
        return per_row.sum() * where.world
    return per_row
