"""Builds infonce_kernels, choosing the route by whether torch is importable while building.

- torch importable (``pip install --no-build-isolation -e .``, what scripts/setup.sh runs): the
  C++ kernels in csrc/ are compiled ahead of time into infonce_kernels._C against that torch, and
  the torch version is recorded next to it (infonce_kernels/_C_build.json) so that a later torch
  is caught. The CUDA sources join only with a CUDA torch and the CUDA runtime headers
  (INFONCE_CUDA_ARCHS, e.g. "8.0;9.0", picks the architectures; INFONCE_NO_CUDA=1 turns them off).
- torch not importable (``pip install .``, ``pip wheel .`` or uv/poetry with build isolation, whose
  build environment has no torch): a pure-Python wheel that carries the C++ sources
  (infonce_kernels/_csrc) and compiles them on first use against the installed torch
  (infonce_kernels/_extension.py). INFONCE_JIT=1 picks this route even where torch is importable.

Both routes compile the same sources with the same flags: infonce_kernels/_build_spec.py.
"""

import importlib.util
import json
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
BUILD_INFO = "_C_build.json"  # read by infonce_kernels/_extension.py


def _load_build_spec():
    # By path: importing the package would import torch, which an isolated build lacks.
    path = os.path.join(ROOT, "infonce_kernels", "_build_spec.py")
    spec = importlib.util.spec_from_file_location("_infonce_build_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_spec = _load_build_spec()


def _torch_importable():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into the package as infonce_kernels/_csrc (JIT route)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "infonce_kernels", "_csrc")
        shutil.rmtree(target, ignore_errors=True)
        for path in build_spec.shipped_files(CSRC):
            dest = os.path.join(target, os.path.relpath(path, CSRC))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(path, dest)


def ahead_of_time_build():
    """setup() arguments that compile infonce_kernels._C now, against the importable torch."""
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class BuildExtensionRecordingTorch(BuildExtension):
        """Writes _C_build.json (the torch built against) next to _C, in the build and in place."""

        def build_extension(self, ext):
            super().build_extension(ext)
            info = {"torch": torch.__version__, "cuda": any(s.endswith(".cu") for s in ext.sources),
                    "sources": build_spec.source_hash(CSRC)}
            # Next to _C in the build folder (setuptools builds there even for --inplace).
            self.build_info = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_INFO)
            with open(self.build_info, "w") as f:
                json.dump(info, f)

        def copy_extensions_to_source(self):
            # --inplace and editable installs: _C is copied into the source package; so is its record.
            super().copy_extensions_to_source()
            package_dir = self.get_finalized_command("build_py").get_package_dir("infonce_kernels")
            self.copy_file(self.build_info, os.path.join(package_dir, BUILD_INFO))

    reason = build_spec.cuda_build_reason(CSRC)
    common = dict(sources=build_spec.sources(CSRC, with_cuda=reason is None),
                  extra_link_args=build_spec.LINK_FLAGS)
    if reason is not None:
        print(f"infonce_kernels: building the CPU kernels only ({reason})", file=sys.stderr)
        ext = CppExtension("infonce_kernels._C", extra_compile_args={"cxx": build_spec.CXX_FLAGS}, **common)
    else:
        nvcc = build_spec.NVCC_FLAGS + build_spec.cuda_arch_flags()
        ext = CUDAExtension("infonce_kernels._C", extra_compile_args={"cxx": build_spec.CXX_FLAGS, "nvcc": nvcc},
                            **common)
    # Paths relative to the project root, as setuptools wants them.
    ext.sources = [os.path.relpath(s, ROOT) for s in ext.sources]
    return dict(ext_modules=[ext], cmdclass={"build_ext": BuildExtensionRecordingTorch})


def jit_build():
    """setup() arguments for the pure-Python wheel that ships csrc and compiles it on first use."""
    why = "INFONCE_JIT=1" if os.environ.get("INFONCE_JIT") == "1" else "torch is not importable in this build"
    print(f"infonce_kernels: pure-Python build ({why}); the C++ kernels compile on first use "
          "(for an ahead-of-time build: pip install --no-build-isolation .)", file=sys.stderr)
    # A build folder of its own, so no compiled _C of an earlier ahead-of-time build slips into the wheel.
    return dict(cmdclass={"build_py": BuildPyWithSources},
                options={"build": {"build_base": os.path.join("build", "pure-python")}})


if os.environ.get("INFONCE_JIT") != "1" and _torch_importable():
    setup(**ahead_of_time_build())
else:
    setup(**jit_build())
