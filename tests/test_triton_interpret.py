"""Triton backend under the Triton interpreter (CPU tensors, fp32 and fp64 only).

CI runs the whole pytest session with TRITON_INTERPRET=1 in the environment;
without it (or without triton) this module is skipped. The interpreter
emulates bf16/fp16 arithmetic inexactly, so low precision is tested on GPU
only (tests/gpu/). Kept small: the interpreter runs every tile op in numpy.

The oracle is the harness's fp64 materialised logsumexp of s * q k^T with the exclusion mask,
differentiated by autograd. The value/gradient cases shared by every backend (odd shapes around
the tiles, exclusions, symmetric, the label rule) run in tests/test_op.py::test_lse_matches_float64;
this module keeps what is particular to the Triton kernels.
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
from harness import (  # noqa: E402
    NO_LABELS,
    assert_within,
    backend_lse,
    check_lse,
    dense_lse,
    paired_backward,
    sample_exclude,
    sample_lse,
)
from infonce_kernels.ops import Exclusion  # noqa: E402

TILE = _config.INTERPRET_BLOCK          # 16: row and key tile under the interpreter
DCHUNK = _config.INTERPRET_BLOCK_D      # 32: largest d chunk under the interpreter


# ----------------------------------------------------------------------------- helpers
def triton_lse(q, k, scale, exclude, symmetric, labels=None):
    return backend_lse(exclude, labels, symmetric, "triton")(q, q if symmetric else k, scale)


def assert_close(actual, expected, rtol, atol, what):
    """max|actual - expected| <= atol + rtol max|expected| (the 2x rule with an exact baseline)."""
    assert_within(actual, expected, expected, what, rtol=rtol, atol=atol)


def inputs(M, N, d, dtype, symmetric, E, seed, scale=1.7):
    c = sample_lse(M, N, d, dtype, symmetric=symmetric, width=E, scale=scale, seed=seed)
    ex = c["exclude"] if E else torch.empty(M, 0, dtype=torch.int64)
    return c["q"], c["k"], c["scale"], ex, c["g"]


def check_values_and_grads(M, N, d, dtype, symmetric, E, seed=0, scale=1.7):
    c = sample_lse(M, N, d, dtype, symmetric=symmetric, width=E, scale=scale, seed=seed)
    fn = backend_lse(c["exclude"], None, symmetric, "triton")
    if dtype == torch.float64:
        check_lse(fn, c, rtol=1e-12, atol=1e-12)
    else:
        check_lse(fn, c, rtol=1e-5, atol=1e-6)


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
    r = tbackend.forward(q, k, s, Exclusion.from_tensors(ex, *NO_LABELS, symmetric))
    assert r.shape == (M,) and r.dtype == torch.float32
    dq, dk, ds = tbackend.backward(g.float(), q, k, s, Exclusion.from_tensors(ex, *NO_LABELS, symmetric), r)
    assert dq.shape == (M, d) and dq.dtype == q.dtype
    assert ds.shape == () and ds.dtype == s.dtype
    if symmetric:
        assert dk.numel() == 0
    else:
        assert dk.shape == (N, d) and dk.dtype == k.dtype


def test_autotune_candidates_are_pruned_and_keyed_on_shape_buckets():
    """INFONCE_TRITON_AUTOTUNE=1 tunes six configurations per kernel, none with warps that
    recompute another's rows (BLOCK_M >= 16 x warps of the chained-dot kernels' own block), once
    per bucket of power-of-two M and N, never keyed on the exact sizes."""
    from infonce_kernels.triton import _backward, _forward

    for kind, own in (("forward", 0), ("backward", 0), ("dk", 1)):
        cands = _config.autotune_configs(kind)
        assert 1 < len(cands) <= 6 and len(set(cands)) == len(cands)
        if kind != "forward":
            assert all(c[own] >= 16 * c[2] for c in cands), (kind, cands)
    assert _config.shape_bucket(1000, 65536) == (1024, 65536) == _config.shape_bucket(600, 40000)
    fwd = _forward._autotuned_kernel(1000, 3000)
    assert fwd is _forward._autotuned_kernel(700, 2100) and fwd is not _forward._autotuned_kernel(1100, 3000)
    assert len(fwd.configs) == 6 and not {"M", "N"} & set(fwd.keys)
    dk = _backward._maybe_autotuned(_backward._dk_kernel, "dk", 100, 100)
    assert not {"M", "N"} & set(dk.keys) and all(c.kwargs["BLOCK_N"] >= 64 for c in dk.configs)


# ----------------------------------------------------------------------------- values and gradients
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
    assert_close(out, dense_lse(q, k, s, ex), rtol=1e-12, atol=1e-12, what="lse")


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
    ref = dense_lse(q, k, s, ex)
    assert_close(out, ref, rtol=1e-12, atol=1e-12, what="lse")
    g = torch.randn(3, dtype=torch.float64, generator=gen)
    a = torch.autograd.grad(out, [q, k], g)
    b = torch.autograd.grad(ref, [q, k], g)
    for x, y, name in zip(a, b, ["dq", "dk"]):
        assert_close(x, y, rtol=1e-12, atol=1e-12, what=name)


def test_zero_and_tiny_upstream_gradient():
    """g = 0 everywhere, and g ~ 1e-30: the g/max|g| range trick must keep both exact."""
    q, k, s, ex, _ = inputs(10, 12, 6, torch.float64, False, 1, seed=5)
    r = tbackend.forward(q, k, s, Exclusion.from_tensors(ex, *NO_LABELS, False))
    dq, dk, ds = tbackend.backward(torch.zeros(10, dtype=torch.float64), q, k, s, Exclusion.from_tensors(ex, *NO_LABELS, False), r)
    assert not dq.any() and not dk.any() and ds.item() == 0.0
    g = torch.full((10,), 1e-30, dtype=torch.float64)
    dq, dk, ds = tbackend.backward(g, q, k, s, Exclusion.from_tensors(ex, *NO_LABELS, False), r)
    dq1, dk1, ds1 = tbackend.backward(g * 1e30, q, k, s, Exclusion.from_tensors(ex, *NO_LABELS, False), r)
    assert_close(dq * 1e30, dq1, rtol=1e-12, atol=0, what="dq")
    assert_close(dk * 1e30, dk1, rtol=1e-12, atol=0, what="dk")


def test_deterministic():
    q, k, s, ex, g = inputs(TILE * 2 + 5, TILE * 3 + 1, 9, torch.float32, False, 2, seed=6)
    outs = []
    for _ in range(2):
        r = tbackend.forward(q, k, s, Exclusion.from_tensors(ex, *NO_LABELS, False))
        outs.append((r, *tbackend.backward(g.float(), q, k, s, Exclusion.from_tensors(ex, *NO_LABELS, False), r)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_unaligned_rows_and_odd_d_are_padded_exactly():
    """A row slice (data pointer not 16-byte aligned) with d % 16 != 0 reaches the kernels as a
    zero-padded aligned copy: the same values and gradients as its aligned copy, bit for bit,
    gradients cut back to d; an aligned input with d % 16 == 0 is passed through untouched."""
    z = torch.randn(13, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    q = z[1:]                                           # starts 56 bytes in: unaligned
    assert q.data_ptr() % 16 != 0
    a = tbackend._aligned(q)
    assert a.shape == (12, 16) and a.data_ptr() % 16 == 0
    assert torch.equal(a[:, :7], q) and not a[:, 7:].any()
    assert tbackend._aligned(a) is a
    s = torch.tensor(1.3, dtype=torch.float64)
    spec = Exclusion.from_tensors(torch.arange(12)[:, None], *NO_LABELS, True)
    g = torch.randn(12, dtype=torch.float64)
    outs = []
    for x in (q, q.clone()):
        r = tbackend.forward(x, x, s, spec)
        outs.append((r, *tbackend.backward(g, x, x, s, spec, r)))
    for u, v in zip(*outs):
        assert torch.equal(u, v)
    assert outs[0][1].shape == (12, 7) and outs[0][1].is_contiguous()
    assert_close(outs[0][0], dense_lse(q, q, s, torch.arange(12)[:, None]), rtol=1e-12, atol=1e-12, what="lse")


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
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_env_is_read_at_decoration():
    """Documented behaviour: the kernels were decorated as interpreter functions."""
    from triton.runtime.interpreter import InterpretedFunction

    from infonce_kernels.triton import _forward

    assert isinstance(_forward._lse_fwd_kernel, InterpretedFunction)
    assert os.environ.get("TRITON_INTERPRET") not in (None, "", "0")


# ----------------------------------------------------------------------------- paired backward
def paired_case(M, N, d, dtype, E, KE, offset, classes=0, seed=0, gathered=True):
    """Arguments of ``ops.paired_backward``: rows q against keys k that are rows of an LSE too.

    gathered: q = z[offset:offset+M] is a slice of the rows k = z (N >= offset + M), row side
    exclusions are the self index (then a partner), key side ones the keys' self index (then
    a random row), both in the numbering of z; else q and k are independent and the key side's
    lists hold random indices in [-1, offset + M + 2) (some outside the rows of q).
    """
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = torch.randn(N, d, generator=gen, dtype=torch.float64)
    if gathered:
        assert offset + M <= N
        q, k = z[offset:offset + M].clone(), z
    else:
        q, k = torch.randn(M, d, generator=gen, dtype=torch.float64), z
    rows = torch.arange(M) + offset
    ex = torch.full((M, E), -1, dtype=torch.int64)
    kex = torch.full((N, KE), -1, dtype=torch.int64)
    if gathered:
        if E >= 1:
            ex[:, 0] = rows
        if E >= 2:
            ex[:, 1] = (rows + N // 2) % N
        if KE >= 1:
            kex[:, 0] = torch.arange(N)
        if KE >= 2:
            kex[:, 1] = torch.randint(-1, N, (N,), generator=gen)
    else:
        ex = sample_exclude(M, N, E, False, gen)
        kex = torch.randint(-1, offset + M + 2, (N, KE), generator=gen)
    labels, key_positive = None, torch.empty(0, dtype=torch.int64)
    if classes:
        lab = torch.randint(0, classes, (N,), generator=gen)
        lab[-1] = classes                  # a key no row shares
        rl = lab[offset:offset + M].clone() if gathered else torch.randint(0, classes, (M,), generator=gen)
        pos = torch.randint(-1, N, (M,), generator=gen)
        key_positive = torch.randint(-1, offset + M + 2, (N,), generator=gen)
        labels = (rl, lab, pos)
    s = torch.tensor(1.3, dtype=acc)
    L = 1.3 * (q @ k.T)
    lse = torch.logsumexp(L, 1) + 0.1 * torch.randn(M, generator=gen, dtype=torch.float64)
    key_lse = torch.logsumexp(L.T, 1) + 0.1 * torch.randn(N, generator=gen, dtype=torch.float64)
    g = torch.randn(M, generator=gen, dtype=torch.float64)
    h = torch.randn(N, generator=gen, dtype=torch.float64)
    return (g.to(acc), q.to(dtype), k.to(dtype), s, ex, labels, lse.to(acc), h.to(acc), key_lse.to(acc),
            kex, key_positive, offset)


def check_paired(args, dtype):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    dq, ds = paired_backward(*args, backend="triton")
    rdq, rds = paired_backward(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                                 for a in args], backend="reference")
    assert dq.dtype == dtype and dq.shape == args[1].shape
    assert ds.dtype == args[3].dtype and ds.shape == ()
    assert torch.isfinite(dq).all()
    assert_close(dq, rdq, what="dq", **tol)
    assert_close(ds, rds, what="dscale", **tol)


PAIRED_CASES = [
    # (M, N, d, E, KE, offset, classes, gathered)
    (TILE + 1, 3 * TILE + 2, 5, 0, 0, 0, 0, False),            # no exclusions, M != N
    (TILE - 1, 2 * TILE + 3, 7, 2, 1, TILE + 2, 0, True),      # a slice of k's rows, self index both sides
    (TILE + 3, 2 * TILE + 5, DCHUNK + 3, 1, 2, 7, 0, True),    # chunked d, E != KE
    (9, TILE + 4, 6, 1, 2, 5, 0, False),                       # key lists partly outside q's rows
    (TILE + 2, 3 * TILE, 6, 1, 1, TILE - 3, 3, True),          # label rule, offset > 0
    (7, TILE + 5, 4, 0, 1, 0, 2, False),                       # label rule, offset 0, independent q
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("M,N,d,E,KE,offset,classes,gathered", PAIRED_CASES, ids=lambda v: str(v))
def test_paired_backward_matches_reference(M, N, d, E, KE, offset, classes, gathered, dtype):
    check_paired(paired_case(M, N, d, dtype, E, KE, offset, classes, seed=M + N, gathered=gathered), dtype)


@pytest.mark.parametrize("case", [
    PAIRED_CASES[1],                                           # both sides: self index, a partner
    (TILE + 1, 3 * TILE, 5, 0, 1, 0, 0, False),                # only the key side's lists mark tiles masked
], ids=lambda v: str(v))
def test_paired_backward_tensor_core_path(case, monkeypatch):
    """The paired kernel's per-tile branch (interior tiles skip the exclusion rule) is taken on the
    tensor-core products only: fp32 with torch.set_float32_matmul_precision("high") (tf32; the
    interpreter computes the product in fp32)."""
    M, N, d, E, KE, offset, classes, gathered = case
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    check_paired(paired_case(M, N, d, torch.float32, E, KE, offset, classes, seed=M + N, gathered=gathered),
                 torch.float32)


@pytest.mark.parametrize("labelled", [False, True], ids=["plain", "labels"])
def test_paired_backward_symmetric_special_case(labelled):
    """k = q (as separate tensors), key side = row side, offset 0 gives the symmetric dz and dscale;
    and rows z[a:b] against all of z give exactly rows a:b of dz (a rank under a gather)."""
    n, d = 2 * TILE + 3, 6
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    s = torch.tensor(1.7, dtype=torch.float64)
    ex = torch.stack([torch.arange(n), (torch.arange(n) + n // 2) % n], 1)
    labs = NO_LABELS
    if labelled:
        lab = torch.randint(0, 4, (n,), generator=gen)
        labs = (lab, lab, (torch.arange(n) + n // 2) % n)
    r = tbackend.forward(z, z, s, Exclusion.from_tensors(ex, *labs, True))
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    dz, _, ds = tbackend.backward(g, z, z, s, Exclusion.from_tensors(ex, *labs, True), r)
    kpos = labs[2] if labelled else torch.empty(0, dtype=torch.int64)
    labels = labs if labelled else None
    dq, dsp = paired_backward(g, z.clone(), z, s, ex, labels, r, g, r, ex, kpos, 0, backend="triton")
    assert_close(dq, dz, rtol=1e-12, atol=1e-12, what="dq (full)")
    assert_close(dsp, ds, rtol=1e-12, atol=1e-12, what="dscale (full)")
    a, b = TILE - 2, 2 * TILE + 1
    part = (labs[0][a:b], labs[1], labs[2][a:b]) if labelled else None
    dq, _ = paired_backward(g[a:b], z[a:b], z, s, ex[a:b], part, r[a:b], g, r, ex, kpos, a, backend="triton")
    assert_close(dq, dz[a:b], rtol=1e-12, atol=1e-12, what="dq (slice)")


def test_paired_backward_direct_call_and_tiny_grads():
    """backward_paired called as the dispatcher calls it; g and h scaled by 1e-30 scale dq exactly."""
    g, q, k, s, ex, _, lse, h, klse, kex, kpos, off = paired_case(6, 11, 5, torch.float64, 1, 1, 2, seed=3)
    dq, ds = paired_backward(g, q, k, s, ex, None, lse, h, klse, kex, kpos, off, backend="triton")
    dq2, ds2 = paired_backward(g * 1e-30, q, k, s, ex, None, lse, h * 1e-30, klse, kex, kpos, off, backend="triton")
    assert_close(dq2 * 1e30, dq, rtol=1e-12, atol=0, what="dq")
    assert_close(ds2 * 1e30, ds, rtol=1e-12, atol=0, what="dscale")
    z0 = torch.zeros_like(g)
    h0 = torch.zeros_like(h)
    dq0, ds0 = paired_backward(z0, q, k, s, ex, None, lse, h0, klse, kex, kpos, off, backend="triton")
    assert not dq0.any() and ds0.item() == 0.0
    # only the key side: dscale is the row side's alone
    dqh, dsh = paired_backward(z0, q, k, s, ex, None, lse, h, klse, kex, kpos, off, backend="triton")
    assert dsh.item() == 0.0 and dqh.abs().sum() > 0
    with pytest.raises(ValueError, match="key_exclude"):
        paired_backward(g, q, k, s, ex, None, lse, h, klse, kex[:5], kpos, off, backend="triton")


@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck_triton_backend(symmetric):
    """torch.library.opcheck of the public op (schema, fake tensor, autograd registration,
    AOT dispatch) with the triton backend running its kernels in the interpreter."""
    q = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    k = q if symmetric else torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    exclude = torch.arange(9)[:, None] if symmetric else torch.randint(-1, 7, (9, 2))
    scale = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (9,))
    key_labels = labels if symmetric else torch.randint(0, 3, (7,))
    positive = torch.randint(-1, 7, (9,)) if not symmetric else (torch.arange(9) + 1) % 9
    torch.library.opcheck(torch.ops.infonce_kernels.lse.default,
                          (q, k, scale, exclude, labels, key_labels, positive, symmetric, "triton"))


def test_compiled_loss_triton_backend():
    """torch.compile(fullgraph=True) of a loss on the triton backend equals eager, forward and
    backward (the custom op stays opaque to the compiler and runs the kernels); d > DCHUNK: CLIP's
    forward is the one-pass pair kernel."""
    z1, z2 = torch.randn(12, DCHUNK + 6, dtype=torch.float64), torch.randn(12, DCHUNK + 6, dtype=torch.float64)

    def step(a, b):
        return infonce_kernels.nt_xent(a, b, 0.3, backend="triton") + infonce_kernels.clip_loss(a, b, 3.0, backend="triton")

    a = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    e = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    out = torch.compile(step, fullgraph=True, backend="inductor")(*a)
    want = step(*e)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    out.backward()
    want.backward()
    for x, y in zip(a, e):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- CLIP's pair forward
PAIR_FORWARD_CASES = [
    # (M, N, d): d > DCHUNK takes the one-pass kernel (row and column LSEs of one sweep), with
    # several row blocks and key tiles per program (2 groups x 2 splits under the interpreter)
    (5 * TILE + 3, 3 * TILE + 5, DCHUNK + 8),     # boundary tiles on both sides, 3 row blocks per program
    (TILE, 4 * TILE, 2 * DCHUNK),                 # whole tiles only
    (TILE + 1, 9, 8),                             # d in one chunk: two row passes
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("M,N,d", PAIR_FORWARD_CASES, ids=lambda v: str(v))
def test_pair_forward_matches_float64(M, N, d, dtype):
    """forward_pair(a, b, s) = (lse(a, b), lse(b, a)) against float64, within twice the error of
    PyTorch's own computation in the input precision."""
    gen = torch.Generator().manual_seed(M * N + d)
    a = torch.randn(M, d, generator=gen, dtype=torch.float64)
    b = torch.randn(N, d, generator=gen, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(2.3, dtype=acc)
    r, t = tbackend.forward_pair(a.to(dtype), b.to(dtype), s)
    assert r.dtype == acc and t.dtype == acc and r.shape == (M,) and t.shape == (N,)
    L = 2.3 * (a @ b.T)
    want_r, want_t = L.logsumexp(1), L.logsumexp(0)
    same = 2.3 * (a.to(dtype) @ b.to(dtype).T).to(acc)          # PyTorch in the input precision
    for got, want, plain in ((r, want_r, same.logsumexp(1)), (t, want_t, same.logsumexp(0))):
        err = (plain.double() - want).abs().max().item()
        assert (got.double() - want).abs().max().item() <= 2 * err + 1e-12


def test_opcheck_pair_forward():
    """The CLIP op with its one-pass triton forward: torch.library.opcheck (schema, fake tensor,
    autograd registration, AOT dispatch); torch.compile of clip_loss: test_compiled_loss_triton_backend."""
    a = torch.randn(TILE + 3, DCHUNK + 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(TILE - 2, DCHUNK + 6, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.infonce_kernels._lse_pair.default, (a, b, scale, "triton"))
