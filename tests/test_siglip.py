"""SigLIP's pairwise sigmoid loss (ik.siglip_loss, the op infonce_kernels.ops.sigmoid) on every
backend that implements the sigmoid op: float64 gradient checks (x, y, t, b, with and without
labels), the 2x same-precision rule against a materialised float64 oracle (SigLIP's
initialisation t = 10, b = -10, the extreme t = 100, bfloat16 inputs), the fused forward-with-
gradients sweep against the recomputing backward, rectangular inputs with a diagonal offset,
bad input, the custom ops' opcheck, torch.compile(fullgraph=True), the refused transforms and
the peak memory (no B x B tensor)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from harness import F64, assert_within

import infonce_kernels as ik
from infonce_kernels.compat import open_clip as c_clip
from infonce_kernels.ops import pairwise_sigmoid as ps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
import load  # noqa: E402
from infonce_kernels.ops.backends import sigmoid_unavailable_reason

# Every backend of the registry that runs the sigmoid op on CPU tensors here (triton under
# TRITON_INTERPRET=1, once its sigmoid kernels exist).
BACKENDS = [b for b in ik.BACKENDS if sigmoid_unavailable_reason(b, "cpu") is None]
# Shapes and dtypes per backend: the Triton interpreter is slow (one representative dtype; its
# kernels' own dtype coverage is tests/test_siglip_triton.py).
ROWS = {"triton": 9}
CASES = [(b, dtype) for b in BACKENDS for dtype in (torch.float32, torch.bfloat16)
         if b != "triton" or dtype == torch.float32]
PROBE = pathlib.Path(__file__).with_name("siglip_rss_probe.py")


def textbook_siglip(img, txt, t, b, labels=None, dtype=F64):
    """open_clip's SigLipLoss in ``dtype``, materialised: the per-image losses
    ``-sum_j logsigmoid(z_ij l_ij)`` (z = +1 on positive pairs), differentiable."""
    img, txt = img.to(dtype), txt.to(dtype)
    logits = t.to(dtype) * img @ txt.T + b.to(dtype)
    if labels is None:
        positive = torch.eye(img.shape[0], txt.shape[0], dtype=torch.bool)
    else:
        positive = labels[:, None] == labels[None, :]
    z = positive.to(dtype) * 2 - 1
    return -F.logsigmoid(z * logits).sum(1)


def sample(rows, d, dtype, t, b):
    """Unit-norm image and text rows (as SigLIP models give them) and 0-d scale and bias leaves
    in the accumulation dtype."""
    acc = F64 if dtype == F64 else torch.float32
    img = F.normalize(torch.randn(rows, d, dtype=F64), dim=1).to(dtype)
    txt = F.normalize(torch.randn(rows, d, dtype=F64), dim=1).to(dtype)
    return img, txt, torch.tensor(t, dtype=acc), torch.tensor(b, dtype=acc)


def grads(fn, img, txt, t, b, g=None):
    """(value, d img, d txt, d t, d b) of ``fn`` on fresh leaves; a (B,) value is contracted
    with ``g``."""
    leaves = [a.detach().clone().requires_grad_() for a in (img, txt, t, b)]
    out = fn(*leaves)
    (out if g is None else (out * g.to(out.dtype)).sum()).backward()
    return (out.detach(), *(a.grad for a in leaves))


class TestSigLip:
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("labelled", [False, True], ids=["diagonal", "labels"])
    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_gradcheck(self, backend, labelled, reduction):
        rows = 4 if backend == "triton" else 6
        img, txt, t, b = (a.requires_grad_() for a in sample(rows, 3, F64, 3.0, -1.5))
        labels = torch.randint(0, 3, (rows,)) if labelled else None

        def loss(*args):
            return ik.siglip_loss(*args, labels=labels, reduction=reduction, backend=backend)

        # fast mode (a random projection of the Jacobian) keeps the interpreter's calls few
        assert torch.autograd.gradcheck(loss, (img, txt, t, b), fast_mode=backend == "triton")

    @pytest.mark.parametrize("backend,dtype", CASES)
    @pytest.mark.parametrize("t,b", [(10.0, -10.0), (100.0, -10.0), (2.3, 0.7)],
                             ids=["siglip-init", "t100", "moderate"])
    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_against_float64(self, backend, dtype, t, b, reduction):
        """Value and every gradient within twice the plain same-precision computation's error;
        "mean" takes the fused sweep's gradients, "none" (a random upstream gradient per row)
        the recomputing backward."""
        rows = ROWS.get(backend, 70)
        img, txt, t, b = sample(rows, 16, dtype, t, b)
        labels = torch.randint(0, 5, (rows,)) if reduction == "none" else None
        g = torch.randn(rows, dtype=F64) if reduction == "none" else None

        def oracle(dtype_):
            def fn(*a):
                per_row = textbook_siglip(*a, labels=labels, dtype=dtype_)
                return per_row if reduction == "none" else per_row.sum() / rows
            return fn

        got = grads(lambda *a: ik.siglip_loss(*a, labels=labels, reduction=reduction, backend=backend),
                    img, txt, t, b, g)
        want = grads(oracle(F64), img, txt, t, b, g)
        plain = grads(oracle(dtype), img, txt, t, b, g)
        for name, a, w, p in zip(("loss", "dimg", "dtxt", "dt", "db"), got, want, plain):
            assert a.dtype == (dtype if name in ("dimg", "dtxt") else torch.float32), name
            assert_within(a, w, p, f"{backend} {name}", rtol=1e-6)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_rectangular_offset_and_fused_sweep(self, backend):
        """The op on M != N rows with a diagonal offset and with labels: the rows against the
        float64 oracle; the fused sweep's unit gradients equal the recomputing backward's."""
        m, n = (5, 8) if backend == "triton" else (37, 90)
        x, y = torch.randn(m, 8, dtype=F64), torch.randn(n, 8, dtype=F64)
        t, b = torch.tensor(1.7, dtype=F64), torch.tensor(-2.0, dtype=F64)
        for labels, offset in ((None, 3), (None, -2), ((torch.randint(0, 4, (m,)), torch.randint(0, 4, (n,))), 0)):
            rows = ik.ops.sigmoid(x, y, t, b, row_labels=None if labels is None else labels[0],
                                  col_labels=None if labels is None else labels[1], offset=offset, backend=backend)
            l = t * x @ y.T + b
            positive = (labels[0][:, None] == labels[1][None, :]) if labels else (
                torch.arange(m)[:, None] + offset == torch.arange(n)[None, :])
            torch.testing.assert_close(rows, -F.logsigmoid(torch.where(positive, l, -l)).sum(1), rtol=1e-12, atol=1e-12)
            fused = ik.ops.sigmoid_with_grad(x, y, t, b, labels, offset, backend)
            general = ik.ops.sigmoid_backward(torch.ones(m, dtype=F64), x, y, t, b, labels, offset, backend)
            torch.testing.assert_close(fused[0], rows, rtol=1e-12, atol=1e-12)
            for a, w in zip(fused[1:], general):
                torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)

    def test_bad_input(self):
        img, txt = torch.randn(4, 3), torch.randn(4, 3)
        t, b = torch.tensor(10.0), torch.tensor(-10.0)
        with pytest.raises(ValueError, match="image_features and text_features.*same number of rows.*diagonal"):
            ik.siglip_loss(img, txt[:3], t, b)
        with pytest.raises(ValueError, match="labels must have shape \\(4,\\)"):
            ik.siglip_loss(img, txt, t, b, labels=torch.arange(3))
        with pytest.raises(TypeError, match="labels must be an integer tensor"):
            ik.siglip_loss(img, txt, t, b, labels=torch.ones(4))
        with pytest.raises(ValueError, match="logit_scale must be finite"):
            ik.siglip_loss(img, txt, float("inf"), b)
        with pytest.raises(ValueError, match="logit_bias contains NaN or inf"):
            ik.siglip_loss(img, txt, t, torch.tensor(float("nan")))
        with pytest.raises(ValueError, match="logit_scale contains NaN or inf"):
            ik.siglip_loss(img, txt, torch.tensor([float("inf")]), b)
        with pytest.raises(TypeError, match="image_features must be float16"):
            ik.siglip_loss(img.long(), txt.long(), t, b)
        with pytest.raises(TypeError, match="image_features and text_features must have the same dtype"):
            ik.siglip_loss(img, txt.double(), t, b)
        with pytest.raises(ValueError, match="logit_bias must be a number or a one-element tensor"):
            ik.siglip_loss(img, txt, t, torch.zeros(2))
        with pytest.raises(ValueError, match="reduction"):
            ik.siglip_loss(img, txt, t, b, reduction="avg")
        with pytest.raises(ValueError, match="row_labels and col_labels go together"):
            ik.ops.sigmoid(img, txt, t, b, row_labels=torch.arange(4))
        # compiled: the shape checks run at trace time, the value checks become device asserts
        compiled = torch.compile(lambda *a: ik.siglip_loss(*a), fullgraph=True, backend="aot_eager", dynamic=False)
        torch.testing.assert_close(compiled(img, txt, t, b), ik.siglip_loss(img, txt, t, b))
        with pytest.raises(RuntimeError, match="logit_bias contains NaN or inf"):
            compiled(img, txt, t, torch.tensor(float("inf")))
        with pytest.raises(Exception, match="same number of rows"):
            compiled(img, txt[:3], t, b)

    def test_opcheck(self):
        """The custom ops (fake implementations, autograd registrations, schemas) with and without
        labels; the backend under them does not matter (cpu when built)."""
        backend = "cpu" if "cpu" in BACKENDS else "reference"
        x, y = torch.randn(5, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)
        t, b = torch.tensor(1.5, requires_grad=True), torch.tensor(-0.5, requires_grad=True)
        labels = (torch.randint(0, 3, (5,)), torch.randint(0, 3, (7,)))
        empty = torch.empty(0, dtype=torch.int64)
        torch.library.opcheck(ps.sigmoid_op, (x, y, t, b, *labels, 0, backend))
        torch.library.opcheck(ps.sigmoid_sum_op, (x, y, t, b, empty, empty, 2, backend))
        plain = [a.detach() for a in (x, y, t, b)]
        torch.library.opcheck(ps.sigmoid_with_grad_op, (*plain, *labels, 0, backend))
        torch.library.opcheck(ps.sigmoid_backward_op, (torch.randn(5), *plain, empty, empty, -1, backend))

    def test_compile_fullgraph(self):
        """Compiled values and gradients equal eager ones, for the fused ("mean") and the general
        ("none") path, with labels."""
        img, txt, t, b = sample(12, 5, torch.float32, 10.0, -10.0)
        labels = torch.randint(0, 4, (12,))
        g = torch.randn(12)

        def both(img, txt, t, b):
            mean = ik.siglip_loss(img, txt, t, b)
            rows = ik.siglip_loss(img, txt, t, b, labels=labels, reduction="none")
            return mean + (rows * g).sum()

        compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
        for a, w in zip(grads(compiled, img, txt, t, b), grads(both, img, txt, t, b)):
            torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)

    def test_transforms_and_second_order_refused(self):
        img, txt, t, b = sample(5, 3, F64, 10.0, -10.0)
        with pytest.raises(RuntimeError, match="reverse-mode autograd .* only"):
            torch.func.grad(lambda x: ik.siglip_loss(x, txt, t, b))(img)
        with pytest.raises(RuntimeError, match="reverse-mode autograd .* only"):
            torch.func.jvp(lambda x: ik.siglip_loss(x, txt, t, b), (img,), (torch.ones_like(img),))
        for reduction in ("mean", "none"):
            x = img.clone().requires_grad_()
            (gx,) = torch.autograd.grad(ik.siglip_loss(x, txt, t, b, reduction=reduction).sum(), x, create_graph=True)
            torch.testing.assert_close(gx, grads(lambda *a: textbook_siglip(*a).sum() / (5 if reduction == "mean" else 1),
                                                 img, txt, t, b)[1])
            with pytest.raises(RuntimeError, match="second-order"):
                gx.sum().backward()

    def test_module_and_no_bias(self):
        img, txt, t, _ = sample(6, 4, F64, 10.0, -10.0)
        module = ik.SigLipLoss(reduction="sum")
        assert "reduction='sum'" in repr(module)
        torch.testing.assert_close(module(img, txt, t, None), textbook_siglip(img, txt, t, torch.zeros((), dtype=F64)).sum())

    def test_open_clip_adapter_in_one_process(self):
        """The adapter's loss and gradients (features, scale, bias) are open_clip's own, with a
        bias and without one (None), and its helpers return open_clip's tensors."""
        oc = load.module("open_clip.loss")
        if oc is None:
            pytest.skip("open_clip is not installed here (pip install the test extra)")
        img, txt, t, b = sample(7, 5, F64, 10.0, -10.0)
        for bias in (b, None):
            ours = grads(lambda *a: c_clip.SigLipLoss()(*a[:3], None if bias is None else a[3]), img, txt, t, b)
            theirs = grads(lambda *a: oc.SigLipLoss()(*a[:3], None if bias is None else a[3]), img, txt, t, b)
            for a, w in zip(ours, theirs):
                if w is None:  # no bias: no gradient on either side
                    assert a is None
                else:
                    torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)
        assert c_clip.SigLipLoss()(img, txt, t, b, output_dict=True)["contrastive_loss"].shape == ()
        torch.testing.assert_close(c_clip.SigLipLoss().get_logits(img, txt, t, b), oc.SigLipLoss().get_logits(img, txt, t, b))
        torch.testing.assert_close(c_clip.SigLipLoss().get_ground_truth("cpu", F64, 4),
                                   oc.SigLipLoss().get_ground_truth("cpu", F64, 4))
        with pytest.raises(ValueError, match="dist_impl"):
            c_clip.SigLipLoss(dist_impl="ring")

    @pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ extension not built")
    def test_peak_memory_has_no_b_by_b_tensor(self):
        """Peak extra resident memory of a forward+backward (fresh subprocesses): the cpu backend
        stays far below one B x B float32 matrix, which the materialising loss holds several of."""
        rows, dim = 2048, 64

        out = subprocess.run([sys.executable, str(PROBE), "--loss", "cpu", "materialising", "--rows", str(rows),
                              "--dim", str(dim)], capture_output=True, text=True, check=True, timeout=300)
        fused, materialising = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
        assert materialising["extra_bytes"] >= rows * rows * 4, materialising
        assert fused["extra_bytes"] * 16 <= materialising["extra_bytes"], (fused, materialising)
