"""GPU tests of the hand-written CUDA backend (csrc/cuda), backend="cuda".

Skipped unless a CUDA device is available AND infonce_kernels was built with its CUDA kernels.
Oracle: an fp64 computation that materialises L = s q k^T. Accuracy rule: the kernel's error is at
most 2x the error of the same computation done by PyTorch in the input precision, plus a small
tolerance (the kernels accumulate in fp32, so they are usually far better than that).
"""
import math

import pytest
import torch

pytestmark = pytest.mark.gpu

infonce_kernels = pytest.importorskip("infonce_kernels")


def _cuda_backend_built():
    if not torch.cuda.is_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("infonce_kernels::lse_fwd", "CUDA")
    except Exception:  # op not registered at all
        return False


if not _cuda_backend_built():
    pytest.skip("needs a CUDA device and infonce_kernels built with its CUDA kernels",
                allow_module_level=True)

DEV = "cuda"
# the fp32 "same precision" baseline must be true fp32 (the kernels do not use TF32)
torch.backends.cuda.matmul.allow_tf32 = False
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mask(exclude, M, N, device):
    """(M, N) bool: True where (i, j) is excluded."""
    m = torch.zeros(M, N, dtype=torch.bool, device=device)
    if exclude is not None and exclude.numel():
        rows = torch.arange(M, device=device).unsqueeze(1).expand_as(exclude)
        ok = exclude >= 0
        m[rows[ok], exclude[ok]] = True
    return m


def _lse_materialised(q, k, scale, exclude, symmetric, dtype):
    """lse and its autograd through a materialised L, computed in `dtype` (fp64 = oracle)."""
    q = q.detach().to(dtype).requires_grad_(True)
    k = q if symmetric else k.detach().to(dtype).requires_grad_(True)
    s = scale.detach().to(dtype).requires_grad_(True)
    L = s * (q @ k.T)
    L = L.masked_fill(_mask(exclude, q.shape[0], k.shape[0], q.device), float("-inf"))
    return torch.logsumexp(L, dim=1), q, k, s


def _grads(q, k, scale, exclude, symmetric, g, dtype):
    r, qq, kk, ss = _lse_materialised(q, k, scale, exclude, symmetric, dtype)
    (r * g.to(r.dtype)).sum().backward()
    return r.detach(), qq.grad, (None if symmetric else kk.grad), ss.grad


def _run_cuda(q, k, scale, exclude, symmetric, g):
    q = q.detach().clone().requires_grad_(True)
    k = q if symmetric else k.detach().clone().requires_grad_(True)
    s = scale.detach().clone().requires_grad_(True)
    ex = exclude if exclude is not None and exclude.numel() else None
    r = infonce_kernels.lse(q, k, s, exclude=ex, symmetric=symmetric, backend="cuda")
    (r * g.to(r.dtype)).sum().backward()
    return r.detach(), q.grad, (None if symmetric else k.grad), s.grad


def _err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def _check(name, got, ref, same_prec, dtype):
    tol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 1e-3)
    tol = tol * (1.0 + ref.double().abs().max().item())
    e_k, e_t = _err(got, ref), _err(same_prec, ref)
    assert math.isfinite(e_k), f"{name}: non-finite values"
    assert e_k <= 2.0 * e_t + tol, f"{name}: kernel error {e_k:.3e} > 2 x torch {e_t:.3e} + {tol:.1e}"


def _inputs(M, N, d, dtype, E, symmetric, seed, scale=10.0, normalize=True):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(M, d, generator=gen, dtype=torch.float64)
    k = torch.randn(N, d, generator=gen, dtype=torch.float64)
    if normalize:
        q = torch.nn.functional.normalize(q, dim=1)
        k = torch.nn.functional.normalize(k, dim=1)
    if E == 0:
        exclude = torch.empty(M, 0, dtype=torch.int64)
    elif symmetric:
        # self + a "positive" (nt_xent / DCL pattern); second column -1 or a duplicate sometimes
        cols = [torch.arange(M)]
        if E == 2:
            pos = (torch.arange(M) + M // 2) % M
            pos[::5] = -1
            pos[1::7] = torch.arange(M)[1::7]  # duplicate of self
            cols.append(pos)
        exclude = torch.stack(cols, dim=1)
    else:
        exclude = torch.randint(-1, N, (M, E), generator=gen)
        if N <= E:  # never exclude every key of a row
            exclude.fill_(-1)
    g = torch.rand(M, generator=gen, dtype=torch.float64) + 0.1
    g[::3] *= -1.0
    acc = _acc(dtype)
    return (q.to(DEV, dtype), k.to(DEV, dtype), torch.tensor(scale, dtype=acc, device=DEV),
            exclude.to(DEV), g.to(DEV, acc))


SHAPES = [  # (M, N, d)
    (1, 1, 1),
    (7, 13, 3),
    (64, 64, 64),
    (33, 65, 8),
    (100, 257, 130),  # d > 128: several feature chunks, odd d -> scalar loads
    (130, 70, 256),   # two output chunks, vectorised loads
    (200, 300, 128),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("E", [0, 1, 2])
def test_lse_general(dtype, shape, E):
    M, N, d = shape
    q, k, s, ex, g = _inputs(M, N, d, dtype, E, False, seed=M * 131 + N * 7 + d + E)
    ref = _grads(q, k, s, ex, False, g, torch.float64)
    same = _grads(q, k, s, ex, False, g, dtype)
    got = _run_cuda(q, k, s, ex, False, g)
    assert got[0].dtype == _acc(dtype) and got[0].shape == (M,)
    for name, a, b, c in zip(("lse", "dq", "dk", "dscale"), got, ref, same):
        _check(name, a, b, c, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (9, 3), (64, 32), (130, 130), (257, 64), (96, 300)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("E", [1, 2])
def test_lse_symmetric(dtype, shape, E):
    M, d = shape
    z, _, s, ex, g = _inputs(M, M, d, dtype, E, True, seed=M * 17 + d + E, scale=2.0)
    ref = _grads(z, z, s, ex, True, g, torch.float64)
    same = _grads(z, z, s, ex, True, g, dtype)
    got = _run_cuda(z, z, s, ex, True, g)
    for name, a, b, c in zip(("lse", "dz", None, "dscale"), got, ref, same):
        if name is not None:
            _check(name, a, b, c, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_excluded_tile_no_nan(dtype):
    # N = 66: the second key tile holds keys 64 and 65 only, and every row excludes both.
    M, N, d = 5, 66, 16
    q, k, s, _, g = _inputs(M, N, d, dtype, 0, False, seed=3)
    ex = torch.tensor([[64, 65]] * M, device=DEV)
    ref = _grads(q, k, s, ex, False, g, torch.float64)
    got = _run_cuda(q, k, s, ex, False, g)
    for a in got:
        assert torch.isfinite(a).all()
    same = _grads(q, k, s, ex, False, g, dtype)
    for name, a, b, c in zip(("lse", "dq", "dk", "dscale"), got, ref, same):
        _check(name, a, b, c, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_conventions(dtype):
    M, N, d = 20, 30, 24
    q, k, s, ex, g = _inputs(M, N, d, dtype, 1, False, seed=5)
    ops = torch.ops.infonce_kernels
    r = ops.lse_fwd(q, k, s, ex, False)
    assert r.dtype == _acc(dtype) and r.shape == (M,) and r.device == q.device
    dq, dk, ds = ops.lse_bwd(g, q, k, s, ex, False, r)
    assert dq.dtype == dtype and dq.shape == q.shape
    assert dk.dtype == dtype and dk.shape == k.shape
    assert ds.dim() == 0 and ds.dtype == s.dtype
    z = q
    exs = torch.arange(M, device=DEV).unsqueeze(1)
    rz = ops.lse_fwd(z, z, s, exs, True)
    dz, dk2, ds2 = ops.lse_bwd(g, z, z, s, exs, True, rz)
    assert dz.shape == z.shape and dz.dtype == dtype
    assert dk2.numel() == 0
    assert ds2.dim() == 0 and ds2.dtype == s.dtype


@pytest.mark.parametrize("symmetric", [False, True])
def test_deterministic(symmetric):
    M, d = 300, 64
    q, k, s, ex, g = _inputs(M, M, d, torch.bfloat16, 1, symmetric, seed=11)
    if symmetric:
        k = q
    ops = torch.ops.infonce_kernels
    r = ops.lse_fwd(q, k, s, ex, symmetric)
    a = ops.lse_bwd(g, q, k, s, ex, symmetric, r)
    b = ops.lse_bwd(g, q, k, s, ex, symmetric, r)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_bad_inputs_name_the_argument():
    ops = torch.ops.infonce_kernels
    q = torch.randn(4, 8, device=DEV)
    s = torch.tensor(1.0, device=DEV)
    ex = torch.empty(4, 0, dtype=torch.int64, device=DEV)
    with pytest.raises(RuntimeError, match="k must have q's dtype"):
        ops.lse_fwd(q, q.half(), s, ex, False)
    with pytest.raises(RuntimeError, match="exclude must be int64"):
        ops.lse_fwd(q, q, s, ex.int(), False)
    with pytest.raises(RuntimeError, match="scale must be"):
        ops.lse_fwd(q, q, s.double(), ex, False)
    with pytest.raises(RuntimeError, match="k must have q's feature dimension"):
        ops.lse_fwd(q, torch.randn(4, 9, device=DEV), s, ex, False)
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        ops.lse_fwd(torch.randn(8, 4, device=DEV).T, q, s, ex, False)


def test_current_stream_and_other_device():
    q, k, s, ex, g = _inputs(50, 70, 32, torch.float16, 1, False, seed=7)
    ref = torch.ops.infonce_kernels.lse_fwd(q, k, s, ex, False)
    st = torch.cuda.Stream()
    with torch.cuda.stream(st):
        r = torch.ops.infonce_kernels.lse_fwd(q, k, s, ex, False)
    st.synchronize()
    assert torch.equal(r, ref)
    if torch.cuda.device_count() > 1:
        dev = torch.device("cuda", 1)
        r1 = torch.ops.infonce_kernels.lse_fwd(q.to(dev), k.to(dev), s.to(dev), ex.to(dev), False)
        assert r1.device == dev
        assert torch.equal(r1.cpu(), ref.cpu())
