"""Drop-in replacements for lightly's ``NTXentLoss``, ``DCLLoss`` and ``DCLWLoss``.

    from lightly.loss import NTXentLoss                          # before
    from infonce_kernels.compat.lightly import NTXentLoss        # after

Same constructor arguments, defaults, ``forward(out0, out1)`` and values as lightly (1.6):
inputs are L2-normalised, the loss is the mean over the 2B anchors (in-batch) or the B queries
(memory bank), and no N x N similarity matrix is built.

Memory bank (``memory_bank_size > 0``, MoCo style), as lightly: the negatives of query
``out0_i`` are the bank's rows (the past ``out1`` batches, no gradient), its positive is
``out1_i``; after the loss is computed, and only when ``out0`` requires a gradient, the
normalised ``out1`` is enqueued (a ring buffer that restarts at 0 once full, dropping the part
of the batch that does not fit); with ``gather_distributed=True`` over several processes, every
rank's ``out1`` is enqueued, in rank order, while the loss stays local. The bank starts as random unit vectors. ``memory_bank_size``
is lightly's ``(num_features, dim)`` tuple, or an int (older lightly: the feature size is taken
from the first batch).

``gather_distributed=True`` with several processes runs over every rank's embeddings through
:mod:`infonce_kernels.distributed`, with the values and gradients of lightly's gather (which
back-propagates): each rank returns the mean over its own anchors, whose negatives are the rows
of every rank. ``DCLWLoss``'s weights are computed on the rank's own batch, as in lightly. With
one process gathering is a no-op, as in lightly.
"""

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

import infonce_kernels as ik
from infonce_kernels import distributed

from ._common import acc, autocast_off, normalize, precise_mean, row_dot, two_views, world_size

__all__ = ["NTXentLoss", "DCLLoss", "DCLWLoss", "MemoryBank", "negative_mises_fisher_weights"]


_NO_DIST = ("gather_distributed is True but torch.distributed is not available. Please set "
            "gather_distributed=False or install a torch version with distributed support.")


def _check_gather(gather_distributed: bool) -> None:
    """lightly's constructor check (its tests patch ``torch.distributed.is_available``)."""
    if gather_distributed and not torch.distributed.is_available():
        raise ValueError(_NO_DIST)


class MemoryBank(nn.Module):
    """lightly's ``MemoryBankModule`` as its NT-Xent uses it: ``bank`` (size, dim), random unit
    rows at first, and ``bank_ptr``; ``enqueue(batch)`` writes a batch as a ring buffer that
    restarts at 0 once full (dropping what does not fit), every rank's batch in rank order when
    ``gather_distributed`` runs over several processes."""

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False):
        super().__init__()
        size = (size,) if isinstance(size, int) else tuple(size)
        if any(x < 0 for x in size) or len(size) not in (1, 2):
            raise ValueError(f"Illegal memory bank size {size}, expected a (num_features, dim) tuple or 0")
        self.size, self.gather_distributed = size, gather_distributed
        # an int size (older lightly) takes the feature size from the first batch
        self.register_buffer("bank", torch.empty(size if len(size) == 2 else 0), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(size) == 2 and size[0] > 0:
            self.init_bank(size[1], torch.device("cpu"))

    @torch.no_grad()
    def init_bank(self, dim: int, device) -> None:
        self.bank = normalize(torch.randn(self.size[0], dim, device=device))
        self.bank_ptr = torch.zeros(1, dtype=torch.long, device=device)

    @torch.no_grad()
    def enqueue(self, batch: Tensor) -> None:
        if self.gather_distributed and world_size() > 1:
            batch = distributed.gather_rows(batch, distributed.rank_rows(batch.shape[0], batch.device))
        size, b, ptr = self.size[0], batch.shape[0], int(self.bank_ptr)
        if ptr + b >= size:
            self.bank[ptr:] = batch[: size - ptr].detach().to(self.bank.dtype)
            self.bank_ptr.zero_()
        else:
            self.bank[ptr: ptr + b] = batch.detach().to(self.bank.dtype)
            self.bank_ptr[0] = ptr + b


def _centered_nt_xent(out0: Tensor, out1: Tensor, temperature: float, backend: str) -> Tensor:
    """NT-Xent of one process, any batch size and temperature sign, in the precision of a
    log-softmax over one row of logits.

    loss_i = lse_{j != i} s<z_i, z_j> - s<z_i, z_pos(i)> is unchanged when every key z_j is
    replaced by z_j - c (both terms drop s<z_i, c>). With c the batch's mean row (a constant, no
    gradient: the loss does not depend on it), near-identical embeddings, whose logits all round
    to about s with an error of s * 2^-24 each, become small differences computed almost exactly;
    without it the separately rounded positive logit does not cancel the one inside the
    log-sum-exp (lightly's correlated-embedding test). A negative temperature (lightly accepts
    it) is the positive scale |s| on the negated queries.
    """
    z = torch.cat([normalize(out0), normalize(out1)])
    b, s = out0.shape[0], 1.0 / temperature
    if b == 1:  # the positive is the only key: log-softmax of one logit, 0 with a zero gradient
        return acc(z).sum() * 0
    keys = z - z.detach().mean(0, keepdim=True)
    queries = z if s > 0 else -z
    index = torch.arange(2 * b, device=z.device)
    r = ik.lse(queries, keys, abs(s), exclude=index[:, None], backend=backend)
    pos = s * row_dot(z, keys[(index + b) % (2 * b)])
    return precise_mean(r - pos)


def _memory_bank_alias(name: str) -> property:
    """A read-write property forwarding to ``self.memory_bank.<name>``: lightly's NTXentLoss has
    ``bank`` and ``bank_ptr`` itself; here they are deprecated aliases."""

    def get(self) -> Tensor:
        return getattr(self.memory_bank, name)

    def set_(self, value: Tensor) -> None:
        setattr(self.memory_bank, name, value)

    return property(get, set_, doc="Deprecated alias of ``memory_bank.{}`` (lightly's attribute).".format(name))


class NTXentLoss(nn.Module):
    """lightly's ``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)``."""

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        self.memory_bank = MemoryBank(memory_bank_size, gather_distributed)
        if abs(temperature) < 1e-8:
            raise ValueError("Illegal temperature: abs({}) < 1e-8".format(temperature))
        _check_gather(gather_distributed)
        self.temperature = temperature
        self.memory_bank_size = self.memory_bank.size[0]
        self.gather_distributed = gather_distributed
        self.backend = backend

    bank = _memory_bank_alias("bank")
    bank_ptr = _memory_bank_alias("bank_ptr")

    @autocast_off
    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank_size == 0:
            if self.gather_distributed and world_size() > 1:
                if self.temperature < 0:
                    raise ValueError("NTXentLoss(gather_distributed=True) needs temperature > 0 in "
                                     "infonce_kernels.compat.lightly; use lightly's NTXentLoss for a negative one")
                # (world / 2N) * sum over this rank's anchors is lightly's local mean for equal
                # batches, with the same gradients
                return ik.nt_xent(out0, out1, self.temperature, backend=self.backend, gather_distributed=True)
            return _centered_nt_xent(out0, out1, self.temperature, self.backend)
        out0, out1 = normalize(out0), normalize(out1)
        bank = self.memory_bank
        if bank.bank.numel() == 0:
            bank.init_bank(out0.shape[1], out0.device)
        negatives = bank.bank.clone().detach().to(device=out0.device, dtype=out0.dtype)
        if out0.requires_grad:
            bank.enqueue(out1)
        # -log softmax of [pos, negatives] at row i, with the keys centred on the positive batch's
        # mean (see _centered_nt_xent): near-identical rows give differences, not rounded 1s
        s = 1.0 / self.temperature
        c = out1.detach().mean(0, keepdim=True)
        pos = s * row_dot(out0, out1 - c)
        neg = ik.lse(out0 if s > 0 else -out0, negatives - c, abs(s), backend=self.backend)
        return precise_mean(torch.logaddexp(pos, neg) - pos)

    def extra_repr(self):
        return (f"temperature={self.temperature}, memory_bank_size={self.memory_bank_size}, "
                f"backend={self.backend!r}")


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """lightly's DCLW weight: ``2 - B * softmax(<out0_i, out1_i> / sigma)``, without gradient."""
    similarity = row_dot(out0.detach(), out1.detach()) / sigma
    return 2 - out0.shape[0] * nn.functional.softmax(similarity, dim=0)


class DCLLoss(nn.Module):
    """lightly's ``DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False)``.

    Per anchor: ``-w_i <z_i, z_pos(i)>/tau + log sum_{j not in {i, pos(i)}} exp(<z_i, z_j>/tau)``
    (one log-sum-exp over the 2B - 2 negatives of both views, as lightly 1.6), mean over the 2B
    anchors. ``weight_fn(out0, out1)`` receives the normalised batches and weighs the positive
    term (with gradient, if the function has one), as in lightly.
    """

    def __init__(self, temperature: float = 0.1, weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        _check_gather(gather_distributed)
        self.temperature, self.weight_fn = temperature, weight_fn
        self.gather_distributed, self.backend = gather_distributed, backend

    @autocast_off
    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        out0, out1 = normalize(out0), normalize(out1)
        b = out0.shape[0]
        if b == 1 and not (self.gather_distributed and world_size() > 1):
            # no negative: lightly's log-sum-exp over an empty set, -inf
            z = torch.cat([out0, out1])
            r = torch.full((2,), float("-inf"), dtype=acc(z).dtype, device=z.device)
        elif self.gather_distributed and world_size() > 1:
            # every rank's [out0; out1] rows are keys; each row skips itself and its positive
            # (lightly's eye_rank mask), so its negatives are all other rows of both views
            z, _, scale = two_views(type(self).__name__, out0, out1, self.temperature, False, "mean", True)
            where = distributed.rank_rows(2 * b, z.device)
            r = distributed.gathered_lse(z, scale, *distributed.pair_exclusions(where, True), where,
                                         backend=self.backend)
        else:
            z = torch.cat([out0, out1])
            index = torch.arange(2 * b, device=z.device)
            exclude = torch.stack([index, (index + b) % (2 * b)], 1)  # {self, positive}
            r = ik.lse(z, z, 1.0 / self.temperature, exclude=exclude, symmetric=True, backend=self.backend)
        pos = row_dot(out0, out1) / self.temperature
        pos0, pos1 = pos, pos
        if self.weight_fn:
            pos0 = pos * acc(torch.as_tensor(self.weight_fn(out0, out1), device=z.device))
            pos1 = pos * acc(torch.as_tensor(self.weight_fn(out1, out0), device=z.device))
        return (r - torch.cat([pos0, pos1])).mean()

    def extra_repr(self):
        return f"temperature={self.temperature}, backend={self.backend!r}"


class DCLWLoss(DCLLoss):
    """lightly's ``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False, *,
                 backend: str = "auto"):
        super().__init__(temperature, weight_fn=lambda a, b: negative_mises_fisher_weights(a, b, sigma),
                         gather_distributed=gather_distributed, backend=backend)
        self.sigma = sigma
