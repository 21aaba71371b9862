"""The fused op itself: one suite of cases run on every backend (reference, cpu, triton under the
interpreter, and the kernel backends of a CUDA device when there is one) against the float64
oracle under the 2x same-precision rule; gradcheck, the cpu backend's tile edges, opcheck,
registration, exclusions, the label rule and numerics."""

import pytest
import torch
from harness import (
    CPU_BACKENDS,
    HALF,
    backend_lse,
    check_lse,
    dense_lse,
    device_backends,
    fused_lse_pair,
    lse_case,
    lse_grads,
    oracle_lse,
    paired_backward,
    pairwise_mask,
    random_exclude,
    sample_lse,
)

import infonce_kernels
from infonce_kernels import lse


def _inputs(m, n, d, dtype, symmetric):
    q = torch.randn(m, d, dtype=dtype)
    k = q if symmetric else torch.randn(n, d, dtype=dtype)
    return q, k


# (m, n, d, symmetric, exclusion width, label classes): odd shapes around the 16-row/16-key tiles
# and the 32-wide d chunk of the Triton interpreter, duplicates and -1 in the lists, the label rule.
OP_CASES = [
    (1, 1, 1, False, 0, 0),
    (15, 17, 3, False, 0, 0),
    (17, 15, 33, False, 0, 0),        # d > chunk: the chunked-d path, d not a power of 2
    (113, 37, 20, False, 0, 0),
    (17, 19, 5, False, 1, 0),
    (15, 33, 12, False, 2, 0),
    (17, 17, 7, True, 1, 0),
    (35, 35, 41, True, 2, 0),
    (113, 113, 10, True, 1, 0),
    (19, 33, 6, False, 1, 3),         # label rule: same-label keys skipped except the positive
    (33, 33, 6, True, 1, 3),
]


def _dtypes(device):
    return [torch.float32, torch.float64] + (list(HALF) if device == "cuda" else [])


@pytest.mark.parametrize("backend,device", device_backends(), ids=lambda v: str(v))
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: "x".join(map(str, c[:3])) + ("-sym" if c[3] else "")
                         + f"-E{c[4]}" + (f"-L{c[5]}" if c[5] else ""))
def test_lse_matches_float64(backend, device, case):
    """Values and every gradient of the public op against the float64 oracle on the same inputs,
    each dtype the backend takes: float64 to 1e-12, lower precisions by the 2x rule."""
    m, n, d, symmetric, width, classes = case
    for dtype in _dtypes(device):
        inputs = sample_lse(m, n, d, dtype, symmetric=symmetric, width=width, classes=classes, device=device)
        fn = backend_lse(inputs["exclude"], inputs["labels"], symmetric, backend)
        if dtype == torch.float64:
            check_lse(fn, inputs, rtol=1e-12, atol=1e-12)
        else:
            check_lse(fn, inputs, rtol={torch.float32: 1e-5}.get(dtype, 1e-3), atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("width", [0, 1, 2])
def test_gradcheck(backend, symmetric, width):
    m, n, d = (6, 6, 4) if symmetric else (7, 5, 3)
    q, k = _inputs(m, n, d, torch.float64, symmetric)
    q.requires_grad_()
    if not symmetric:
        k.requires_grad_()
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    exclude = random_exclude(m, n, width) if width else None
    if symmetric and width:
        exclude[:, 0] = torch.arange(m)  # self, as NT-Xent does

    def f(q, k, scale):
        return lse(q, q if symmetric else k, scale, exclude=exclude, symmetric=symmetric, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, scale))


SIZES = [1, 2, 3, 17, 129, 1000]


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("d", [1, 3, 64, 130])
def test_cpu_matches_float64_reference(m, n, d):
    """cpu backend in float32 vs float64 math, values and all three gradients."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("C++ extension not built")
    width = (m + n + d) % 3
    q, k = _inputs(m, n, d, torch.float32, False)
    exclude = random_exclude(m, n, width) if width else None
    g = torch.randn(m)
    scale = 0.7
    _check_against_reference(q, k, scale, exclude, g, symmetric=False)


def _check_against_reference(q, k, scale, exclude, g, symmetric, rtol=1e-5):
    """The cpu backend in float32: value and gradients by the 2x rule (baseline: the oracle in
    float32, which is what the reference backend computes)."""
    case = lse_case(q, k, scale, exclude, None, g.double(), symmetric)
    check_lse(backend_lse(exclude, None, symmetric, "cpu"), case, rtol=rtol, atol=rtol / 10)


@pytest.mark.parametrize(
    "m,n,d,width",
    [(200, 2100, 16, 2), (65, 1025, 7, 1), (1, 3000, 5, 2), (130, 1, 9, 0)],
)
def test_cpu_several_key_blocks(m, n, d, width):
    """Shapes that cross the cpu backend's 64-row and 1024-key tile edges."""
    q, k = _inputs(m, n, d, torch.float32, False)
    exclude = random_exclude(m, n, width) if width else None
    _check_against_reference(q, k, 1.3, exclude, torch.randn(m), symmetric=False)


@pytest.mark.parametrize("n,d", [(3, 3), (17, 64), (129, 130), (1500, 32)])
def test_cpu_symmetric(n, d):
    z = torch.randn(n, d)
    exclude = torch.stack([torch.arange(n), (torch.arange(n) + n // 2) % n], 1)
    _check_against_reference(z, z, 2.0, exclude, torch.randn(n), symmetric=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(backend, dtype):
    q, k = torch.randn(70, 48).to(dtype), torch.randn(1100, 48).to(dtype)
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    out = lse(qq, kk, 0.5, backend=backend)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert qq.grad.dtype == dtype and kk.grad.dtype == dtype
    ones = torch.ones(70, dtype=torch.float64)
    r64, dq64, dk64, _ = lse_grads(oracle_lse(), q.double(), k.double(), 0.5, ones, False)
    # Inputs are exact in float64; only accumulation and the final cast add error.
    torch.testing.assert_close(out.double(), r64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qq.grad.double(), dq64, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(kk.grad.double(), dk64, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_but_one_key_excluded(backend):
    """Rows left with a single key: the lse is exactly that key's logit, never NaN."""
    q, k = torch.randn(5, 4), torch.randn(3, 4)
    exclude = torch.tensor([[0, 1]] * 5)
    out = lse(q, k, 1.0, exclude=exclude, backend=backend)
    torch.testing.assert_close(out, q @ k[2], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="C++ extension not built")
def test_cpu_fully_excluded_key_block():
    """Keys 1024 and 1025 form the cpu backend's last key block; row 0 excludes both, so that
    tile is all -inf for it and must leave its running sum untouched."""
    q, k = torch.randn(3, 4), torch.randn(1026, 4)
    exclude = torch.tensor([[1024, 1025], [1025, -1], [-1, -1]])
    out = lse(q, k, 40.0, exclude=exclude, backend="cpu")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), dense_lse(q, k, 40.0, exclude), rtol=1e-6, atol=1e-5)


def test_cpu_fully_masked_first_key_block():
    """The label rule masks exactly the cpu backend's first key block (keys 0..1023, label 0) for
    rows 0 and 1; row 1's exclusion list also drops the first two keys of the second block; row 2's
    label occurs nowhere. With large logits the online LSE starts from an all -inf tile and must
    not turn exp(-inf - (-inf)) into NaN. Values and gradients against the masked fp64 formula."""
    n = 1100
    key_labels = torch.zeros(n, dtype=torch.int64)
    key_labels[1024:] = torch.arange(1, n - 1023)  # distinct, none is 0 or -5
    row_labels = torch.tensor([0, 0, -5])
    exclude = torch.tensor([[-1, -1], [1024, 1025], [-1, -1]])
    q = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    out = lse(q, k, 30.0, exclude=exclude, row_labels=row_labels, key_labels=key_labels, backend="cpu")
    out.sum().backward()
    masked = row_labels[:, None] == key_labels[None, :]
    masked[1, 1024:1026] = True
    assert masked[:2, :1024].all() and not masked[0, 1024:].any() and not masked[2].any()
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    want = torch.logsumexp((30.0 * q2 @ k2.T).masked_fill(masked, float("-inf")), 1)
    want.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k.grad, k2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_scale_is_finite(backend):
    """s = 100 on unit vectors: logits up to 100 must not overflow exp."""
    q = torch.nn.functional.normalize(torch.randn(40, 16), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(50, 16), dim=1).requires_grad_()
    out = lse(q, k, 100.0, backend=backend)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    torch.testing.assert_close(out.double(), dense_lse(q.detach(), k.detach(), 100.0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck(backend, symmetric):
    q = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    k = q if symmetric else torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    exclude = torch.arange(9)[:, None] if symmetric else random_exclude(9, 7, 2)
    scale = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    no_labels = (torch.empty(0, dtype=torch.long),) * 3
    torch.library.opcheck(torch.ops.infonce_kernels.lse.default, (q, k, scale, exclude, *no_labels, symmetric, backend))
    labels = torch.randint(0, 3, (9,))
    key_labels = labels if symmetric else torch.randint(0, 3, (7,))
    positive = torch.randint(-1, 7, (9,))
    torch.library.opcheck(torch.ops.infonce_kernels.lse.default,
                          (q, k, scale, exclude, labels, key_labels, positive, symmetric, backend))


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="C++ extension not built")
def test_opcheck_cpp_ops():
    q, k = torch.randn(9, 5), torch.randn(11, 5)
    scale, exclude = torch.tensor(1.5), random_exclude(9, 11, 2)
    for labels in [(torch.empty(0, dtype=torch.long),) * 3,
                   (torch.randint(0, 3, (9,)), torch.randint(0, 3, (11,)), torch.randint(-1, 11, (9,)))]:
        args = (q, k, scale, exclude, list(labels), False)
        out = torch.ops.infonce_kernels._lse_fwd(*args)
        torch.library.opcheck(torch.ops.infonce_kernels._lse_fwd.default, args)
        torch.library.opcheck(torch.ops.infonce_kernels._lse_bwd.default, (torch.randn(9), *args, out))


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="C++ extension not built")
def test_cpp_ops_check_their_arguments():
    """Direct callers of the C++ op get an error naming the argument, not a crash."""
    q, k = torch.randn(4, 3), torch.randn(5, 2)
    none = torch.empty(0, dtype=torch.long)
    fwd = torch.ops.infonce_kernels._lse_fwd
    with pytest.raises(RuntimeError, match="feature size"):
        fwd(q, k, torch.tensor(1.0), torch.empty(4, 0, dtype=torch.long), [], False)
    with pytest.raises(RuntimeError, match="exclude"):
        fwd(q, q, torch.tensor(1.0), torch.zeros(4, 3, dtype=torch.long), [], False)
    with pytest.raises(RuntimeError, match="key_labels must have shape"):
        fwd(q, q, torch.tensor(1.0), torch.zeros(4, 1, dtype=torch.long), [torch.zeros(4, dtype=torch.long),
            torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long)], False)


def test_backend_selection(monkeypatch):
    assert infonce_kernels.resolve_backend("auto", torch.device("cpu")) in CPU_BACKENDS
    monkeypatch.setenv("INFONCE_BACKEND", "reference")
    assert infonce_kernels.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert infonce_kernels.resolve_backend("cpu", torch.device("cpu")) == "cpu"
    monkeypatch.setenv("INFONCE_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors"):
        lse(torch.randn(3, 2), torch.randn(3, 2), 1.0)
    with pytest.raises(RuntimeError, match="not available"):
        lse(torch.randn(3, 2), torch.randn(3, 2), 1.0, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        lse(torch.randn(3, 2), torch.randn(3, 2), 1.0, backend="fast")


def test_result_independent_of_thread_count():
    """dscale partials are summed in block order: the same bits with 1 or 2 threads."""
    q, k = torch.randn(300, 16), torch.randn(1500, 16)
    scale = torch.tensor(1.1, requires_grad=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            s = scale.detach().clone().requires_grad_()
            lse(qq, kk, s, backend="cpu").sum().backward()
            results.append((qq.grad, kk.grad, s.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _label_reference(q, k, scale, exclude, row_labels, key_labels, positive):
    """float64 logits with the lists and the label rule written out pair by pair."""
    mask = pairwise_mask(exclude, (row_labels, key_labels, positive), q.shape[0], k.shape[0])
    return (scale * (q.double() @ k.double().T)).masked_fill(mask, float("-inf"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_label_rule_matches_pairwise_definition(backend, symmetric):
    m, n, d = (40, 40, 6) if symmetric else (37, 70, 6)
    q, k = _inputs(m, n, d, torch.float64, symmetric)
    row_labels = torch.randint(0, 4, (m,))
    key_labels = row_labels if symmetric else torch.randint(0, 4, (n,))
    # each row's positive: a key of its own class (so that the rule keeps it), or none
    positive = torch.tensor([int(torch.nonzero(key_labels == row_labels[i])[0]) if i % 3 else -1 for i in range(m)])
    exclude = torch.arange(m)[:, None] if symmetric else random_exclude(m, n, 1)
    logits = _label_reference(q, k, 1.4, exclude, row_labels, key_labels, positive)
    keep = torch.isfinite(logits).any(1)
    assert keep.all(), "test setup: every row keeps a key"
    qq = q.clone().requires_grad_()
    kk = qq if symmetric else k.clone().requires_grad_()
    out = lse(qq, kk, 1.4, exclude=exclude, symmetric=symmetric, row_labels=row_labels,
              key_labels=None if symmetric else key_labels, positive=positive, backend=backend)
    torch.testing.assert_close(out, torch.logsumexp(logits, 1), rtol=1e-10, atol=1e-10)
    g = torch.randn(m, dtype=torch.float64)
    (out * g).sum().backward()
    q2 = q.clone().requires_grad_()
    k2 = q2 if symmetric else k.clone().requires_grad_()
    ref_logits = torch.where(torch.isfinite(logits), 1.4 * (q2 @ k2.T), float("-inf"))
    (torch.logsumexp(ref_logits, 1) * g).sum().backward()
    torch.testing.assert_close(qq.grad, q2.grad, rtol=1e-9, atol=1e-10)
    if not symmetric:
        torch.testing.assert_close(kk.grad, k2.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_label_rule_gradcheck(backend, symmetric):
    m, n = (8, 8) if symmetric else (7, 9)
    q, k = _inputs(m, n, 3, torch.float64, symmetric)
    q.requires_grad_()
    if not symmetric:
        k.requires_grad_()
    labels = torch.arange(m) % 3
    key_labels = labels if symmetric else torch.arange(n) % 4
    positive = torch.tensor([int(torch.nonzero(key_labels == labels[i])[-1]) for i in range(m)])
    exclude = torch.arange(m)[:, None] if symmetric else None
    scale = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)

    def f(q, k, scale):
        return lse(q, q if symmetric else k, scale, exclude=exclude, symmetric=symmetric, row_labels=labels,
                   key_labels=key_labels, positive=positive, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, scale))


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="C++ extension not built")
def test_cpu_label_rule_across_tiles():
    """The label rule on shapes that span several 64-row and 1024-key tiles, float32."""
    q, k = torch.randn(150, 24), torch.randn(2200, 24)
    row_labels, key_labels = torch.randint(0, 7, (150,)), torch.randint(0, 7, (2200,))
    positive = torch.randint(-1, 2200, (150,))
    exclude = random_exclude(150, 2200, 2)
    labels = dict(row_labels=row_labels, key_labels=key_labels, positive=positive)
    qq, kk, ss = q.clone().requires_grad_(), k.clone().requires_grad_(), torch.tensor(0.9, requires_grad=True)
    out = lse(qq, kk, ss, exclude=exclude, backend="cpu", **labels)
    g = torch.randn(150)
    (out * g).sum().backward()
    qr, kr, sr = q.clone().requires_grad_(), k.clone().requires_grad_(), torch.tensor(0.9, requires_grad=True)
    ref = lse(qr, kr, sr, exclude=exclude, backend="reference", **labels)
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qq.grad, qr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kk.grad, kr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ss.grad, sr.grad, rtol=1e-4, atol=1e-4)


def _paired_case(labelled, offset):
    """A rank's rows z[offset:offset+M] against all rows z, NT-Xent style exclusions, both sides."""
    n, m, d = 90, 30, 5
    z = torch.randn(n, d, dtype=torch.float64)
    exclude = torch.stack([torch.arange(n), (torch.arange(n) + n // 2) % n], 1)
    labels = torch.randint(0, 4, (n,))
    positive = (torch.arange(n) + n // 2) % n
    lab = (labels, labels, positive) if labelled else None
    r = lse(z, z, 1.7, exclude=exclude, symmetric=True, backend="reference",
            **(dict(row_labels=labels, positive=positive) if labelled else {}))
    g = torch.randn(n, dtype=torch.float64)
    rows = slice(offset, offset + m)
    row_lab = (labels[rows], labels, positive[rows]) if labelled else None
    args = (g[rows], z[rows], z, torch.tensor(1.7, dtype=torch.float64), exclude[rows], row_lab, r[rows],
            g, r, exclude, positive if labelled else torch.empty(0, dtype=torch.long), offset)
    return z, exclude, lab, r, g, rows, args


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("offset", [0, 60])
def test_paired_backward_is_a_slice_of_the_symmetric_gradient(backend, labelled, offset):
    """Rows z[offset:offset+M] against all of z with both sides' statistics give exactly those
    rows of the symmetric gradient dz = s (W + W^T) z: what a rank computes under a gather."""
    z, exclude, lab, r, g, rows, args = _paired_case(labelled, offset)
    zz = z.clone().requires_grad_()
    extra = dict(row_labels=lab[0], positive=lab[2]) if labelled else {}
    (lse(zz, zz, 1.7, exclude=exclude, symmetric=True, backend="reference", **extra) * g).sum().backward()
    dq, _ = paired_backward(*args, backend)
    torch.testing.assert_close(dq, zz.grad[rows], rtol=1e-10, atol=1e-12)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="C++ extension not built")
def test_opcheck_paired():
    _, _, _, _, _, _, args = _paired_case(True, 30)
    args = list(args)
    labels = args.pop(5)
    flat = (*args[:5], *labels, *args[5:])
    grad, q, k, scale, exclude, row_labels, key_labels, positive, lse, kg, kl, kx, kp, offset = flat
    kernel_args = (grad, q, k, scale, exclude, [row_labels, key_labels, positive], lse, [kg, kl, kx, kp], offset)
    torch.library.opcheck(torch.ops.infonce_kernels._lse_bwd_paired.default, kernel_args)
    torch.library.opcheck(torch.ops.infonce_kernels._lse_backward_paired.default, (*flat, "cpu"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_lse_pair(backend):
    """CLIP's two directions as one op, whose backward gives each side in one paired pass."""
    a = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.infonce_kernels._lse_pair.default, (a, b, scale, backend))
    assert torch.autograd.gradcheck(lambda a, b, s: fused_lse_pair(a, b, s, backend), (a, b, scale))
