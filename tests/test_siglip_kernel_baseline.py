"""The siglip-kernel baseline (the fused GPU SigLIP package the GPU benchmark times beside ours) on CPU.

What the GPU runs cannot show on a CPU machine: that the provider's call convention
(``benchmarks.cases.siglip.siglip_kernel_loss``: our logit scale t passed as its log temperature,
its sum / B as our mean, the bias as is) gives ``ik.siglip_loss``'s loss and gradients (x, y, t, b).
siglip-kernel's package import and its "auto" routing read the CUDA device's architecture; here
``torch.cuda.get_device_capability`` answers an H100/H200's (9, 0) and its Triton kernels run under
the interpreter on CPU tensors. Checked under the 2x same-precision rule against ``ik.siglip_loss``
in float64, the plain computation being open_clip's materialising formula in the dtype under test
(the fused backends' d/dt besides within the rounding bound of its formula, see
``siglip_kernel_dscale_rounding``):
its pure-PyTorch "reference" backend (float64, float32), its Triton "chunked_bf16" backend (float32)
and the default "auto" backend on bf16 (the GPU benchmark's configuration); then the GPU script's
own comparison (scripts/gpu_siglip.py) on the same backend.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from infonce_kernels.triton import _config  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _config.interpret_mode(), reason="needs TRITON_INTERPRET=1 set before the process starts"
)

import infonce_kernels as ik  # noqa: E402
from benchmarks.cases.siglip import (  # noqa: E402
    open_clip_siglip_loss, siglip_kernel_backend_ran, siglip_kernel_dscale_rounding, siglip_kernel_loss)
from harness import assert_within  # noqa: E402

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sk():
    """The siglip_kernel package, importable on a CPU machine (see the module docstring)."""
    if importlib.util.find_spec("siglip_kernel") is None:
        pytest.skip("siglip-kernel is not installed (a test dependency: pip install siglip-kernel)")
    with pytest.MonkeyPatch.context() as mp:
        if not torch.cuda.is_available():
            mp.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
        yield importlib.import_module("siglip_kernel")


def leaves(B, d, dtype, seed):
    """Unit-norm rows x, y (B, d) in ``dtype``; t = 10, b = -10 (SigLIP's initialisation) in float64."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, d, generator=gen, dtype=F64), dim=1).to(dtype)
    y = F.normalize(torch.randn(B, d, generator=gen, dtype=F64), dim=1).to(dtype)
    return x, y, torch.tensor(10.0, dtype=F64), torch.tensor(-10.0, dtype=F64)


def value_and_grads(loss_fn, x, y, t, b):
    """[loss, dx, dy, dt, db] of ``loss_fn(x, y, t, b)`` on fresh leaves."""
    xs, ys, ts, bs = (v.detach().clone().requires_grad_() for v in (x, y, t, b))
    loss = loss_fn(xs, ys, ts, bs)
    return [loss.detach(), *torch.autograd.grad(loss, (xs, ys, ts, bs))]


# (backend, inputs' dtype, t and b's dtype, rtol): the reference backend in float64 and float32,
# the Triton chunked backend in float32, the "auto" backend on bf16 (it routes to the chunked one)
CASES = [
    ("reference", F64, F64, 1e-12),
    ("reference", torch.float32, torch.float32, 1e-6),
    ("chunked_bf16", torch.float32, torch.float32, 1e-6),
    ("auto", torch.bfloat16, torch.float32, 1e-6),
]


class TestSiglipKernelConvention:
    @pytest.mark.parametrize("backend,dtype,sdtype,rtol", CASES)
    def test_matches_siglip_loss(self, sk, backend, dtype, sdtype, rtol):
        x, y, t, b = leaves(21, 24, dtype, seed=len(backend) + dtype.itemsize)
        want = value_and_grads(ik.siglip_loss, x.double(), y.double(), t, b)
        plain = value_and_grads(lambda *v: open_clip_siglip_loss(*v, None), x, y, t.to(sdtype), b.to(sdtype))
        got = value_and_grads(lambda *v: siglip_kernel_loss(sk.fused_siglip_loss, *v, backend=backend),
                              x, y, t.to(sdtype), b.to(sdtype))
        # its fused backends' d/dt: cancelling float32 sums of logits in the inputs' dtype
        slack = 0.0 if backend == "reference" else siglip_kernel_dscale_rounding(x, y, t, b)
        for name, a, w, p in zip(("loss", "dx", "dy", "dt", "db"), got, want, plain):
            assert a.shape == w.shape, (name, a.shape)
            assert_within(a, w, p, f"siglip_kernel {backend} {dtype} {name}", rtol=rtol,
                          atol=slack if name == "dt" else 0.0)

    def test_auto_backend_is_named_and_namespace_restored(self, sk):
        before = dict(vars(sk))
        x, y, t, b = leaves(12, 16, torch.bfloat16, seed=5)
        ran, loss = siglip_kernel_backend_ran(
            sk, lambda: siglip_kernel_loss(sk.fused_siglip_loss, x, y, t.float(), b.float()))
        assert ran == "fused_chunked_bf16_siglip_loss" and loss.dtype == torch.bfloat16
        assert ran in before and all(vars(sk)[n] is f for n, f in before.items())
        ran, _ = siglip_kernel_backend_ran(
            sk, lambda: siglip_kernel_loss(sk.fused_siglip_loss, x.double(), y.double(), t, b, backend="reference"))
        assert ran == "siglip_loss_reference"

    def test_gpu_script_comparison(self, sk, tmp_path, monkeypatch):
        # scripts/gpu_siglip.py's siglip-kernel correctness part, its CUDA-only guard lifted: the
        # record it writes on a GPU, bf16 through the "auto" backend. The convention is right: the
        # loss and d/db within the 2x rule, the other gradients within 3x (its bf16 dy measured
        # 2.3x the plain bf16 error at B = 32: the status reports the 2x rule as it is); the logit
        # scale passed as is instead of its log (a convention error) is a FAIL of the loss.
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
        try:
            gpu_siglip = importlib.import_module("gpu_siglip")
        finally:
            sys.path.remove(os.path.join(ROOT, "scripts"))
        monkeypatch.setattr(gpu_siglip, "siglip_kernel_module", lambda device: (sk, "siglip-kernel (test)"))
        run = tmp_path / "right"
        run.mkdir()
        gpu_siglip.correctness_siglip_kernel(str(run), torch.device("cpu"), ["bf16"], rows=14, d=24)
        (rec,) = [json.loads(line) for line in (run / "siglip.jsonl").read_text().splitlines()]
        assert rec["backend_ran"] == "fused_chunked_bf16_siglip_loss" and rec["M"] == rec["N"] == 16
        errs = rec["errors"]
        assert set(errs) == {"loss", "dx", "dy", "dscale", "dbias"}
        assert errs["loss"]["ok"] and errs["dbias"]["ok"], errs
        assert all(e["err"] <= 3 * e["plain_err"] for e in errs.values()), errs
        assert rec["status"] == ("ok" if all(e["ok"] for e in errs.values()) else "FAIL")

        monkeypatch.setattr(gpu_siglip, "siglip_kernel_loss", lambda fn, x, y, t, b: fn(x, y, t, b))
        run = tmp_path / "wrong"
        run.mkdir()
        gpu_siglip.correctness_siglip_kernel(str(run), torch.device("cpu"), ["bf16"], rows=14, d=24)
        (rec,) = [json.loads(line) for line in (run / "siglip.jsonl").read_text().splitlines()]
        assert rec["status"] == "FAIL" and not rec["errors"]["loss"]["ok"], rec
