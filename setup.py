"""Builds infonce_kernels._C from csrc/ with torch.utils.cpp_extension (ninja).

The CPU sources always build. The CUDA sources in csrc/cuda join the build only when a CUDA
toolkit (nvcc) and a CUDA build of torch are both present; INFONCE_CUDA_ARCHS (e.g. "8.0;9.0")
picks the architectures, INFONCE_NO_CUDA=1 turns them off. Build without isolation so that the
torch already installed is the one compiled against:

    pip install --no-build-isolation -e .
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-DINFONCE_PYTHON_MODULE"]


def cuda_build_reason():
    """None when the CUDA sources can be built, else why not."""
    if os.environ.get("INFONCE_NO_CUDA") == "1":
        return "INFONCE_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) was found"
    if not glob.glob("csrc/cuda/*.cu"):
        return "there are no CUDA sources in csrc/cuda"
    return None


def cuda_arch_flags():
    archs = os.environ.get("INFONCE_CUDA_ARCHS", "8.0;9.0")
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        num = arch.strip().replace(".", "")
        if num:
            flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    reason = cuda_build_reason()
    if reason is not None:
        print(f"infonce_kernels: building the CPU kernels only ({reason})", file=sys.stderr)
        return CppExtension(
            "infonce_kernels._C",
            sources,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    return CUDAExtension(
        "infonce_kernels._C",
        sources,
        extra_compile_args={
            "cxx": CXX_FLAGS,
            "nvcc": ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", *cuda_arch_flags()],
        },
        extra_link_args=["-fopenmp"],
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
