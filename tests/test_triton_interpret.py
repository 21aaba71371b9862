"""Triton backend under the Triton interpreter (CPU tensors, fp32 and fp64 only).

CI runs the whole pytest session with TRITON_INTERPRET=1 in the environment;
without it (or without triton) this module is skipped. The interpreter
emulates bf16/fp16 arithmetic inexactly, so low precision is tested on GPU
only (tests/gpu/). Kept small: the interpreter runs every tile op in numpy.

The oracle is an fp64 materialised softmax/logsumexp of s * q k^T with the
exclusion mask, differentiated by autograd.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from infonce_kernels.triton import _config  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _config.interpret_mode(), reason="needs TRITON_INTERPRET=1 set before the process starts"
)

import infonce_kernels  # noqa: E402
import infonce_kernels.triton as tbackend  # noqa: E402

TILE = _config.INTERPRET_BLOCK          # 16: row and key tile under the interpreter
DCHUNK = _config.INTERPRET_BLOCK_D      # 32: largest d chunk under the interpreter


NO_LABELS = (torch.empty(0, dtype=torch.int64),) * 3  # the label rule off


# ----------------------------------------------------------------------------- helpers
def make_exclude(M: int, N: int, E: int, symmetric: bool, gen: torch.Generator) -> torch.Tensor:
    """(M, E) int64: self index (symmetric) / a random key, then a random key or -1.

    Duplicates and -1 entries occur; every row keeps at least one key (N >= 3 when E == 2).
    """
    ex = torch.full((M, E), -1, dtype=torch.int64)
    if E >= 1:
        ex[:, 0] = torch.arange(M) if symmetric else torch.randint(0, N, (M,), generator=gen)
    if E >= 2:
        ex[:, 1] = torch.randint(-1, N, (M,), generator=gen)
        ex[::3, 1] = ex[::3, 0]      # duplicates
    return ex


def reference_lse(q, k, scale, exclude, labels=None):
    """fp64, materialised: logsumexp_j of s <q_i, k_j> over non-excluded j.

    labels = (row_labels, key_labels, positive): row i also drops every key of
    its label except its positive.
    """
    L = scale.double() * (q.double() @ k.double().T)
    M, N = L.shape
    mask = torch.zeros(M, N, dtype=torch.bool)
    for e in range(exclude.shape[1]):
        col = exclude[:, e]
        rows = torch.arange(M)[col >= 0]
        mask[rows, col[col >= 0]] = True
    if labels is not None:
        rl, kl, pos = labels
        mask |= (rl[:, None] == kl[None, :]) & (torch.arange(N)[None, :] != pos[:, None])
    return torch.logsumexp(L.masked_fill(mask, float("-inf")), dim=1)


def triton_lse(q, k, scale, exclude, symmetric, labels=None):
    kw = {}
    if labels is not None:
        kw = dict(row_labels=labels[0], key_labels=labels[1], positive=labels[2])
    return infonce_kernels.lse(q, q if symmetric else k, scale, exclude=exclude, symmetric=symmetric,
                               backend="triton", **kw)


def assert_close(actual, expected, rtol, atol, what):
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs().max().item()
    bound = atol + rtol * expected.abs().max().item()
    assert err <= bound, f"{what}: max abs err {err:.3e} > {bound:.3e}"


def inputs(M, N, d, dtype, symmetric, E, seed, scale=1.7):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(M, d, generator=gen, dtype=torch.float64).to(dtype)
    k = q if symmetric else torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype)
    s = torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ex = make_exclude(M, N, E, symmetric, gen)
    g = torch.randn(M, generator=gen, dtype=torch.float64)
    return q, k, s, ex, g


def make_labels(M, N, classes, symmetric, gen):
    """Labels with `classes` classes and a positive per row (some -1); every row keeps a key."""
    rl = torch.randint(0, classes, (M,), generator=gen)
    kl = rl.clone() if symmetric else torch.randint(0, classes, (N,), generator=gen)
    kl[-1] = classes          # a key no row shares: no row loses every key
    pos = torch.randint(-1, N, (M,), generator=gen)
    return rl, kl, pos


def check_values_and_grads(M, N, d, dtype, symmetric, E, seed=0, scale=1.7, classes=0):
    q, k, s, ex, g = inputs(M, N, d, dtype, symmetric, E, seed, scale)
    labels = make_labels(M, N, classes, symmetric, torch.Generator().manual_seed(seed + 1)) if classes else None
    if labels is not None and symmetric:
        ex = torch.cat([torch.arange(M)[:, None], ex[:, 1:]], 1) if E else torch.arange(M)[:, None]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)

    q1 = q.clone().requires_grad_()
    k1 = q1 if symmetric else k.clone().requires_grad_()
    s1 = s.clone().requires_grad_()
    out = triton_lse(q1, k1, s1, ex, symmetric, labels)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (M,)
    grads = torch.autograd.grad(out, [q1, s1] if symmetric else [q1, k1, s1], g.to(out.dtype))

    q2 = q.double().requires_grad_()
    k2 = q2 if symmetric else k.double().requires_grad_()
    s2 = s.double().requires_grad_()
    ref = reference_lse(q2, k2, s2, ex, labels)
    rgrads = torch.autograd.grad(ref, [q2, s2] if symmetric else [q2, k2, s2], g)

    assert_close(out, ref, what="lse", **tol)
    names = ["dz", "dscale"] if symmetric else ["dq", "dk", "dscale"]
    for name, a, b in zip(names, grads, rgrads):
        assert a.dtype == (s.dtype if name == "dscale" else dtype), name
        assert torch.isfinite(a).all(), name
        assert_close(a, b, what=name, **tol)


# ----------------------------------------------------------------------------- availability / contract
def test_available_cpu_under_interpreter():
    ok, why = tbackend.available("cpu")
    assert ok, why
    assert "triton" in infonce_kernels.available_backends("cpu")


def test_input_precision_follows_torch():
    from infonce_kernels.triton._common import input_precision

    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert input_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert input_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("symmetric", [False, True])
def test_backend_functions_contract(symmetric):
    """forward/backward called directly, exactly as the dispatcher calls them."""
    M, N, d = 9, 9 if symmetric else 11, 6
    q, k, s, ex, g = inputs(M, N, d, torch.float32, symmetric, 1, seed=1)
    r = tbackend.forward(q, k, s, ex, *NO_LABELS, symmetric)
    assert r.shape == (M,) and r.dtype == torch.float32
    dq, dk, ds = tbackend.backward(g.float(), q, k, s, ex, *NO_LABELS, symmetric, r)
    assert dq.shape == (M, d) and dq.dtype == q.dtype
    assert ds.shape == () and ds.dtype == s.dtype
    if symmetric:
        assert dk.numel() == 0
    else:
        assert dk.shape == (N, d) and dk.dtype == k.dtype


# ----------------------------------------------------------------------------- values and gradients
SHAPES = [
    # (M, N, d): odd shapes around the 16-row/16-key tile and the 32-wide d chunk
    (1, 1, 1),
    (TILE - 1, TILE + 1, 3),
    (TILE + 1, TILE - 1, DCHUNK + 1),   # d > chunk: the chunked-d path, d not a power of 2
    (113, 37, 20),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("M,N,d", SHAPES, ids=lambda v: str(v))
def test_general_no_exclusions(M, N, d, dtype):
    check_values_and_grads(M, N, d, dtype, symmetric=False, E=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("M,N,d,E", [(TILE + 1, TILE + 3, 5, 1), (TILE - 1, 2 * TILE + 1, 12, 2)])
def test_general_exclusions(M, N, d, E, dtype):
    check_values_and_grads(M, N, d, dtype, symmetric=False, E=E)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("N,d,E", [(TILE + 1, 7, 1), (2 * TILE + 3, DCHUNK + 9, 2), (113, 10, 1)])
def test_symmetric(N, d, E, dtype):
    check_values_and_grads(N, N, d, dtype, symmetric=True, E=E)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("symmetric,M,N,E", [(False, TILE + 3, 2 * TILE + 1, 1), (True, 2 * TILE + 1, 2 * TILE + 1, 1)],
                         ids=["general", "symmetric"])
def test_label_rule(symmetric, M, N, E, dtype):
    """row_labels/key_labels/positive: same-label keys skipped except the positive (whole tiles too)."""
    check_values_and_grads(M, N, 6, dtype, symmetric=symmetric, E=E, classes=3)


def test_large_d_chunks():
    """d = 1024 (general) and 101 (symmetric): many d chunks, several d-out programs in the backward."""
    check_values_and_grads(5, 6, 1024, torch.float64, symmetric=False, E=1, scale=0.05)
    check_values_and_grads(6, 6, 3 * DCHUNK + 5, torch.float64, symmetric=True, E=2, scale=0.1)


def test_fully_excluded_tile():
    """Rows whose every key in one key tile is excluded: the online LSE must not produce NaN."""
    N = TILE + 2                      # last key tile = keys {16, 17}
    M, d = 4, 8
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(M, d, generator=gen, dtype=torch.float64)
    k = torch.randn(N, d, generator=gen, dtype=torch.float64)
    ex = torch.tensor([[16, 17], [17, 16], [0, 17], [-1, -1]], dtype=torch.int64)
    s = torch.tensor(3.0, dtype=torch.float64)
    out = triton_lse(q, k, s, ex, False)
    assert torch.isfinite(out).all()
    assert_close(out, reference_lse(q, k, s, ex), rtol=1e-12, atol=1e-12, what="lse")


def test_fully_excluded_first_tile(monkeypatch):
    """With 2-key tiles a row can lose its whole *first* tile (m = -inf, then -inf tile)."""
    monkeypatch.setattr(_config, "INTERPRET_BLOCK", 2)
    check_values_and_grads(3, 5, 4, torch.float64, symmetric=False, E=0)   # warm: tiles of 2 work at all
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    ex = torch.tensor([[0, 1], [1, 0], [2, 3]], dtype=torch.int64)
    s = torch.tensor(1.3, dtype=torch.float64)
    out = triton_lse(q, k, s, ex, False)
    ref = reference_lse(q, k, s, ex)
    assert_close(out, ref, rtol=1e-12, atol=1e-12, what="lse")
    g = torch.randn(3, dtype=torch.float64, generator=gen)
    a = torch.autograd.grad(out, [q, k], g)
    b = torch.autograd.grad(ref, [q, k], g)
    for x, y, name in zip(a, b, ["dq", "dk"]):
        assert_close(x, y, rtol=1e-12, atol=1e-12, what=name)


def test_zero_and_tiny_upstream_gradient():
    """g = 0 everywhere, and g ~ 1e-30: the g/max|g| range trick must keep both exact."""
    q, k, s, ex, _ = inputs(10, 12, 6, torch.float64, False, 1, seed=5)
    r = tbackend.forward(q, k, s, ex, *NO_LABELS, False)
    dq, dk, ds = tbackend.backward(torch.zeros(10, dtype=torch.float64), q, k, s, ex, *NO_LABELS, False, r)
    assert not dq.any() and not dk.any() and ds.item() == 0.0
    g = torch.full((10,), 1e-30, dtype=torch.float64)
    dq, dk, ds = tbackend.backward(g, q, k, s, ex, *NO_LABELS, False, r)
    dq1, dk1, ds1 = tbackend.backward(g * 1e30, q, k, s, ex, *NO_LABELS, False, r)
    assert_close(dq * 1e30, dq1, rtol=1e-12, atol=0, what="dq")
    assert_close(dk * 1e30, dk1, rtol=1e-12, atol=0, what="dk")


def test_deterministic():
    q, k, s, ex, g = inputs(TILE * 2 + 5, TILE * 3 + 1, 9, torch.float32, False, 2, seed=6)
    outs = []
    for _ in range(2):
        r = tbackend.forward(q, k, s, ex, *NO_LABELS, False)
        outs.append((r, *tbackend.backward(g.float(), q, k, s, ex, *NO_LABELS, False, r)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- gradcheck (fp64)
@pytest.mark.parametrize("symmetric", [False, True], ids=["general", "symmetric"])
def test_gradcheck(symmetric):
    M, N, d = (6, 6, 3) if symmetric else (5, 7, 3)
    q, k, s, ex, _ = inputs(M, N, d, torch.float64, symmetric, 2 if symmetric else 1, seed=7, scale=0.9)
    q.requires_grad_()
    s.requires_grad_()
    if symmetric:
        fn = lambda q_, s_: triton_lse(q_, q_, s_, ex, True)  # noqa: E731
        args = (q, s)
    else:
        k.requires_grad_()
        fn = lambda q_, k_, s_: triton_lse(q_, k_, s_, ex, False)  # noqa: E731
        args = (q, k, s)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_env_is_read_at_decoration():
    """Documented behaviour: the kernels were decorated as interpreter functions."""
    from triton.runtime.interpreter import InterpretedFunction

    from infonce_kernels.triton import _forward

    assert isinstance(_forward._lse_fwd_kernel, InterpretedFunction)
    assert os.environ.get("TRITON_INTERPRET") not in (None, "", "0")
