"""CI check of the CUDA kernel sources: they compile with nvcc for sm_90 (H100/H200).

sm_80 doubles the compile time, so CI leaves it to `scripts/check_cuda_compile` (whose default is
sm_80 and sm_90; `INFONCE_CUDA_ARCHS=8.0 pytest tests/test_cuda_compile.py` runs this test for it)
and to the kernel report.

Runs scripts/check_cuda_compile (nvcc -Xptxas -v on csrc/cuda/*.cu, plus a host-compiler syntax
check of the torch binding csrc/cuda/*.cpp when torch's c10/cuda headers are present). Needs no
GPU; skipped when nvcc is absent. The ptxas resource report (one line per kernel and
architecture) is written to build/ptxas-report.txt, and printed in full with ``pytest -v``.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_cuda_compile"

# Every kernel the launchers instantiate, as printed (demangled) in the resource summary. The
# SIMT forward kernels' last template argument is the label rule (LBL), the tensor-core forward's
# and every backward kernel's last two the label rule and the threshold rule (THR): every variant
# is launched (the tensor-core ones beside their rule-free resident kernels).
# Backward MODE 2 (two-sided) serves both the symmetric lse_bwd and lse_bwd_paired.
_LBL = ("false", "true")
_LBL_THR = [f"{lbl}, {thr}" for lbl in _LBL for thr in _LBL]
KERNELS = [
    *[f"lse_fwd_mma_kernel<{tag}, {rules}>" for tag in ("F16Tag", "BF16Tag") for rules in _LBL_THR],
    *[f"lse_bwd_mma_kernel<{tag}, {mode}, {rules}>"
      for tag in ("F16Tag", "BF16Tag") for mode in (0, 1, 2) for rules in _LBL_THR],
    # the rule-free launches with d <= kDK and 16-B aligned rows (launch_mma.cu picks them)
    *[f"lse_fwd_resident_mma_kernel<{tag}>" for tag in ("F16Tag", "BF16Tag")],
    *[f"lse_bwd_resident_mma_kernel<{tag}, {mode}>" for tag in ("F16Tag", "BF16Tag") for mode in (0, 1, 2)],
    # CLIP's pair backward by G blocks (fp16/bf16, d > kDK): cp.async and element-load variants
    *[f"pair_gblock_mma_kernel<{tag}, {vec}>" for tag in ("F16Tag", "BF16Tag") for vec in ("false", "true")],
    *[f"lse_fwd_simt_kernel<{t}, {lbl}>" for t in ("float, 4", "double, 2") for lbl in _LBL],
    *[f"lse_bwd_simt_kernel<{t}, {mode}, {rules}>"
      for t in ("float, 4", "double, 2") for mode in (0, 1, 2) for rules in _LBL_THR],
    # the pairwise sigmoid sweeps: SweepKind 0-3 (loss only, loss + dx, dx, dy), labels on/off
    *[f"sigmoid_sweep_mma_kernel<{tag}, {kind}, {lbl}>" for tag in ("F16Tag", "BF16Tag") for kind in range(4)
      for lbl in _LBL],
    *[f"sigmoid_sweep_simt_kernel<{t}, {kind}, {lbl}>" for t in ("float, 4", "double, 2") for kind in range(4)
      for lbl in _LBL],
    "absmax_kernel",
    "sum_partials_kernel<float>",
    "sum_partials_kernel<double>",
]
CUDA_ARCHS = os.environ.get("INFONCE_CUDA_ARCHS", "9.0")
ARCHS = tuple("sm_" + a.replace(".", "") for a in CUDA_ARCHS.split(";"))
# Spills explained next to their kernel, as (kernel, arch): none today (ptxas 13.0; the two-sided
# tensor-core backward with both rules, the tightest, uses 248 of 255 registers on sm_80).
EXPLAINED_SPILLS: set[tuple[str, str]] = set()
REPORT = ROOT / "build" / "ptxas-report.txt"


def _nvcc():
    if os.environ.get("NVCC"):
        return os.environ["NVCC"] if os.access(os.environ["NVCC"], os.X_OK) else None
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None
    )


def test_script_is_executable():
    assert SCRIPT.is_file()
    assert os.access(SCRIPT, os.X_OK)


def test_skips_without_nvcc():
    env = dict(os.environ, NVCC="/nonexistent/nvcc")
    env.pop("INFONCE_REQUIRE_NVCC", None)
    r = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skipped: nvcc not found" in r.stdout
    env["INFONCE_REQUIRE_NVCC"] = "1"
    r = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_cuda_kernels_compile(capsys, request):
    env = dict(os.environ, INFONCE_CUDA_ARCHS=CUDA_ARCHS)
    r = subprocess.run([str(SCRIPT)], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    lines = [ln for ln in out.splitlines() if re.search(r"\| sm_\d+ \|", ln)]
    report = "ptxas report (kernel | arch | registers, spills, shared memory):\n" + "\n".join(lines) + "\n"
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(report)
    with capsys.disabled():  # where the report is; the report itself only with -v
        if request.config.getoption("verbose") > 0:
            print("\n" + report, end="")
        else:
            print(f"\nptxas report ({len(lines)} lines): {REPORT.relative_to(ROOT)}")
    for arch in ARCHS:
        for k in KERNELS:
            assert any(ln.startswith(k + " |") and f"| {arch} |" in ln for ln in lines), (
                f"{k} missing from the ptxas report for {arch}\n{out}")
    # No kernel spills but the explained ones (a spill must be explained next to its kernel).
    spilled = {(ln.split(" | ")[0], ln.split(" | ")[1]) for ln in lines if "| spill 0/0 |" not in ln}
    assert spilled <= EXPLAINED_SPILLS, f"unexplained register spills: {sorted(spilled - EXPLAINED_SPILLS)}\n{out}"
    # The torch binding is parsed whenever torch ships its c10/cuda headers (CPU wheels do).
    try:
        import torch

        has_c10_cuda = (Path(torch.__file__).parent / "include/c10/cuda/CUDAGuard.h").is_file()
    except ImportError:
        has_c10_cuda = False
    if has_c10_cuda and os.environ.get("INFONCE_CHECK_BINDING", "1") == "1":
        assert "binding parses" in out, out
    else:
        assert "binding parses" in out or "binding check skipped" in out, out
