"""What the compiled kernels (infonce_kernels._C) are built from, and with which flags.

The one list that both builds use: setup.py (ahead of time, ``pip install --no-build-isolation``)
and the first-use JIT build of an installed pure-Python wheel (infonce_kernels._extension), so the
two compile the same sources the same way. Standard library only at import time: setup.py loads
this file by path, also where torch is not importable.
"""

import glob
import hashlib
import os

# Compiled sources, relative to the csrc directory; the CUDA ones join only when cuda_build_reason()
# is None. Headers may sit anywhere under csrc.
CPU_SOURCE_GLOBS = ("*.cpp", "cpu/*.cpp")
CUDA_SOURCE_GLOBS = ("cuda/*.cu", "cuda/*.cpp")
HEADER_GLOBS = ("**/*.h", "**/*.cuh")

CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-DINFONCE_PYTHON_MODULE"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]


def _matches(csrc, patterns):
    return sorted({p for pat in patterns for p in glob.glob(os.path.join(csrc, pat), recursive=True)})


def sources(csrc, with_cuda):
    """Absolute paths of the files to compile, sorted (CPU sources, then CUDA ones if with_cuda)."""
    found = _matches(csrc, CPU_SOURCE_GLOBS)
    if with_cuda:
        found += _matches(csrc, CUDA_SOURCE_GLOBS)
    return found


def shipped_files(csrc):
    """Every file a build can read: all sources and headers under csrc (what a wheel carries)."""
    return _matches(csrc, CPU_SOURCE_GLOBS + CUDA_SOURCE_GLOBS + HEADER_GLOBS)


def source_hash(csrc):
    """sha256 hex digest of the relative paths and contents of shipped_files(csrc)."""
    digest = hashlib.sha256()
    for path in shipped_files(csrc):
        digest.update(os.path.relpath(path, csrc).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()


def cuda_arch_flags():
    """nvcc -gencode flags for INFONCE_CUDA_ARCHS (default "8.0;9.0")."""
    flags = []
    for arch in os.environ.get("INFONCE_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";"):
        num = arch.strip().replace(".", "")
        if num:
            flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


def cuda_build_reason(csrc):
    """None when the CUDA sources can be compiled here, else why not (one clause).

    They need a CUDA build of torch and a CUDA toolkit whose runtime headers are installed
    (cuda_runtime.h); nvcc alone on the PATH is not enough. INFONCE_NO_CUDA=1 turns them off.
    """
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("INFONCE_NO_CUDA") == "1":
        return "INFONCE_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return "no CUDA toolkit was found"
    headers = [os.path.join(CUDA_HOME, "include", "cuda_runtime.h")]
    headers += glob.glob(os.path.join(CUDA_HOME, "targets", "*", "include", "cuda_runtime.h"))
    if not any(os.path.isfile(h) for h in headers):
        return f"the CUDA runtime headers (cuda_runtime.h) are not under {CUDA_HOME}"
    if not _matches(csrc, CUDA_SOURCE_GLOBS):
        return "there are no CUDA sources"
    return None
