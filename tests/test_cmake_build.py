"""The CMake build compiles the same csrc/ sources as setup.py, and its library computes the
same numbers as infonce_kernels._C."""

import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_registers_the_same_op(tmp_path):
    build = tmp_path / "build"
    prefix = torch.utils.cmake_prefix_path
    # Unoptimised (-O0): the same sources and registrations as the default Release build (-O3),
    # which differs only in optimisation flags, at about a third less compile time.
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                    "-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_CXX_FLAGS_DEBUG=-O0"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True, text=True)
    lib = build / "libinfonce_kernels_ops.so"
    assert lib.exists()
    # Loading it in a fresh process (the op is already registered in this one by _C).
    code = (
        "import torch, sys; torch.ops.load_library(sys.argv[1]); torch.manual_seed(0);"
        "q, k = torch.randn(70, 9), torch.randn(1100, 9);"
        "none = torch.empty(0, dtype=torch.long);"
        "r = torch.ops.infonce_kernels._lse_fwd(q, k, torch.tensor(0.5), none.view(70, 0), [], False);"
        "ref = torch.logsumexp(0.5 * q @ k.T, 1);"
        "assert torch.allclose(r, ref, rtol=1e-5, atol=1e-5), (r - ref).abs().max()"
    )
    subprocess.run([sys.executable, "-c", code, str(lib)], check=True, timeout=120)
