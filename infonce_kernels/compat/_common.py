"""Helpers shared by the adapters (not public)."""

import inspect

import torch

import infonce_kernels as ik
from infonce_kernels.ops import accumulation_dtype as _lse_dtype

# The op's label rule (row_labels / key_labels / positive): skip every key of the row's class.
HAS_LABEL_OP = "row_labels" in inspect.signature(ik.lse).parameters


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.normalize(x, dim=-1)``, as the peer libraries call it (eps 1e-12)."""
    return torch.nn.functional.normalize(x, dim=-1)


def acc(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype the losses accumulate in (float32, float64 for float64)."""
    return x.to(_lse_dtype(x.dtype))


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (acc(a) * acc(b)).sum(-1)


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
