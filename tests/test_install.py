"""Installs as users do them, outside this source tree.

- The isolated route: an sdist, a wheel built from it with pip's default build isolation and only
  setuptools and wheel to build with (no torch), installed offline into a fresh virtual environment
  that sees the system's torch, then a loss on the `cpu` backend there, which compiles the shipped
  C++ sources on first use (into a temporary TORCH_EXTENSIONS_DIR) and reuses them afterwards.
- The messages of a source checkout whose extension is missing or was built against another torch.
"""

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SDIST_INPUTS = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "CMakeLists.txt"]
IGNORED = shutil.ignore_patterns("*.so", "__pycache__", "_C_build.json", "_csrc")


def _run(cmd, cwd, env=None, timeout=600):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _outside_env(tmp, **extra):
    """The environment of a process that must not see this checkout (no PYTHONPATH, no interpreter mode)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "INFONCE_BACKEND")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"), **extra)
    return env


def _copy_project(dest, with_csrc=True):
    dest.mkdir()
    for name in SDIST_INPUTS:
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "infonce_kernels", dest / "infonce_kernels", ignore=IGNORED)
    if with_csrc:
        shutil.copytree(ROOT / "csrc", dest / "csrc", ignore=IGNORED)


# Runs in the virtual environment: the wheel's copy of the package, and NT-Xent on the cpu backend
# against float64, value and gradient, within twice the error of float32 PyTorch (the reference backend).
_USE_SCRIPT = r"""
import json, sys, torch
import infonce_kernels as ik

assert "cpu" in ik.available_backends("cpu"), ik.available_backends("cpu")
torch.manual_seed(0)
z1, z2 = torch.randn(96, 40, dtype=torch.float64), torch.randn(96, 40, dtype=torch.float64)

def loss_and_grad(dtype, backend):
    a = z1.to(dtype, copy=True).requires_grad_()
    loss = ik.nt_xent(a, z2.to(dtype), temperature=0.3, backend=backend)
    loss.backward()
    return loss.double(), a.grad.double()

exact, exact_grad = loss_and_grad(torch.float64, "reference")
plain, plain_grad = loss_and_grad(torch.float32, "reference")
fused, fused_grad = loss_and_grad(torch.float32, "cpu")
eps = torch.finfo(torch.float32).eps
print(json.dumps({
    "file": ik.__file__,
    "error": (fused - exact).abs().item(),
    "allowed": 2 * max((plain - exact).abs().item(), eps * exact.abs().item()),
    "grad_error": (fused_grad - exact_grad).abs().max().item(),
    "grad_allowed": 2 * max((plain_grad - exact_grad).abs().max().item(), eps * exact_grad.abs().max().item()),
}))
"""


@pytest.mark.slow
def test_isolated_wheel_install_compiles_on_first_use(tmp_path):
    project, dist, wheels, tools = (tmp_path / n for n in ("project", "dist", "wheels", "build-tools"))
    _copy_project(project)
    # The sdist; INFONCE_JIT=1 keeps setup.py from importing torch (the isolated build has none).
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", dist], project, env=dict(os.environ, INFONCE_JIT="1"))
    (sdist,) = dist.glob("infonce_kernels-*.tar.gz")

    # The wheel, from the sdist, isolated and offline: the build may only use setuptools and wheel.
    _run([sys.executable, "-m", "pip", "download", "-q", "-d", tools, "setuptools>=64", "wheel"],
         tmp_path)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--find-links", tools,
          "-w", wheels, sdist], tmp_path)
    (wheel,) = wheels.glob("infonce_kernels-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "infonce_kernels/_csrc/ops.cpp" in names and "infonce_kernels/_build_spec.py" in names, names
    assert not [n for n in names if n.endswith(".so")], names

    # A fresh environment that sees the system's torch; pip offline, with its default isolation.
    # (--force-reinstall --no-deps: the system site may hold this checkout's editable install, which
    # pip would otherwise call satisfied; the venv's own copy then shadows it.)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, "--no-deps",
          "--force-reinstall", "infonce_kernels"], tmp_path)

    work = tmp_path / "work"  # not the checkout: `python -c` puts the working directory on sys.path
    work.mkdir()
    env = _outside_env(tmp_path, MAX_JOBS="2")
    first = _run([python, "-c", _USE_SCRIPT], work, env=env, timeout=900)
    compiling = [line for line in first.stderr.splitlines() if "compiling the C++ kernels" in line]
    assert len(compiling) == 1 and str(tmp_path / "torch_extensions") in compiling[0], first.stderr
    result = json.loads(first.stdout.splitlines()[-1])
    assert result["file"].startswith(str(venv)), result["file"]
    assert result["error"] <= result["allowed"] and result["grad_error"] <= result["grad_allowed"], result

    second = _run([python, "-c", _USE_SCRIPT], work, env=env)
    assert "compiling" not in second.stderr, second.stderr  # the cached build is reused


def _extension_error(package_root, tmp_path):
    script = "from infonce_kernels._extension import EXTENSION_ERROR; print(EXTENSION_ERROR)"
    return _run([sys.executable, "-c", script], package_root, env=_outside_env(tmp_path)).stdout.strip()


def test_missing_extension_in_a_source_checkout_says_how_to_build_it(tmp_path):
    checkout = tmp_path / "checkout"
    _copy_project(checkout)
    message = _extension_error(checkout, tmp_path)
    assert message.startswith("the C++ extension infonce_kernels._C is not built in this source checkout")
    assert "`pip install --no-build-isolation -e .`" in message and "circular" not in message


def test_extension_built_against_another_torch_is_stale(tmp_path):
    checkout = tmp_path / "checkout"
    _copy_project(checkout)
    # The record is read before the library is loaded: an empty stand-in for the library will do.
    (checkout / "infonce_kernels" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    (checkout / "infonce_kernels" / "_C_build.json").write_text(json.dumps({"torch": "1.0.0"}))
    message = _extension_error(checkout, tmp_path)
    assert message.startswith("infonce_kernels._C was built against torch 1.0.0 but torch "), message
    assert message.endswith("rebuild it with `pip install --no-build-isolation -e .` in the source checkout"), message
