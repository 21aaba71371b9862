"""False-negative filtering inside the kernels (the threshold rule of Exclusion): row i also drops
key j when s <q_i, k_j> > threshold[i], except its positive.

Every backend against a per-pair float64 oracle written out here (loops over the pairs,
independent of Exclusion.mask): values, the dropped count, gradients (general, symmetric, paired),
exact zero gradients of dropped pairs, the positive kept above the threshold, +inf equal to no
threshold bit for bit (cpu), forward-mode AD, and the bad-input errors.

Thresholds are drawn between two well separated logits of their row (never within rounding of a
logit), so every backend, whatever the order of its sums, drops the same pairs.
"""

import pytest
import torch

import infonce_kernels as ik
from harness import ALL_CPU_BACKENDS, F64, accumulation_dtype, assert_within, lse_grads, sample_exclude, \
    sample_labels
from infonce_kernels.ops import Exclusion, fused_lse, paired_backward

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in ALL_CPU_BACKENDS]
SCALE = 2.5


# --------------------------------------------------------------------------------- the oracle
def pairwise_rule(logits, exclude, labels, positive, threshold):
    """(kept (M, N) bool, dropped (M,) int): the exclusion rule pair by pair on float64 logits."""
    m, n = logits.shape
    kept = torch.ones(m, n, dtype=torch.bool)
    dropped = torch.zeros(m, dtype=torch.int64)
    for i in range(m):
        for j in range(n):
            listed = exclude is not None and j in exclude[i].tolist()
            by_label = labels is not None and int(labels[0][i]) == int(labels[1][j]) and int(positive[i]) != j
            by_threshold = (threshold is not None and float(logits[i, j]) > float(threshold[i])
                            and int(positive[i]) != j)
            kept[i, j] = not (listed or by_label or by_threshold)
            dropped[i] += int(by_threshold and not (listed or by_label))
    return kept, dropped


def dense(kept, dtype=F64):
    """fn(q, k, s) for lse_grads: the materialised log-sum-exp over the fixed ``kept`` pairs."""
    def fn(q, k, s):
        logits = (q.to(dtype) @ k.to(dtype).T) * s.to(dtype)
        return torch.logsumexp(logits.masked_fill(~kept, float("-inf")), dim=1)
    return fn


def between_logits(logits, gen, *, above_positive=None):
    """(M,) thresholds, each halfway between two consecutive sorted logits of its row that are
    at least 0.05 apart (fp32 rounding never crosses it); ``above_positive`` (M,) positives
    whose logit the threshold must be below (so the rule would drop them)."""
    out = []
    for i, row in enumerate(logits):
        values = row.sort().values
        gaps = values[1:] - values[:-1]
        ranks = [r for r in range(len(gaps)) if gaps[r] > 0.05]
        if above_positive is not None:  # the positive above: threshold under its logit
            ranks = [r for r in ranks if values[r + 1] <= row[above_positive[i]]] or ranks
        r = ranks[int(torch.randint(len(ranks), (1,), generator=gen))]
        out.append((values[r] + values[r + 1]) / 2)
    return torch.stack(out)


def sample(m, n, d, dtype, *, seed, symmetric=False, width=0, classes=0, positive_above=False):
    """Fresh inputs: q, k (k is q when symmetric), scale, exclude, labels, positive, threshold
    (one row +inf, the rest between logits), g, and the oracle's kept mask and dropped count."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(m, d, generator=gen, dtype=F64).to(dtype)
    k = q if symmetric else torch.randn(n, d, generator=gen, dtype=F64).to(dtype)
    n = k.shape[0]
    exclude = sample_exclude(m, n, width, symmetric, gen) if width else None
    labels = sample_labels(m, n, classes, symmetric, gen) if classes else None
    positive = labels[2] if labels is not None else torch.randint(0, n, (m,), generator=gen)
    logits = SCALE * (q.double() @ k.double().T)
    threshold = between_logits(logits, gen, above_positive=positive if positive_above else None)
    threshold[m // 2] = float("inf")
    threshold = threshold.to(accumulation_dtype(dtype))
    kept, dropped = pairwise_rule(logits, exclude, labels, positive, threshold.double())
    if not kept.any(1).all():  # a row without a positive (-1) that lost every key: no threshold there
        threshold[~kept.any(1)] = float("inf")
        kept, dropped = pairwise_rule(logits, exclude, labels, positive, threshold.double())
    return dict(q=q, k=k, exclude=exclude, labels=labels, positive=positive, threshold=threshold,
                g=torch.randn(m, generator=gen, dtype=F64), kept=kept, dropped=dropped, symmetric=symmetric,
                scale=torch.tensor(SCALE, dtype=accumulation_dtype(dtype)))


def spec_of(c, **override):
    """The case's Exclusion."""
    m = c["q"].shape[0]
    exclude = c["exclude"] if c["exclude"] is not None else torch.empty(m, 0, dtype=torch.int64, device=c["q"].device)
    labels = c["labels"][:2] if c["labels"] is not None else (None, None)
    fields = dict(positive=c["positive"], threshold=c["threshold"], symmetric=c["symmetric"])
    fields.update(override)
    return Exclusion(exclude, *labels, **fields)


def public_lse(c, backend):
    """fn(q, k, s) for lse_grads: ik.lse with the case's rules."""
    lab = {} if c["labels"] is None else dict(row_labels=c["labels"][0], key_labels=c["labels"][1])
    return lambda q, k, s: ik.lse(q, k, s, exclude=c["exclude"], symmetric=c["symmetric"], positive=c["positive"],
                                  threshold=c["threshold"], backend=backend, **lab)


LAYOUTS = {  # name: sample() options
    "plain": dict(),
    "listed+labels": dict(width=2, classes=3),
    "symmetric": dict(symmetric=True, width=1),
    "symmetric+labels": dict(symmetric=True, classes=3),
}


# ------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_gradients_and_dropped_count_match_the_pairwise_oracle(backend, dtype, layout):
    c = sample(11, 13, 6, dtype, seed=2 * list(LAYOUTS).index(layout) + (dtype == F64), **LAYOUTS[layout])
    q, k, s, g, sym = c["q"], c["k"], c["scale"], c["g"], c["symmetric"]
    got = lse_grads(public_lse(c, backend), q, k, s, g, sym)
    ref = lse_grads(dense(c["kept"]), q, k, s, g, sym)
    same = lse_grads(dense(c["kept"], dtype), q, k, s, g, sym)
    rtol = 1e-12 if dtype == F64 else 1e-6
    for name, a, b, base in zip(("lse", "dq", "dk", "dscale"), got, ref, same):
        if a is not None:
            assert_within(a, b, base, f"{backend} {name}", rtol=rtol)
    lse, dropped = fused_lse(q, k, s, spec_of(c), backend, return_dropped=True)
    assert dropped.dtype == torch.int32 and dropped.shape == (q.shape[0],)
    assert torch.equal(dropped.long(), c["dropped"])
    assert c["dropped"].sum() > 0 and c["dropped"][q.shape[0] // 2] == 0  # +inf row: nothing dropped
    torch.testing.assert_close(lse, got[0], rtol=0, atol=0)


CUDA_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in ik.available_backends("cuda")]


def on_cuda(c):
    """The case's tensors on the CUDA device (k stays q when symmetric)."""
    out = {name: v.cuda() if torch.is_tensor(v) else tuple(t.cuda() for t in v) if isinstance(v, tuple) else v
           for name, v in c.items()}
    if c["symmetric"]:
        out["k"] = out["q"]
    return out


@pytest.mark.skipif(not CUDA_BACKENDS, reason="needs a CUDA device")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16], ids=["f64", "f32", "f16"])
def test_cuda_device_backends_match_the_pairwise_oracle(dtype, layout):
    """The kernel backends on CUDA tensors, over several row and key tiles (70 x 150 pairs)."""
    c = on_cuda(sample(70, 150, 40, dtype, seed=40 + list(LAYOUTS).index(layout), **LAYOUTS[layout]))
    q, k, s, g, sym, kept = c["q"], c["k"], c["scale"], c["g"], c["symmetric"], c["kept"]
    ref = lse_grads(dense(kept), q, k, s, g, sym)
    same = lse_grads(dense(kept, dtype), q, k, s, g, sym)
    for backend in CUDA_BACKENDS:
        got = lse_grads(public_lse(c, backend), q, k, s, g, sym)
        for name, a, b, base in zip(("lse", "dq", "dk", "dscale"), got, ref, same):
            if a is not None:
                assert_within(a, b, base, f"{backend} {name}", rtol=1e-12 if dtype == F64 else 1e-5)
        _, dropped = fused_lse(q, k, s, spec_of(c), backend, return_dropped=True)
        assert torch.equal(dropped.long().cpu(), c["dropped"].cpu()), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_pairs_get_exactly_zero_gradient(backend):
    """Key j dropped by every row (threshold just under its logit, nobody's positive): dk_j is 0
    exactly; symmetric, row j with zero upstream gradient and dropped by every row: dz_j is 0."""
    gen = torch.Generator().manual_seed(5)
    for symmetric in (False, True):
        m, j = 9, 4
        q = torch.randn(m, 5, generator=gen, dtype=F64)
        k = q if symmetric else torch.randn(m + 2, 5, generator=gen, dtype=F64)
        logits = SCALE * q @ k.T
        below = torch.where(logits < logits[:, j:j + 1], logits, torch.full_like(logits, -1e9)).max(1).values
        threshold = (logits[:, j] + below) / 2  # drops j and every key above it
        positive = torch.where(torch.arange(m) == 0, 1, 0) if symmetric else torch.zeros(m, dtype=torch.int64)
        positive[positive == j] = 2
        exclude = torch.arange(m)[:, None] if symmetric else None
        g = torch.rand(m, generator=gen, dtype=F64) + 0.5
        if symmetric:
            g[j] = 0.0
        fn = (lambda a, b, s: ik.lse(a, b, s, exclude=exclude, symmetric=symmetric, positive=positive,
                                     threshold=threshold, backend=backend))
        _, dq, dk, ds = lse_grads(fn, q, k, torch.tensor(SCALE, dtype=F64), g, symmetric)
        grad = dq if symmetric else dk
        assert torch.equal(grad[j], torch.zeros_like(grad[j])), (symmetric, grad[j])
        assert (grad.abs().sum(1) > 0).sum() >= m - 1  # the other keys do get gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_positive_is_never_dropped(backend):
    """threshold -inf: every key above it, only the positive stays, so lse_i is its logit; and
    thresholds under each positive's logit keep the positive while dropping the keys above."""
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(8, 5, generator=gen, dtype=F64), torch.randn(10, 5, generator=gen, dtype=F64)
    positive = torch.randint(0, 10, (8,), generator=gen)
    s = torch.tensor(SCALE, dtype=F64)
    spec = Exclusion(torch.empty(8, 0, dtype=torch.int64), positive=positive,
                     threshold=torch.full((8,), float("-inf"), dtype=F64))
    lse, dropped = fused_lse(q, k, s, spec, backend, return_dropped=True)
    torch.testing.assert_close(lse, SCALE * (q * k[positive]).sum(1), rtol=1e-13, atol=0)
    assert torch.equal(dropped, torch.full((8,), 9, dtype=torch.int32))
    c = sample(8, 10, 5, F64, seed=8, positive_above=True)
    above = [float(SCALE * c["q"][i] @ c["k"][p]) > float(c["threshold"][i]) for i, p in enumerate(c["positive"])]
    assert sum(above) >= 4 and all(c["kept"][i, p] for i, p in enumerate(c["positive"]))
    got = fused_lse(c["q"], c["k"], c["scale"], spec_of(c), backend)
    torch.testing.assert_close(got, dense(c["kept"])(c["q"], c["k"], c["scale"]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_paired_backward_uses_each_sides_threshold(backend, labelled):
    """Rows [a, b) of a symmetric batch against all its rows (the distributed backward): dq equals
    the oracle's gradient of the whole symmetric batch on those rows, each row (local or key)
    dropping by its own threshold."""
    c = sample(12, 12, 5, F64, seed=11, symmetric=True, width=1, classes=3 if labelled else 0)
    z, s, g = c["q"], c["scale"], c["g"]
    _, dz, _, _ = lse_grads(dense(c["kept"]), z, z, s, g, True)
    r = dense(c["kept"])(z, z, s).detach()
    a, b = 3, 8
    labels = None if c["labels"] is None else (c["labels"][0][a:b], c["labels"][1], c["positive"][a:b])
    dq, _ = paired_backward(g[a:b], z[a:b], z, s, c["exclude"][a:b], labels, r[a:b], g, r, c["exclude"],
                            c["positive"], a, backend, threshold=c["threshold"][a:b], positive=c["positive"][a:b],
                            key_threshold=c["threshold"])
    torch.testing.assert_close(dq, dz[a:b], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_infinite_threshold_is_no_threshold(backend):
    """+inf everywhere: the same values and gradients as without a threshold (bit for bit on the
    cpu backend, the same float64 sums elsewhere)."""
    c = sample(10, 14, 6, torch.float32, seed=3, width=2, classes=3)
    inf = torch.full((10,), float("inf"))
    with_inf = dict(c, threshold=inf)
    without = dict(c, threshold=None, positive=c["labels"][2])
    outs = [lse_grads(public_lse(x, backend), c["q"], c["k"], c["scale"], c["g"], False) for x in (with_inf, without)]
    for a, b in zip(*outs):
        if backend == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_forward_mode_tangent_matches_the_oracle():
    c = sample(7, 9, 4, F64, seed=13, width=1)
    tq, tk = torch.randn_like(c["q"]), torch.randn_like(c["k"])
    ts = torch.tensor(0.3, dtype=F64)
    _, got = torch.func.jvp(public_lse(c, "reference"), (c["q"], c["k"], c["scale"]), (tq, tk, ts))
    _, want = torch.func.jvp(dense(c["kept"]), (c["q"], c["k"], c["scale"]), (tq, tk, ts))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_counted_ops_pass_opcheck():
    c = sample(6, 7, 3, torch.float32, seed=2, classes=2)
    spec = spec_of(c)
    flat = (c["q"], c["k"], c["scale"], *spec.tensors()[:4], False, "cpu", spec.threshold)
    torch.library.opcheck(torch.ops.infonce_kernels._lse_counted.default, flat)
    labels = list(spec.tensors()[1:])
    torch.library.opcheck(torch.ops.infonce_kernels._lse_fwd_counted.default,
                          (c["q"], c["k"], c["scale"], spec.exclude, labels, False))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(threshold=torch.zeros(5)), ValueError, "threshold needs positive"),
    (dict(threshold=torch.zeros(4), positive=torch.zeros(5, dtype=torch.int64)), ValueError, r"shape \(5,\)"),
    (dict(threshold=torch.zeros(5, dtype=torch.int64), positive=torch.zeros(5, dtype=torch.int64)), TypeError,
     "floating"),
    (dict(threshold=torch.tensor([0.0, float("nan"), 0, 0, 0]), positive=torch.zeros(5, dtype=torch.int64)),
     ValueError, "threshold contains NaN"),
    (dict(threshold=torch.zeros(5), positive=torch.full((5,), 6)), ValueError, "positive indices"),
    (dict(positive=torch.zeros(5, dtype=torch.int64)), ValueError, "positive only applies"),
])
def test_bad_threshold_arguments_raise(kwargs, error, message):
    q, k = torch.randn(5, 3), torch.randn(6, 3)
    with pytest.raises(error, match=message):
        ik.lse(q, k, 1.0, backend="cpu", **kwargs)


def test_bad_threshold_tensors_raise_below_the_public_op():
    with pytest.raises(ValueError, match="needs positive"):
        Exclusion(torch.empty(3, 0, dtype=torch.int64), threshold=torch.zeros(3))
    q, k, s = torch.randn(3, 2), torch.randn(4, 2), torch.tensor(1.0)
    none = torch.empty(0, dtype=torch.int64)
    fwd = torch.ops.infonce_kernels._lse_fwd
    with pytest.raises(RuntimeError, match="threshold must be float64 for float64 inputs and float32"):
        fwd(q, k, s, none.view(3, 0), [none, none, torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=F64)],
            False)
    with pytest.raises(RuntimeError, match="the threshold rule needs positive"):
        fwd(q, k, s, none.view(3, 0), [none, none, none, torch.zeros(3)], False)
    c = sample(4, 4, 2, torch.float32, seed=1, symmetric=True)
    z, r = c["q"], torch.zeros(4)
    with pytest.raises(ValueError, match="key_threshold must have shape"):
        paired_backward(r, z, z, c["scale"], torch.empty(4, 0, dtype=torch.int64), None, r, r, r,
                        torch.empty(4, 0, dtype=torch.int64), c["positive"], 0, "cpu", key_threshold=torch.zeros(3))
