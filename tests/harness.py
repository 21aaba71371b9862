"""The test harness: backends, sample inputs, the 2x same-precision rule and the textbook oracles,
each written once; every test module (CPU, interpreter and GPU) takes them from here.

Accuracy rule (after flash-attention): against a float64 oracle evaluated on the *same* (rounded)
inputs, a computation delivered in dtype X may be off by at most twice the error of the plain
PyTorch computation in dtype X, plus a small tolerance relative to the oracle's magnitude
(:func:`assert_within`). The plain computations are the oracles below evaluated in dtype X.
"""

import math

import torch
import torch.nn.functional as F

import infonce_kernels as ik

# ------------------------------------------------------------------------------ private names
# The only private names of the package the tests reach: re-point them here when the op layer
# moves (a paired backward and the two-sided CLIP op are not public API).
from infonce_kernels.ops import Exclusion, fused_lse_pair, paired_backward, unavailable_reason  # noqa: F401

F64 = torch.float64
HALF = (torch.float16, torch.bfloat16)
NO_LABELS = (torch.empty(0, dtype=torch.int64),) * 3  # the label rule off


# ------------------------------------------------------------------------------------ backends
def backends(device="cpu"):
    """The backends that can run on ``device``, in ik.BACKENDS order (triton on CPU tensors only
    under TRITON_INTERPRET=1)."""
    return ik.available_backends(device)


# reference and the C++ cpu kernels: fast on any shape (the Triton interpreter is not)
CPU_BACKENDS = [b for b in ("reference", "cpu") if b in backends("cpu")]
# every backend that runs on CPU tensors here
ALL_CPU_BACKENDS = backends("cpu")


def device_backends():
    """(backend, device) pairs the op suite runs: every CPU backend, and the kernel backends of a
    CUDA device when there is one."""
    pairs = [(b, "cpu") for b in ALL_CPU_BACKENDS]
    if torch.cuda.is_available():
        pairs += [(b, "cuda") for b in backends("cuda") if b != "reference"]
    return pairs


def accumulation_dtype(dtype):
    """The dtype the kernels accumulate in, and return the lse and dscale in."""
    return F64 if dtype == F64 else torch.float32


# --------------------------------------------------------------------------------- sample inputs
def random_exclude(rows, keys, width, *, with_none=True, generator=None):
    """(rows, width) int64 exclusion indices in [-1, keys), never removing every key of a row."""
    low = -1 if with_none else 0
    exclude = torch.randint(low, keys, (rows, width), generator=generator)
    if keys <= width:  # keep one key per row
        exclude[:, :] = torch.where(exclude == keys - 1, -1, exclude)
    return exclude


def sample_exclude(m, n, width, symmetric, generator=None):
    """(m, width) like :func:`random_exclude`; symmetric: the first column is the self index (as
    NT-Xent lists it); with two columns every third row lists its first index twice."""
    ex = random_exclude(m, n, width, generator=generator)
    if symmetric and width:
        ex[:, 0] = torch.arange(m)
    if width >= 2:
        ex[::3, 1] = ex[::3, 0]
    return ex


def sample_labels(m, n, classes, symmetric, generator=None):
    """(row_labels, key_labels, positive) with ``classes`` classes and a positive per row (some -1);
    the last key has a label no row shares, so no row loses every key. Symmetric: key_labels is
    row_labels."""
    rl = torch.randint(0, classes, (m,), generator=generator)
    if symmetric:
        rl[-1] = classes
        kl = rl
    else:
        kl = torch.randint(0, classes, (n,), generator=generator)
        kl[-1] = classes
    pos = torch.randint(-1, n, (m,), generator=generator)
    return rl, kl, pos


def lse_case(q, k, scale, exclude=None, labels=None, g=None, symmetric=False):
    """One input set of the op as a dict (q, k, scale as a 0-d tensor of the accumulation dtype,
    exclude, labels, g the (m,) float64 upstream gradient, symmetric), for :func:`check_lse`."""
    dev = q.device
    if g is None:
        g = torch.randn(q.shape[0], dtype=F64).to(dev)
    scale = torch.as_tensor(scale, dtype=accumulation_dtype(q.dtype), device=dev)
    return dict(q=q, k=q if symmetric else k, scale=scale, exclude=exclude, labels=labels, g=g,
                symmetric=symmetric)


def sample_lse(m, n, d, dtype, *, symmetric=False, width=0, classes=0, scale=1.7, seed=None, device="cpu"):
    """Fresh random inputs of the op (never all-zero) as a :func:`lse_case`; exclusions from
    :func:`sample_exclude`, labels from :func:`sample_labels` (symmetric: the self index is then
    always listed, as SupCon does). ``seed`` None draws from the global (per-test) seed."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    q = torch.randn(m, d, generator=gen, dtype=F64)
    k = q if symmetric else torch.randn(n, d, generator=gen, dtype=F64)
    ex = sample_exclude(m, n, width, symmetric, gen) if width else None
    labels = sample_labels(m, n, classes, symmetric, gen) if classes else None
    if labels is not None and symmetric:
        self_col = torch.arange(m)[:, None]
        ex = self_col if ex is None else torch.cat([self_col, ex[:, 1:]], 1)
    g = torch.randn(m, generator=gen, dtype=F64)
    q = q.to(device=device, dtype=dtype)
    k = k.to(device=device, dtype=dtype)
    return lse_case(q, k, scale, None if ex is None else ex.to(device),
                    None if labels is None else tuple(t.to(device) for t in labels), g.to(device), symmetric)


# ------------------------------------------------------------------------------- the op's oracle
def exclusion_mask(exclude, labels, m, n, device="cpu"):
    """(m, n) bool, True where row i leaves key j out: j in exclude[i] (-1: none), or labels
    (row_labels, key_labels, positive) given, row_labels[i] == key_labels[j] and j != positive[i].
    Computed by the package's one Python rule, Exclusion.mask (checked pair by pair against
    :func:`pairwise_mask` in tests/test_op.py)."""
    if exclude is None:
        exclude = torch.empty(m, 0, dtype=torch.int64, device=device)
    labels = () if labels is None else tuple(t.to(device) for t in labels)
    return Exclusion(exclude.to(device), *labels).mask(n)


def pairwise_mask(exclude, labels, m, n):
    """The exclusion rule written out pair by pair (the textbook definition, slow)."""
    mask = torch.zeros(m, n, dtype=torch.bool)
    for i in range(m):
        for j in range(n):
            listed = exclude is not None and j in exclude[i].tolist()
            by_label = labels is not None and bool(labels[0][i] == labels[1][j]) and int(labels[2][i]) != j
            mask[i, j] = listed or by_label
    return mask


def dense_lse(q, k, scale, exclude=None, labels=None, dtype=F64):
    """(m,) masked row log-sum-exp of s q k^T, materialised and differentiable, every operation in
    ``dtype`` (float64: the oracle; the input dtype: the plain PyTorch baseline). 16-bit: the scale
    multiplies in float32 and the logits are rounded to ``dtype`` once, so it is not rounded."""
    dots = q.to(dtype) @ k.to(dtype).T
    scale = torch.as_tensor(scale, device=dots.device)
    if dtype in HALF:
        logits = (dots.float() * scale.float()).to(dtype)
    else:
        logits = dots * scale.to(dtype)
    mask = exclusion_mask(exclude, labels, q.shape[0], k.shape[0], dots.device)
    return torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=1)


def lse_grads(fn, q, k, scale, g, symmetric):
    """Runs ``fn(q, k, scale) -> (m,)`` on fresh leaves and returns (value, dq, dk, dscale) of
    sum_i g_i value_i (dk None when symmetric: dq is then dz)."""
    qq = q.detach().clone().requires_grad_()
    kk = qq if symmetric else k.detach().clone().requires_grad_()
    ss = torch.as_tensor(scale, device=q.device).detach().clone().requires_grad_()
    out = fn(qq, kk, ss)
    wrt = [qq, ss] if symmetric else [qq, kk, ss]
    grads = torch.autograd.grad(out, wrt, g.to(out.dtype))
    if symmetric:
        return out.detach(), grads[0], None, grads[1]
    return (out.detach(), *grads)


def backend_lse(exclude=None, labels=None, symmetric=False, backend="reference"):
    """fn(q, k, scale) for :func:`lse_grads`: the public op on ``backend``."""
    lab = {} if labels is None else dict(zip(("row_labels", "key_labels", "positive"), labels))
    return lambda q, k, s: ik.lse(q, k, s, exclude=exclude, symmetric=symmetric, backend=backend, **lab)


def oracle_lse(exclude=None, labels=None, dtype=F64):
    """fn(q, k, scale) for :func:`lse_grads`: :func:`dense_lse` in ``dtype``."""
    return lambda q, k, s: dense_lse(q, k, s, exclude, labels, dtype)


# ------------------------------------------------------------------------ the 2x precision rule
def assert_within(actual, expected, baseline, what="", *, rtol, atol=0.0):
    """The 2x same-precision rule: max|actual - expected| <= 2 max|baseline - expected| + atol +
    rtol max|expected|; ``expected`` is the float64 oracle, ``baseline`` the plain PyTorch
    computation in the precision under test, both on the same inputs."""
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    base = (baseline.double() - expected).abs().max().item()
    tol = atol + rtol * expected.abs().max().item()
    assert math.isfinite(err), f"{what}: non-finite values"
    assert err <= 2 * base + tol, f"{what}: error {err:.3e} > 2 x plain-PyTorch error {base:.3e} + {tol:.3e}"


def check_lse(fn, case, *, rtol, atol=0.0, baseline_dtype=None):
    """The op ``fn`` (see :func:`lse_grads`) on ``case`` (:func:`sample_lse`): value and every
    gradient against the float64 oracle under the 2x rule, the baseline being the oracle in
    ``baseline_dtype`` (default: the inputs' dtype); dtypes, shapes and finiteness too."""
    q, k, s, g, sym = case["q"], case["k"], case["scale"], case["g"], case["symmetric"]
    ex, lab = case["exclude"], case["labels"]
    got = lse_grads(fn, q, k, s, g, sym)
    ref = lse_grads(oracle_lse(ex, lab), q, k, s, g, sym)
    same = lse_grads(oracle_lse(ex, lab, baseline_dtype or q.dtype), q, k, s, g, sym)
    assert got[0].dtype == accumulation_dtype(q.dtype) and got[0].shape == (q.shape[0],)
    wants = (accumulation_dtype(q.dtype), q.dtype, k.dtype, s.dtype)
    for name, a, b, c, want in zip(("lse", "dq", "dk", "dscale"), got, ref, same, wants):
        if a is None:
            continue
        assert a.dtype == want and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert_within(a, b, c, name, rtol=rtol, atol=atol)
    return got


# --------------------------------------------------------------------- textbook loss formulas
# Each is written out from its paper (materialised, loops where the paper has a sum) and takes
# ``dtype``: float64 is the oracle, float32 the plain computation at the kernels' accumulation.
def _unit(x, dtype):
    return F.normalize(x.to(dtype), dim=1)


def textbook_nt_xent(z1, z2, tau, dtype=F64):
    """SimCLR over 2N anchors: -log exp(sim(i, pos)/tau) / sum_{k != i} exp(sim(i, k)/tau)."""
    z = _unit(torch.cat([z1, z2]), dtype)
    n = z1.shape[0]
    sim = z @ z.T / tau
    losses = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = torch.logsumexp(torch.cat([sim[i, :i], sim[i, i + 1:]]), 0)
        losses.append(denom - sim[i, pos])
    return torch.stack(losses)


def textbook_clip(img, txt, s, dtype=F64, reduction="mean"):
    """open_clip's ClipLoss: the mean of the image->text and text->image cross-entropies
    (reduction "none": the (B,) per-pair means)."""
    img, txt = _unit(img, dtype), _unit(txt, dtype)
    logits = s * img @ txt.T
    labels = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels, reduction=reduction)
                  + F.cross_entropy(logits.T, labels, reduction=reduction))


def textbook_info_nce_bank(q, k, bank, tau, dtype=F64):
    q, k, bank = (_unit(x, dtype) for x in (q, k, bank))
    pos = (q * k).sum(1) / tau
    return torch.logaddexp(pos, torch.logsumexp(q @ bank.T / tau, 1)) - pos


def textbook_info_nce_in_batch(q, k, tau, dtype=F64):
    q, k = _unit(q, dtype), _unit(k, dtype)
    return F.cross_entropy(q @ k.T / tau, torch.arange(q.shape[0]), reduction="none")


def textbook_supcon(features, labels, tau, base_tau=None, dtype=F64):
    """Khosla et al. L_out, SupContrast-style: (B, V, d) -> anchors cat(unbind(features, 1)).
    Returns (per-anchor losses, has-positive mask); loop over anchors and positives."""
    z = _unit(torch.cat(torch.unbind(features, dim=1)), dtype)
    y = labels.repeat(features.shape[1])
    factor = 1.0 if base_tau is None else tau / base_tau
    losses, has = [], []
    for i in range(z.shape[0]):
        others = [a for a in range(z.shape[0]) if a != i]
        log_denom = torch.logsumexp(torch.stack([z[i] @ z[a] / tau for a in others]), 0)
        positives = [p for p in others if y[p] == y[i]]
        if not positives:
            losses.append(torch.zeros((), dtype=dtype))
            has.append(False)
            continue
        log_probs = torch.stack([z[i] @ z[p] / tau - log_denom for p in positives])
        losses.append(-factor * log_probs.mean())
        has.append(True)
    return torch.stack(losses), torch.tensor(has)


def textbook_dcl(z1, z2, tau, sigma=None, detach=True, dtype=F64):
    """Yeh et al. Eq. 6: -<z_i, z_pos>/tau + log sum_{j not in {i, pos}} exp(<z_i, z_j>/tau);
    DCLW weights w = 2 - exp(<z1_i,z2_i>/sigma) / mean_j exp(<z1_j,z2_j>/sigma)."""
    z = _unit(torch.cat([z1, z2]), dtype)
    b = z1.shape[0]
    n = 2 * b
    pos = [(i + b) % n for i in range(n)]
    if sigma is not None:
        c = (z[:b] * z[b:]).sum(1)
        c = c.detach() if detach else c
        e = torch.exp(c / sigma)
        w = 2 - e / e.mean()
    losses = []
    for i in range(n):
        neg = torch.stack([z[i] @ z[j] / tau for j in range(n) if j not in (i, pos[i])])
        weight = 1.0 if sigma is None else w[i % b]
        losses.append(-weight * (z[i] @ z[pos[i]]) / tau + torch.logsumexp(neg, 0))
    return torch.stack(losses)


def textbook_dhel(z1, z2, tau, include_augs=True, dtype=F64):
    """The authors' DHEL: -log( exp(<u_i,v_i>/tau) / (sum_{j!=i} exp(<u_i,u_j>/tau) [* same for v]) )."""
    u, v = _unit(z1, dtype), _unit(z2, dtype)
    mask = torch.eye(u.shape[0], dtype=torch.bool)
    pos = torch.exp((u * v).sum(1) / tau)
    denom = torch.exp(u @ u.T / tau).masked_fill(mask, 0).sum(1)
    if include_augs:
        denom = denom * torch.exp(v @ v.T / tau).masked_fill(mask, 0).sum(1)
    return -torch.log(pos / denom)


def _pdist_squared(x):
    """Squared distances of the pairs i < j (torch.pdist(x) ** 2, which CPU bfloat16 lacks)."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1)
    return (x[i] - x[j]).pow(2).sum(1)


def textbook_kcl(z1, z2, t, gamma, dtype=F64):
    """The authors' KCL (Gaussian): -2 mean exp(-t||u_i-v_i||^2) + gamma (pdist energies)."""
    u, v = _unit(z1, dtype), _unit(z2, dtype)
    energy = _pdist_squared(u).mul(-t).exp().mean() + _pdist_squared(v).mul(-t).exp().mean()
    align = (u - v).norm(dim=1).pow(2).mul(-t).exp().mean()
    return -2 * align + gamma * energy


def textbook_kcl_rows(z1, z2, t, gamma, dtype=F64):
    u, v = _unit(z1, dtype), _unit(z2, dtype)
    n = u.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    ku = torch.exp(-t * (u[:, None] - u[None]).pow(2).sum(-1))
    kv = torch.exp(-t * (v[:, None] - v[None]).pow(2).sum(-1))
    e_u = (ku * off).sum(1) / (n - 1)
    e_v = (kv * off).sum(1) / (n - 1)
    return -2 * torch.exp(-t * ((u - v) ** 2).sum(1)) + gamma * (e_u + e_v)


def textbook_hcl(z1, z2, tau, beta, tau_plus, estimator="hard", dtype=F64):
    """Robinson et al. / Chuang et al. reference code (SimCLR 2B setting), per anchor."""
    out = _unit(torch.cat([z1, z2]), dtype)
    b = z1.shape[0]
    neg = torch.exp(out @ out.T / tau)
    mask = torch.ones(2 * b, 2 * b, dtype=torch.bool)
    for i in range(b):
        mask[i, i] = mask[i, i + b] = mask[i + b, i + b] = mask[i + b, i] = False
    neg = neg.masked_select(mask).view(2 * b, -1)
    pos = torch.exp((out[:b] * out[b:]).sum(-1) / tau)
    pos = torch.cat([pos, pos])
    n = 2 * b - 2
    if estimator == "hard":
        imp = (beta * neg.log()).exp()
        reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
        ng = (-tau_plus * n * pos + reweight_neg) / (1 - tau_plus)
    else:  # debiased
        ng = (-tau_plus * n * pos + neg.sum(dim=-1)) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n * math.e ** (-1 / tau))
    return -torch.log(pos / (pos + ng))


def textbook_alignment(x, y, alpha, dtype=F64):
    x, y = _unit(x, dtype), _unit(y, dtype)
    return (x - y).norm(p=2, dim=1).pow(alpha)


def textbook_uniformity(x, t, dtype=F64):
    x = _unit(x, dtype)
    return _pdist_squared(x).mul(-t).exp().mean().log()


# --------------------------------------------------------------------------- gradient helpers
def leaves(*xs):
    """Fresh leaf copies that require grad."""
    return [x.detach().clone().requires_grad_() for x in xs]


def grads_close(ours, theirs, rtol=1e-9, atol=1e-9):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)


__all__ = [
    "F64", "HALF", "NO_LABELS", "CPU_BACKENDS", "ALL_CPU_BACKENDS", "backends", "device_backends",
    "accumulation_dtype", "random_exclude", "lse_case", "sample_exclude", "sample_labels", "sample_lse",
    "exclusion_mask", "pairwise_mask", "dense_lse", "lse_grads", "backend_lse", "oracle_lse",
    "assert_within", "check_lse", "leaves", "grads_close", "fused_lse_pair", "paired_backward",
    "unavailable_reason",
] + [name for name in dir() if name.startswith("textbook_")]
