"""Helpers shared by the adapters (not public)."""

import functools
import inspect

import torch

import infonce_kernels as ik
# The package's private helpers the adapters use: the dtype the losses accumulate in, and the
# checked (z, B, 1/tau) of a two-view loss.
from infonce_kernels.losses._common import two_views  # noqa: F401  (re-exported for lightly's DCL)
from infonce_kernels.ops import accumulation_dtype as _lse_dtype

# The op's label rule (row_labels / key_labels / positive): skip every key of the row's class.
HAS_LABEL_OP = "row_labels" in inspect.signature(ik.lse).parameters


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.normalize(x, dim=-1)``, as the peer libraries call it (eps 1e-12),
    with the norm and the division in the accumulation dtype and the result in x's dtype: a
    float16/bfloat16 norm would scale whole rows by its rounding error (what the peers avoid under
    autocast, which computes the norm in float32)."""
    return torch.nn.functional.normalize(acc(x), dim=-1).to(x.dtype)


def acc(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype the losses accumulate in (float32, float64 for float64)."""
    return x.to(_lse_dtype(x.dtype))


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (acc(a) * acc(b)).sum(-1)


def _float32(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.element_size() < 4:
        return x.float()
    return x


def autocast_off(forward):
    """Run an adapter's ``forward`` as the peers run under ``torch.autocast``: autocast computes
    their normalisation and log-sum-exp in float32 (only their matmuls round to float16/bfloat16),
    so the adapter takes its float16/bfloat16 tensor arguments to float32 (the gradients flow
    back in their dtype) and runs with autocast disabled on their device: every adapter returns a
    float32 loss under autocast, at least as precise as the peer's. Without autocast the inputs
    are used in their dtype."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is None or not torch.is_autocast_enabled(x.device.type):
            return forward(self, *args, **kwargs)
        args = [_float32(a) for a in args]
        kwargs = {k: _float32(v) for k, v in kwargs.items()}
        with torch.autocast(x.device.type, enabled=False):
            return forward(self, *args, **kwargs)

    return wrapper


def precise_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean accumulated in float64, returned in x's dtype: a float32 mean of 2B near-equal
    values loses about log2(2B) bits, more than the per-row losses themselves carry."""
    return x.mean(dtype=torch.float64).to(x.dtype)


def world_size() -> int:
    """Processes in the default torch.distributed group (1 when it is not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def different_label_lse(q, q_labels, k, k_labels, scale, *, symmetric, backend, use_label_op=None):
    """(M,) ``log sum_{j : k_labels[j] != q_labels[i]} exp(scale <q_i, k_j>)``, -inf for a row
    without such a key, never materialising M x N.

    With the op's label rule when it exists; otherwise, exactly (no log-sum-exp differences):
    keys sorted by label, and each class's rows against the key ranges before and after their
    class (views, no copies), or, for classes of at most 2 keys, one call excluding those keys.
    ``symmetric``: q is k (and q_labels is k_labels).
    """
    use_label_op = HAS_LABEL_OP if use_label_op is None else use_label_op
    m, device = q.shape[0], q.device
    out = torch.full((m,), float("-inf"), dtype=_lse_dtype(q.dtype), device=device)
    uk, k_inv, k_counts = torch.unique(k_labels, return_inverse=True, return_counts=True)
    # rows whose every key has their label have no negative
    has_neg = ~((uk.numel() == 1) & (q_labels == uk[0]))
    if not bool(has_neg.any()):
        return out
    if use_label_op:
        if bool(has_neg.all()):
            if symmetric:
                return ik.lse(q, q, scale, symmetric=True, row_labels=q_labels, backend=backend)
            return ik.lse(q, k, scale, row_labels=q_labels, key_labels=k_labels, backend=backend)
        rows = has_neg.nonzero().flatten()
        return out.index_put((rows,), ik.lse(q[rows], k, scale, row_labels=q_labels[rows],
                                             key_labels=k_labels, backend=backend))
    # Fallback without the label rule.
    perm = torch.argsort(k_inv, stable=True)
    ks = k[perm]
    ends = torch.cumsum(k_counts, 0)
    starts = ends - k_counts
    pos = torch.searchsorted(uk, q_labels).clamp(max=uk.numel() - 1)
    present = uk[pos] == q_labels
    cls = torch.where(present, pos, -1)
    count = torch.where(present, k_counts[pos], 0)
    pieces, index = [], []
    absent = (~present).nonzero().flatten()
    if absent.numel():  # label not among the keys: every key is a negative
        pieces.append(ik.lse(q[absent], k, scale, backend=backend))
        index.append(absent)
    small = (present & (count <= 2)).nonzero().flatten()
    if small.numel():
        c = cls[small]
        first = perm[starts[c]]
        second = torch.where(count[small] == 2, perm[(starts[c] + 1).clamp(max=k.shape[0] - 1)], -1)
        keep = small[has_neg[small]]
        if keep.numel():
            sel = has_neg[small]
            ex = torch.stack([first[sel], second[sel]], 1)
            pieces.append(ik.lse(q[keep], k, scale, exclude=ex, backend=backend))
            index.append(keep)
    for c in torch.unique(cls[present & (count > 2)]).tolist():
        rows = (cls == c).nonzero().flatten()
        s, e = int(starts[c]), int(ends[c])
        qc = q[rows]
        parts = [ik.lse(qc, ks[:s], scale, backend=backend)] if s > 0 else []
        if e < k.shape[0]:
            parts.append(ik.lse(qc, ks[e:], scale, backend=backend))
        if parts:
            pieces.append(parts[0] if len(parts) == 1 else torch.logaddexp(parts[0], parts[1]))
            index.append(rows)
    if pieces:
        out = out.index_put((torch.cat(index),), torch.cat(pieces))
    return out
