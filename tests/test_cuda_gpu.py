"""GPU tests of the hand-written CUDA backend (csrc/cuda), backend="cuda".

Skipped unless a CUDA device is available AND infonce_kernels was built with its CUDA kernels.
Oracle: tests/harness.py dense_lse, an fp64 computation that materialises L = s q k^T and the
(M, N) exclusion mask (lists + label rule). Accuracy rule (harness assert_within): the kernel's
error is at most 2x the error of the same computation done by PyTorch in the input precision, plus
a small tolerance (the kernels accumulate in fp32, so they are usually far better than that).
"""
import pytest
import torch
from harness import assert_within, backend_lse, exclusion_mask, lse_grads, oracle_lse

pytestmark = pytest.mark.gpu

infonce_kernels = pytest.importorskip("infonce_kernels")


def _cuda_backend_built():
    if not torch.cuda.is_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("infonce_kernels::_lse_fwd", "CUDA")
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


def _mask(exclude, M, N, device, labels=None):
    """(M, N) bool: True where (i, j) is excluded: j in row i's list, or (labels given)
    row_labels[i] == key_labels[j] and j != positive[i] (tests/harness.py exclusion_mask)."""
    return exclusion_mask(exclude, labels, M, N, device)


def _grads(q, k, scale, exclude, symmetric, g, dtype, labels=None):
    """lse and its autograd through a materialised L, computed in `dtype` (fp64 = oracle)."""
    return lse_grads(oracle_lse(exclude, labels, dtype), q, k, scale, g, symmetric)


def _run_cuda(q, k, scale, exclude, symmetric, g, labels=None):
    ex = exclude if exclude is not None and exclude.numel() else None
    return lse_grads(backend_lse(ex, labels, symmetric, "cuda"), q, k, scale, g, symmetric)


def _no_labels():
    return (torch.empty(0, dtype=torch.int64, device=DEV),) * 3


def _check(name, got, ref, same_prec, dtype):
    """The 2x rule (tests/harness.py assert_within) with tol (1 + max|ref|)."""
    tol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 1e-3)
    assert_within(got, ref, same_prec, name, rtol=tol, atol=tol)


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


def _labels(M, N, exclude, symmetric, seed, classes=3):
    """(row_labels, key_labels, positive) on DEV with many same-label pairs, positives that are
    same-label keys, -1, a different-label key (a no-op) or a listed key (still excluded). Rows
    the rule would leave with no key get a fresh label of their own (the op requires >= 1 key).
    symmetric: key_labels IS row_labels (the dispatcher passes the same tensor)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    row_labels = torch.randint(0, classes, (M,), generator=gen)
    key_labels = row_labels if symmetric else torch.randint(0, classes, (N,), generator=gen)
    positive = torch.full((M,), -1, dtype=torch.int64)
    for i in range(M):
        same = (key_labels == row_labels[i]).nonzero().flatten()
        if symmetric:
            same = same[same != i]
        kind = int(torch.randint(0, 4, (1,), generator=gen))
        if kind <= 1 and same.numel():  # a same-label key: the usual designated positive
            positive[i] = same[int(torch.randint(0, same.numel(), (1,), generator=gen))]
        elif kind == 2:  # any key (different label: no effect)
            positive[i] = int(torch.randint(0, N, (1,), generator=gen))
    ex = exclude.cpu() if exclude is not None else None
    fresh = 1000
    for _ in range(M + 1):  # fresh labels only remove exclusions: this terminates
        full = _mask(ex, M, N, "cpu", (row_labels, key_labels, positive)).all(dim=1)
        if not full.any():
            break
        i = int(full.nonzero()[0])
        row_labels[i] = fresh  # symmetric: also key i's label
        fresh += 1
    rl = row_labels.to(DEV)
    return rl, (rl if symmetric else key_labels.to(DEV)), positive.to(DEV)


def _shape_id(shape):
    """Test id of an (M, N, d) or (M, d) shape: "MxNxd"."""
    return "x".join(map(str, shape))


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
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
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
                         ids=_shape_id)
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
    for lab in (_no_labels(), _labels(M, N, None, False, seed=5)):
        r = ops._lse_fwd(q, k, s, ex, [*lab], False)
        assert r.dtype == _acc(dtype) and r.shape == (M,) and r.device == q.device
        dq, dk, ds = ops._lse_bwd(g, q, k, s, ex, [*lab], False, r)
        assert dq.dtype == dtype and dq.shape == q.shape
        assert dk.dtype == dtype and dk.shape == k.shape
        assert ds.dim() == 0 and ds.dtype == s.dtype
    z = q
    exs = torch.arange(M, device=DEV).unsqueeze(1)
    for lab in (_no_labels(), _labels(M, M, exs, True, seed=6)):
        rz = ops._lse_fwd(z, z, s, exs, [*lab], True)
        dz, dk2, ds2 = ops._lse_bwd(g, z, z, s, exs, [*lab], True, rz)
        assert dz.shape == z.shape and dz.dtype == dtype
        assert dk2.numel() == 0
        assert ds2.dim() == 0 and ds2.dtype == s.dtype


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("labelled", [False, True])
def test_deterministic(symmetric, labelled):
    M, d = 300, 64
    q, k, s, ex, g = _inputs(M, M, d, torch.bfloat16, 1, symmetric, seed=11)
    if symmetric:
        k = q
    lab = _labels(M, M, ex, symmetric, seed=12) if labelled else _no_labels()
    ops = torch.ops.infonce_kernels
    r = ops._lse_fwd(q, k, s, ex, [*lab], symmetric)
    a = ops._lse_bwd(g, q, k, s, ex, [*lab], symmetric, r)
    b = ops._lse_bwd(g, q, k, s, ex, [*lab], symmetric, r)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_bad_inputs_name_the_argument():
    # Shared checks (csrc/op_checks.h) plus the CUDA binding's own (contiguity, device kind).
    ops = torch.ops.infonce_kernels
    q = torch.randn(4, 8, device=DEV)
    s = torch.tensor(1.0, device=DEV)
    ex = torch.empty(4, 0, dtype=torch.int64, device=DEV)
    nl = _no_labels()
    with pytest.raises(RuntimeError, match="q and k must have the same dtype"):
        ops._lse_fwd(q, q.half(), s, ex, [*nl], False)
    with pytest.raises(RuntimeError, match="exclude must be int64"):
        ops._lse_fwd(q, q, s, ex.int(), [*nl], False)
    with pytest.raises(RuntimeError, match="scale must be"):
        ops._lse_fwd(q, q, s.double(), ex, [*nl], False)
    with pytest.raises(RuntimeError, match="same feature size"):
        ops._lse_fwd(q, torch.randn(4, 9, device=DEV), s, ex, [*nl], False)
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        ops._lse_fwd(torch.randn(8, 4, device=DEV).T, q, s, ex, [*nl], False)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        ops._lse_fwd(q.cpu(), q, s, ex, [*nl], False)  # CUDA args elsewhere: dispatches to CUDA
    lab = torch.zeros(4, dtype=torch.int64, device=DEV)
    pos = torch.full((4,), -1, dtype=torch.int64, device=DEV)
    with pytest.raises(RuntimeError, match="row_labels must have shape"):
        ops._lse_fwd(q, q, s, ex, [lab[:3], lab, pos], False)
    with pytest.raises(RuntimeError, match="key_labels must have shape"):
        ops._lse_fwd(q, q, s, ex, [lab, lab[:3], pos], False)
    with pytest.raises(RuntimeError, match="positive must have shape"):
        ops._lse_fwd(q, q, s, ex, [lab, lab, pos[:3]], False)
    with pytest.raises(RuntimeError, match="must be int64"):
        ops._lse_fwd(q, q, s, ex, [lab.int(), lab, pos], False)
    with pytest.raises(RuntimeError, match="on the device of q"):
        ops._lse_fwd(q, q, s, ex, [lab, lab.cpu(), pos], False)
    with pytest.raises(RuntimeError, match="key_labels must be contiguous"):
        ops._lse_fwd(q, q, s, ex, [lab, torch.zeros(8, dtype=torch.int64, device=DEV)[::2], pos], False)


def test_current_stream_and_other_device():
    q, k, s, ex, g = _inputs(50, 70, 32, torch.float16, 1, False, seed=7)
    nl = _no_labels()
    ref = torch.ops.infonce_kernels._lse_fwd(q, k, s, ex, [*nl], False)
    st = torch.cuda.Stream()
    with torch.cuda.stream(st):
        r = torch.ops.infonce_kernels._lse_fwd(q, k, s, ex, [*nl], False)
    st.synchronize()
    assert torch.equal(r, ref)
    if torch.cuda.device_count() > 1:
        dev = torch.device("cuda", 1)
        r1 = torch.ops.infonce_kernels._lse_fwd(q.to(dev), k.to(dev), s.to(dev), ex.to(dev),
                                               [t.to(dev) for t in nl], False)
        assert r1.device == dev
        assert torch.equal(r1.cpu(), ref.cpu())


# ------------------------------------------------------------------------------------------------
# The label rule: (i, j) also excluded when row_labels[i] == key_labels[j] and j != positive[i].
# Every kernel has a labelled instantiation (LBL = true): forward mma / simt, backward kRow (dq),
# kCol (dk: the excluding row is the column-side index) and kSym (W^T uses row j's rule).
# ------------------------------------------------------------------------------------------------
TILE_EDGE_SHAPES = [  # (M, N, d): 1-row / 1-key tiles, tile edges, several key tiles, d > 128
    (1, 1, 4),
    (7, 13, 3),
    (64, 64, 64),
    (65, 130, 32),
    (100, 257, 130),
]
LABEL_SHAPES = TILE_EDGE_SHAPES + [(200, 300, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LABEL_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("E", [0, 2])
def test_labels_general(dtype, shape, E):
    M, N, d = shape
    seed = M * 31 + N * 3 + d + E
    q, k, s, ex, g = _inputs(M, N, d, dtype, E, False, seed=seed)
    lab = _labels(M, N, ex, False, seed=seed + 1)
    ref = _grads(q, k, s, ex, False, g, torch.float64, lab)
    same = _grads(q, k, s, ex, False, g, dtype, lab)
    got = _run_cuda(q, k, s, ex, False, g, lab)
    for name, a, b, c in zip(("lse", "dq", "dk", "dscale"), got, ref, same):
        _check(name, a, b, c, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 8), (64, 32), (130, 130), (257, 64)], ids=_shape_id)
@pytest.mark.parametrize("E", [1, 2])
def test_labels_symmetric(dtype, shape, E):
    M, d = shape
    seed = M * 13 + d + E
    z, _, s, ex, g = _inputs(M, M, d, dtype, E, True, seed=seed, scale=2.0)
    lab = _labels(M, M, ex, True, seed=seed + 1)
    ref = _grads(z, z, s, ex, True, g, torch.float64, lab)
    same = _grads(z, z, s, ex, True, g, dtype, lab)
    got = _run_cuda(z, z, s, ex, True, g, lab)
    for name, a, b, c in zip(("lse", "dz", None, "dscale"), got, ref, same):
        if name is not None:
            _check(name, a, b, c, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_labels_symmetric_distinct_key_labels_match_cpu(dtype):
    # The op reads key_labels as given even when symmetric (the W^T term uses row_labels[j],
    # key_labels[i], positive[j]), like the CPU backend: compare the two on the same inputs.
    M, d = 70, 24
    z, _, s, ex, g = _inputs(M, M, d, dtype, 1, True, seed=21, scale=2.0)
    gen = torch.Generator(device="cpu").manual_seed(22)
    rl = torch.randint(0, 4, (M,), generator=gen)
    kl = torch.randint(4, 6, (M,), generator=gen)
    kl[::3] = rl[::3]
    pos = torch.randint(-1, M, (M,), generator=gen)
    lab = (rl.to(DEV), kl.to(DEV), pos.to(DEV))
    assert not _mask(ex, M, M, DEV, lab).all(dim=1).any()
    ops = torch.ops.infonce_kernels
    zc = z.cpu()
    r = ops._lse_fwd(z, z, s, ex, [*lab], True)
    r_cpu = ops._lse_fwd(zc, zc, s.cpu(), ex.cpu(), [*(t.cpu() for t in lab)], True)
    dz, _, ds = ops._lse_bwd(g, z, z, s, ex, [*lab], True, r)
    dz_cpu, _, ds_cpu = ops._lse_bwd(g.cpu(), zc, zc, s.cpu(), ex.cpu(), [t.cpu() for t in lab],
                                    True, r_cpu)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 3e-2)
    torch.testing.assert_close(r.cpu(), r_cpu, rtol=tol, atol=tol)
    torch.testing.assert_close(dz.cpu().double(), dz_cpu.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(ds.cpu().double(), ds_cpu.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_labels_all_distinct_equal_no_labels(dtype, symmetric):
    # With every label distinct (and no self-pairs sharing a label unless symmetric, where the
    # self-index is listed anyway) the rule excludes nothing: the labelled kernels must give
    # exactly the label-free results (same arithmetic, only the mask differs).
    M, N, d = 90, 90 if symmetric else 150, 40
    q, k, s, ex, g = _inputs(M, N, d, dtype, 1, symmetric, seed=31)
    if symmetric:
        k = q
        rl = torch.arange(M, device=DEV)
        lab = (rl, rl, torch.full((M,), -1, dtype=torch.int64, device=DEV))
    else:
        lab = (torch.arange(M, device=DEV), torch.arange(N, device=DEV) + M,
               torch.randint(-1, N, (M,), device=DEV))
    ops = torch.ops.infonce_kernels
    r0 = ops._lse_fwd(q, k, s, ex, [*_no_labels()], symmetric)
    r1 = ops._lse_fwd(q, k, s, ex, [*lab], symmetric)
    assert torch.equal(r0, r1)
    b0 = ops._lse_bwd(g, q, k, s, ex, [*_no_labels()], symmetric, r0)
    b1 = ops._lse_bwd(g, q, k, s, ex, [*lab], symmetric, r0)
    for x, y in zip(b0, b1):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_labels_all_excluded_tile_no_nan(dtype):
    # N = 66: keys 64, 65 (the second key tile) share every row's label and no row names them as
    # its positive -> that tile is fully excluded by the rule alone; keys 0..63 have other labels.
    M, N, d = 5, 66, 16
    q, k, s, ex, g = _inputs(M, N, d, dtype, 0, False, seed=4)
    kl = torch.arange(N, device=DEV) + 10
    kl[64:] = 7
    lab = (torch.full((M,), 7, dtype=torch.int64, device=DEV), kl,
           torch.tensor([0, 1, -1, 63, 2], device=DEV))
    got = _run_cuda(q, k, s, ex, False, g, lab)
    for a in got:
        assert torch.isfinite(a).all()
    ref = _grads(q, k, s, ex, False, g, torch.float64, lab)
    same = _grads(q, k, s, ex, False, g, dtype, lab)
    for name, a, b, c in zip(("lse", "dq", "dk", "dscale"), got, ref, same):
        _check(name, a, b, c, dtype)


# ------------------------------------------------------------------------------------------------
# lse_bwd_paired: dq_i = s sum_j (W_ij + V_ji) k_j, V_ji = h_j exp(s <q_i, k_j> - rho_j) on the
# pairs key j (as a row, its keys the rows of q numbered from row_offset) keeps. The CUDA op runs
# the symmetric backward's two-sided kernels (mode kSym) with the key side's pointers.
# Oracles: infonce_kernels.reference.backward_paired in fp64 (and the CPU op in fp64); the
# "same precision" baseline is the textbook formula below evaluated in the input dtype.
# ------------------------------------------------------------------------------------------------
from infonce_kernels import reference as _reference  # noqa: E402
from infonce_kernels.ops import Exclusion  # noqa: E402


def _key_mask(key_exclude, key_labels, row_labels, key_positive, row_offset, M, N, device,
              labelled):
    """(N, M) bool: True where key j, as a row, leaves row i out: i + row_offset in
    key_exclude[j], or (labelled) key_labels[j] == row_labels[i] and key_positive[j] != i + off."""
    local = key_exclude - row_offset
    local = torch.where((key_exclude >= 0) & (local >= 0) & (local < M), local,
                        torch.full_like(local, -1))
    labels = (key_labels, row_labels, key_positive - row_offset) if labelled else None
    return _mask(local, N, M, device, labels)


def _paired_textbook(p, dtype):
    """(dq, dscale) materialised, every operation in `dtype` (fp64 = a second oracle)."""
    q, k = p["q"].to(dtype), p["k"].to(dtype)
    s = p["scale"].to(dtype)
    M, N = q.shape[0], k.shape[0]
    lab = (p["row_labels"], p["key_labels"], p["positive"]) if p["labelled"] else None
    wmask = _mask(p["exclude"], M, N, q.device, lab)
    vmask = _key_mask(p["key_exclude"], p["key_labels"], p["row_labels"], p["key_positive"],
                      p["row_offset"], M, N, q.device, p["labelled"])
    dots = q @ k.T
    w = torch.exp((dots * s).masked_fill(wmask, float("-inf")) - p["lse"].to(dtype)[:, None])
    w = w * p["grad"].to(dtype)[:, None]
    v = torch.exp((dots * s).masked_fill(vmask.T, float("-inf")) - p["key_lse"].to(dtype)[None, :])
    v = v * p["key_grad"].to(dtype)[None, :]
    return s * ((w + v) @ k), (w * dots).sum()


_PAIRED_ORDER = ("grad", "q", "k", "scale", "exclude", "row_labels", "key_labels", "positive",
                 "lse", "key_grad", "key_lse", "key_exclude", "key_positive", "row_offset")


def _paired_args(p, device=None, dtype=None):
    """The op's positional arguments; `device` moves every tensor, `dtype` casts q/k and the
    accumulation-typed tensors (scale, grad, lse, key_grad, key_lse) to dtype / its acc type."""
    args = []
    for name in _PAIRED_ORDER:
        x = p[name]
        if isinstance(x, torch.Tensor):
            if dtype is not None and name in ("q", "k"):
                x = x.to(dtype)
            elif dtype is not None and x.is_floating_point():
                x = x.to(_acc(dtype))
            if device is not None:
                x = x.to(device)
        args.append(x)
    return _packed(args)


def _packed(flat):
    """The op's schema from the flat _PAIRED_ORDER values: the labels and the key side as lists."""
    grad, q, k, scale, exclude, row_labels, key_labels, positive, lse, kg, kl, kx, kp, row_offset = flat
    return (grad, q, k, scale, exclude, [row_labels, key_labels, positive], lse, [kg, kl, kx, kp], row_offset)


def _paired_inputs(M, N, d, dtype, E, E_key, row_offset, labelled, seed, scale=5.0, classes=3):
    """Inputs of lse_bwd_paired on DEV. q's rows sit at [row_offset, row_offset + M) of a gathered
    batch of row_offset + M + 3 rows: key_exclude / key_positive hold indices below, inside and
    above that range and -1. lse is the rows' exact log-sum-exp (no row fully excluded); key_lse
    is the keys' unmasked log-sum-exp over q plus a random (0, 1) (the other ranks' rows)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(M, d, generator=gen, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(N, d, generator=gen, dtype=torch.float64), dim=1)
    total = row_offset + M + 3
    exclude = torch.randint(-1, N, (M, E), generator=gen)
    if N <= E:
        exclude.fill_(-1)
    key_exclude = torch.randint(-1, total, (N, E_key), generator=gen)
    if E_key and M > 1:  # make sure many entries hit local rows
        key_exclude[::2, 0] = torch.randint(0, M, (key_exclude[::2, 0].numel(),), generator=gen) + row_offset
    empty = torch.empty(0, dtype=torch.int64)
    row_labels, key_labels, positive, key_positive = empty, empty, empty, empty
    if labelled:
        row_labels = torch.randint(0, classes, (M,), generator=gen)
        key_labels = torch.randint(0, classes, (N,), generator=gen)
        positive = torch.randint(-1, N, (M,), generator=gen)
        for i in range(0, M, 2):  # half the rows: a same-label key as the positive
            same = (key_labels == row_labels[i]).nonzero().flatten()
            if same.numel():
                positive[i] = same[int(torch.randint(0, same.numel(), (1,), generator=gen))]
        key_positive = torch.randint(-1, total, (N,), generator=gen)
        for j in range(0, N, 2):
            same = (row_labels == key_labels[j]).nonzero().flatten()
            if same.numel():
                key_positive[j] = same[int(torch.randint(0, same.numel(), (1,), generator=gen))] + row_offset
        fresh = 1000
        for _ in range(M + 1):  # no row of q may lose every key
            full = _mask(exclude, M, N, "cpu", (row_labels, key_labels, positive)).all(dim=1)
            if not full.any():
                break
            row_labels[int(full.nonzero()[0])] = fresh
            fresh += 1
    s = torch.tensor(scale, dtype=torch.float64)
    # The rows' lse from the inputs as the kernels see them (rounded to dtype), in fp64.
    qr, kr = q.to(dtype).double(), k.to(dtype).double()
    lab = (row_labels, key_labels, positive) if labelled else None
    L = (s * (qr @ kr.T)).masked_fill(_mask(exclude, M, N, "cpu", lab), float("-inf"))
    lse = torch.logsumexp(L, dim=1)
    assert torch.isfinite(lse).all()
    key_lse = torch.logsumexp(s * (kr @ qr.T), dim=1) + torch.rand(N, generator=gen, dtype=torch.float64)
    g = torch.rand(M, generator=gen, dtype=torch.float64) + 0.1
    g[::3] *= -1.0
    # Row i gets sum_j V_ji ~ (N / M) |h| from the keys and ~ |g_i| from its own row: scale h by
    # M / N (when > 1) so a key-side mistake stays visible in bf16 / fp16 when M >> N.
    h = (torch.rand(N, generator=gen, dtype=torch.float64) + 0.1) * max(1.0, M / N)
    h[1::4] *= -1.0
    acc = _acc(dtype)
    return {
        "grad": g.to(DEV, acc), "q": q.to(DEV, dtype), "k": k.to(DEV, dtype),
        "scale": s.to(DEV, acc), "exclude": exclude.to(DEV), "row_labels": row_labels.to(DEV),
        "key_labels": key_labels.to(DEV), "positive": positive.to(DEV), "lse": lse.to(DEV, acc),
        "key_grad": h.to(DEV, acc), "key_lse": key_lse.to(DEV, acc),
        "key_exclude": key_exclude.to(DEV), "key_positive": key_positive.to(DEV),
        "row_offset": row_offset, "labelled": labelled,
    }


def _check_paired(p, dtype):
    got = torch.ops.infonce_kernels._lse_bwd_paired(*_paired_args(p))
    grad, q, k, scale, exclude, labels, lse, (kg, kl, kx, kp), offset = _paired_args(p, dtype=torch.float64)
    spec = Exclusion.from_tensors(exclude, *labels)
    ref = _reference.backward_paired(grad, q, k, scale, spec, lse, kg, kl, spec.keys_as_rows(kx, kp), offset)
    # The textbook masks agree with the reference's (fp64, same formula): guards the oracle.
    tb = _paired_textbook(p, torch.float64)
    torch.testing.assert_close(tb[0], ref[0], rtol=1e-10, atol=1e-10)
    same = _paired_textbook(p, dtype)
    assert got[0].dtype == dtype and got[0].shape == p["q"].shape
    assert got[1].dim() == 0 and got[1].dtype == p["scale"].dtype
    for name, a, b, c in zip(("dq", "dscale"), got, ref, same):
        _check(name, a, b, c, dtype)
    return got


PAIRED_SHAPES = TILE_EDGE_SHAPES + [(200, 70, 256)]  # and several row tiles with M > N
PAIRED_SIDES = [  # (E, E_key, row_offset, labelled)
    (0, 0, 0, False),
    (2, 1, 0, True),
    (1, 2, 37, False),
    (2, 2, 100, True),
]


def _sides_id(sides):
    """Test id of a PAIRED_SIDES entry: "E2-Ek1-off0-lbl"."""
    E, E_key, off, labelled = sides
    return "E{}-Ek{}-off{}-{}".format(E, E_key, off, "lbl" if labelled else "nolbl")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PAIRED_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("sides", PAIRED_SIDES, ids=_sides_id)
def test_paired_vs_reference(dtype, shape, sides):
    M, N, d = shape
    E, E_key, off, labelled = sides
    p = _paired_inputs(M, N, d, dtype, E, E_key, off, labelled, seed=M * 7 + N * 3 + d + off + E_key)
    _check_paired(p, dtype)


@pytest.mark.parametrize("shape", [(7, 13, 3), (65, 130, 32), (100, 257, 130)], ids=_shape_id)
@pytest.mark.parametrize("sides", PAIRED_SIDES, ids=_sides_id)
def test_paired_fp64_matches_cpu_op(shape, sides):
    M, N, d = shape
    E, E_key, off, labelled = sides
    p = _paired_inputs(M, N, d, torch.float64, E, E_key, off, labelled, seed=M + N + d + off)
    ops = torch.ops.infonce_kernels
    dq, ds = ops._lse_bwd_paired(*_paired_args(p))
    dq_cpu, ds_cpu = ops._lse_bwd_paired(*_paired_args(p, device="cpu"))
    tol = 1e-10 * (1.0 + dq_cpu.abs().max().item())
    torch.testing.assert_close(dq.cpu(), dq_cpu, rtol=1e-10, atol=tol)
    torch.testing.assert_close(ds.cpu(), ds_cpu, rtol=1e-10, atol=1e-10 * (1.0 + ds_cpu.abs().item()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("labelled", [False, True])
def test_paired_symmetric_case_equals_lse_bwd(dtype, labelled):
    # k = q, key side = row side, row_offset 0: the paired op is the symmetric backward, run by
    # the same kernel with the same pointers -> bit-identical results.
    M, d = 130, 40
    z, _, s, ex, g = _inputs(M, M, d, dtype, 2, True, seed=41, scale=2.0)
    lab = _labels(M, M, ex, True, seed=42) if labelled else _no_labels()
    ops = torch.ops.infonce_kernels
    r = ops._lse_fwd(z, z, s, ex, [*lab], True)
    dz, _, ds = ops._lse_bwd(g, z, z, s, ex, [*lab], True, r)
    dq, ds2 = ops._lse_bwd_paired(g, z, z, s, ex, [*lab], r, [g, r, ex, lab[2]], 0)
    assert torch.equal(dq, dz)
    assert torch.equal(ds2, ds)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paired_one_side_gradient(dtype):
    # g = 0 (only the key side contributes: the fp16/bf16 normalisation max|.| must cover h),
    # then h = 0 (only the row side), then both 0 (dq = 0, no NaN).
    M, N, d = 70, 90, 48
    p = _paired_inputs(M, N, d, dtype, 1, 2, 11, True, seed=51)
    base_g, base_h = p["grad"], p["key_grad"]
    p["grad"] = torch.zeros_like(base_g)
    p["key_grad"] = base_h * 50.0
    dq, ds = _check_paired(p, dtype)
    assert dq.abs().max().item() > 0 and ds.item() == 0.0
    p["grad"], p["key_grad"] = base_g, torch.zeros_like(base_h)
    _check_paired(p, dtype)
    p["grad"] = torch.zeros_like(base_g)
    dq, ds = torch.ops.infonce_kernels._lse_bwd_paired(*_paired_args(p))
    assert torch.equal(dq, torch.zeros_like(dq)) and ds.item() == 0.0


def test_paired_deterministic_and_current_stream():
    p = _paired_inputs(300, 200, 64, torch.bfloat16, 1, 2, 5, True, seed=61)
    ops = torch.ops.infonce_kernels
    a = ops._lse_bwd_paired(*_paired_args(p))
    b = ops._lse_bwd_paired(*_paired_args(p))
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        c = ops._lse_bwd_paired(*_paired_args(p))
    st.synchronize()
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_paired_bad_inputs_name_the_argument():
    p = _paired_inputs(6, 9, 8, torch.float32, 1, 1, 2, True, seed=71)
    ops = torch.ops.infonce_kernels

    def call(**over):
        q = dict(p, **over)
        return ops._lse_bwd_paired(*_packed([q[n] for n in _PAIRED_ORDER]))

    call()  # valid
    bad = [  # (message, the one argument changed)
        ("key_grad must have shape", dict(key_grad=p["key_grad"][:5])),
        ("key_lse must have shape", dict(key_lse=p["key_lse"].double())),
        ("key_exclude must be int64", dict(key_exclude=p["key_exclude"].int())),
        ("key_positive must have shape", dict(key_positive=p["key_positive"][:3])),
        ("row_offset must be >= 0", dict(row_offset=-1)),
        ("key_exclude must be contiguous",
         dict(key_exclude=torch.zeros(9, 2, dtype=torch.int64, device=DEV)[:, :1])),
        ("key_grad must be contiguous", dict(key_grad=torch.zeros(18, device=DEV)[::2])),
        ("key-side tensors must be on the device of k", dict(key_lse=p["key_lse"].cpu())),
        ("q must be a CUDA tensor", dict(q=p["q"].cpu())),
        ("lse must be the", dict(lse=p["lse"][:2])),
    ]
    for message, over in bad:
        with pytest.raises(RuntimeError, match=message):
            call(**over)
