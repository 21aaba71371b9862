"""Triton backend on a CUDA device: accuracy, scale, determinism, extreme temperatures.

Marked ``gpu`` (skipped without CUDA by tests/conftest.py, and here when the
triton backend reports itself unavailable). The scale (2B up to 262,144), 20-run determinism
and extreme-temperature tests also run the ``cuda`` backend when it is built. Run with ``pytest -m gpu``; the
whole file takes well under a minute on an H100 apart from the 2B = 262,144
case (~10-30 s of fp64 reference work).

Accuracy rule (after flash-attention, tests/harness.py assert_within): against an fp64 reference
computed on the *same* (rounded) inputs, the kernel's max abs error must be at most twice the error
of the same-precision plain PyTorch computation, plus a small tolerance relative to the reference's
magnitude.
"""
from __future__ import annotations

import pytest
import torch
from harness import assert_within, backend_lse, dense_lse, lse_grads, paired_backward, unavailable_reason

import infonce_kernels
import infonce_kernels.triton as tbackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"


def no_labels():
    """(row_labels, key_labels, positive) all empty: the label rule off."""
    return (torch.empty(0, dtype=torch.int64, device=DEV),) * 3


@pytest.fixture(scope="module", autouse=True)
def _triton_on_cuda():
    ok, why = tbackend.available(DEV)
    if not ok:
        pytest.skip(f"triton backend unavailable: {why}")


# ----------------------------------------------------------------------------- helpers
# The oracle, the same-precision baseline (tests/harness.py dense_lse in float64 / the input dtype:
# logits rounded once to 16 bits, the scale applied in fp32) and the 2x rule come from the harness.
def torch_lse(q, k, scale, exclude, compute_dtype):
    return dense_lse(q, k, scale, exclude, None, compute_dtype)


def lse_and_grads(fn, q, k, scale, exclude, g, symmetric):
    """Run ``fn`` (q, k, scale) -> lse and return (lse, dq, dk-or-None, dscale)."""
    return lse_grads(fn, q, k, scale, g, symmetric)


def triton_fn(exclude, symmetric, backend="triton"):
    return backend_lse(exclude, None, symmetric, backend)


# The scale, determinism and extreme-temperature tests run the cuda backend too, when it is built.
KERNEL_BACKENDS = ["triton", "cuda"]


def _needs(backend):
    why = unavailable_reason(backend, torch.device(DEV))
    if why:
        pytest.skip(f"{backend} backend unavailable: {why}")


def check_rule(actual, expected, baseline, rtol, what):
    assert_within(actual, expected, baseline, what, rtol=rtol)


def make_inputs(M, N, d, dtype, symmetric, E, scale, normalize=False, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(M, d, device=DEV, generator=gen)
    if normalize:
        q = torch.nn.functional.normalize(q, dim=1)
    q = q.to(dtype)
    if symmetric:
        k = q
    else:
        k = torch.randn(N, d, device=DEV, generator=gen)
        k = (torch.nn.functional.normalize(k, dim=1) if normalize else k).to(dtype)
    s = torch.tensor(scale, device=DEV, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ex = torch.full((M, E), -1, dtype=torch.int64, device=DEV)
    if E >= 1:
        ex[:, 0] = torch.arange(M, device=DEV) if symmetric else torch.randint(0, N, (M,), device=DEV, generator=gen)
    if E >= 2:
        ex[:, 1] = (torch.arange(M, device=DEV) + M // 2) % N if symmetric else \
            torch.randint(-1, N, (M,), device=DEV, generator=gen)
    g = torch.randn(M, device=DEV, generator=gen, dtype=torch.float64) / M
    return q, k, s, ex, g


# ----------------------------------------------------------------------------- accuracy rule
ACCURACY_CASES = [
    # (M, N, d, symmetric, E, scale)
    (1000, 1000, 128, True, 1, 1 / 0.1),
    (2048, 2048, 64, True, 2, 1 / 0.5),
    (777, 1500, 128, False, 0, 1 / 0.07),
    (513, 129, 200, False, 2, 10.0),       # chunked d, odd sizes
]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32", "fp32-tf32"])
@pytest.mark.parametrize("M,N,d,symmetric,E,scale", ACCURACY_CASES)
def test_accuracy_vs_same_precision_torch(M, N, d, symmetric, E, scale, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "fp32-tf32" else "highest")
    try:
        q, k, s, ex, g = make_inputs(M, N, d, dtype, symmetric, E, scale, normalize=(dtype == torch.float16))
        kern = lse_and_grads(triton_fn(ex, symmetric), q, k, s, ex, g, symmetric)
        same = lse_and_grads(lambda a, b, c: torch_lse(a, b, c, ex, dtype), q, k, s, ex, g, symmetric)
        ref = lse_and_grads(lambda a, b, c: torch_lse(a, b, c, ex, torch.float64), q, k, s, ex, g, symmetric)
    finally:
        torch.set_float32_matmul_precision(old)
    for name, a, b, c in zip(["lse", "dq", "dk", "dscale"], kern, same, ref):
        if c is None:
            continue
        assert a.dtype == (torch.float32 if name in ("lse", "dscale") else dtype), name
        rtol = {"fp32": 1e-5, "fp32-tf32": 1e-4}.get(precision, 1e-3)
        check_rule(a, c, b, rtol=rtol, what=f"{precision} {name}")


# ----------------------------------------------------------------------------- scale
def chunked_reference(z, scale, g, chunk=2048):
    """fp64 row LSE and dz for symmetric, self-excluded NT-Xent-style rows, without an N x N buffer.

    r_I  = logsumexp_j (s <z_I, z_j>)   (j != i)
    dz   = s sum over row chunks I of (W_I z  scattered to I) + (W_I^T z_I)
    ds   = sum_I sum_j W_Ij <z_i, z_j>
    """
    z64 = z.double()
    n = z64.shape[0]
    s = float(scale)
    r = torch.empty(n, dtype=torch.float64, device=z.device)
    for i0 in range(0, n, chunk):
        i1 = min(i0 + chunk, n)
        L = (z64[i0:i1] @ z64.T).mul_(s)
        L[torch.arange(i1 - i0, device=z.device), torch.arange(i0, i1, device=z.device)] = float("-inf")
        r[i0:i1] = torch.logsumexp(L, dim=1)
        del L
    dz = torch.zeros_like(z64)
    ds = torch.zeros((), dtype=torch.float64, device=z.device)
    for i0 in range(0, n, chunk):
        i1 = min(i0 + chunk, n)
        D = z64[i0:i1] @ z64.T
        P = (D * s).sub_(r[i0:i1, None]).exp_()
        P[torch.arange(i1 - i0, device=z.device), torch.arange(i0, i1, device=z.device)] = 0.0
        W = P.mul_(g.double()[i0:i1, None])
        ds += (W * D).sum()
        dz[i0:i1] += s * (W @ z64)
        dz += s * (W.T @ z64[i0:i1])
        del D, P, W
    return r, dz, ds


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("n", [65536, 262144])
def test_large_batch_against_chunked_fp64(n, backend):
    _needs(backend)
    d = 128
    gen = torch.Generator(device=DEV).manual_seed(n)
    z = torch.nn.functional.normalize(torch.randn(n, d, device=DEV, generator=gen), dim=1).to(torch.bfloat16)
    s = torch.tensor(1 / 0.1, device=DEV)
    ex = torch.arange(n, device=DEV)[:, None]
    g = torch.full((n,), 1.0 / n, device=DEV, dtype=torch.float32)    # mean reduction
    zz = z.detach().clone().requires_grad_()
    ss = s.clone().requires_grad_()
    r = infonce_kernels.lse(zz, zz, ss, exclude=ex, symmetric=True, backend=backend)
    dz, ds = torch.autograd.grad(r, [zz, ss], g)
    r_ref, dz_ref, ds_ref = chunked_reference(z, s, g)
    assert torch.isfinite(r).all() and torch.isfinite(dz.float()).all()
    assert (r.double() - r_ref).abs().max().item() < 2e-3
    rel = (dz.double() - dz_ref).norm() / dz_ref.norm()
    assert rel.item() < 1e-2, f"dz relative error {rel.item():.2e}"
    assert abs(ds.item() - ds_ref.item()) <= 1e-3 * abs(ds_ref.item()) + 1e-6


def test_int64_offsets():
    """rows x d > 2**31 elements: pointer offsets must not wrap in int32."""
    d = 128
    M = (2**31) // d + 257
    N = 64
    gen = torch.Generator(device=DEV).manual_seed(1)
    try:
        q = torch.randn(M, d, device=DEV, dtype=torch.bfloat16, generator=gen)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    k = torch.randn(N, d, device=DEV, dtype=torch.bfloat16, generator=gen)
    s = torch.tensor(0.1, device=DEV)
    ex = torch.empty(M, 0, dtype=torch.int64, device=DEV)
    r = tbackend.forward(q, k, s, ex, *no_labels(), False)
    g = torch.ones(M, device=DEV)
    dq, dk, _ = tbackend.backward(g, q, k, s, ex, *no_labels(), False, r)
    tail = slice(M - 300, M)
    L = 0.1 * (q[tail].double() @ k.double().T)
    r_ref = torch.logsumexp(L, 1)
    assert (r[tail].double() - r_ref).abs().max().item() < 1e-3
    P = torch.softmax(L, 1)
    dq_ref = 0.1 * (P @ k.double())
    assert (dq[tail].double() - dq_ref).abs().max().item() < 2e-3 * dq_ref.abs().max().item() + 1e-4
    assert torch.isfinite(dk.float()).all()


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_bitwise_deterministic_20_runs(symmetric, backend):
    _needs(backend)
    n, d = 8192, 128
    q, k, s, ex, g = make_inputs(n, n, d, torch.bfloat16, symmetric, 1, 1 / 0.2, normalize=True, seed=3)
    first = None
    for _ in range(20):
        out = lse_and_grads(triton_fn(ex, symmetric, backend), q, k, s, ex, g, symmetric)
        out = [t for t in out if t is not None]
        if first is None:
            first = out
        else:
            for a, b in zip(first, out):
                assert torch.equal(a, b)


# ----------------------------------------------------------------------------- extreme temperatures
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("symmetric,scale", [(True, 1 / 0.01), (False, 100.0)], ids=["tau0.01", "logit_scale100"])
def test_extreme_scale_bf16(symmetric, scale, backend):
    _needs(backend)
    n, d = 4096, 128
    q, k, s, ex, g = make_inputs(n, n, d, torch.bfloat16, symmetric, 1 if symmetric else 0, scale,
                                 normalize=True, seed=4)
    kern = lse_and_grads(triton_fn(ex, symmetric, backend), q, k, s, ex, g, symmetric)
    same = lse_and_grads(lambda a, b, c: torch_lse(a, b, c, ex, torch.bfloat16), q, k, s, ex, g, symmetric)
    ref = lse_and_grads(lambda a, b, c: torch_lse(a, b, c, ex, torch.float64), q, k, s, ex, g, symmetric)
    for name, a, b, c in zip(["lse", "dq", "dk", "dscale"], kern, same, ref):
        if c is None:
            continue
        assert torch.isfinite(a.float()).all(), name
        check_rule(a, c, b, rtol=2e-3, what=f"s={scale} {name}")


def test_nt_xent_through_loss():
    """The public loss picks triton for CUDA tensors by default and agrees with the reference."""
    z1 = torch.randn(1024, 128, device=DEV)
    z2 = torch.randn(1024, 128, device=DEV)
    a = infonce_kernels.nt_xent(z1, z2, 0.1, backend="triton")
    b = infonce_kernels.nt_xent(z1.double(), z2.double(), 0.1, backend="reference")
    assert abs(a.item() - b.item()) < 1e-4 * max(1.0, abs(b.item()))


# ----------------------------------------------------------------------------- paired backward
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("labelled", [False, True], ids=["plain", "labels"])
def test_paired_backward_gathered_rows(dtype, labelled):
    """A rank's rows z[off:off+m] against all rows z (NT-Xent exclusions on both sides, key side
    in z's numbering): dq against the fp64 reference backend, and against rows of the symmetric dz."""
    n, m, off, d = 4096, 1000, 2048, 128
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        gen = torch.Generator(device=DEV).manual_seed(9)
        z = torch.nn.functional.normalize(torch.randn(n, d, device=DEV, generator=gen), dim=1).to(dtype)
        s = torch.tensor(1 / 0.1, device=DEV)
        idx = torch.arange(n, device=DEV)
        ex = torch.stack([idx, (idx + n // 2) % n], 1)
        labs = no_labels()
        kpos = labs[0]
        if labelled:
            lab = torch.randint(0, 32, (n,), device=DEV, generator=gen)
            labs = (lab, lab, (idx + n // 2) % n)
            kpos = labs[2]
        r = tbackend.forward(z, z, s, ex, *labs, True)
        g = torch.randn(n, device=DEV, generator=gen) / n
        dz, _, ds_sym = tbackend.backward(g, z, z, s, ex, *labs, True, r)
        rows = slice(off, off + m)
        part = (labs[0][rows], labs[1], labs[2][rows]) if labelled else None
        args = [g[rows], z[rows], z, s, ex[rows], part, r[rows], g, r, ex, kpos, off]
        dq, ds = paired_backward(*args, backend="triton")
        f64 = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        rdq, rds = paired_backward(*f64, backend="reference")
    finally:
        torch.set_float32_matmul_precision(old)
    assert dq.dtype == dtype and dq.shape == (m, d) and ds.dtype == torch.float32
    assert torch.isfinite(dq.float()).all()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    rel = ((dq.double() - rdq).norm() / rdq.norm()).item()
    assert rel < tol, f"dq relative error {rel:.2e}"
    assert abs(ds.item() - rds.item()) <= tol * abs(rds.item()) + 1e-6
    rel = ((dq.double() - dz[rows].double()).norm() / dz[rows].double().norm()).item()
    assert rel < tol, f"dq vs symmetric dz rows: relative error {rel:.2e}"
    # determinism
    dq2, ds2 = paired_backward(*args, backend="triton")
    assert torch.equal(dq, dq2) and torch.equal(ds, ds2)
