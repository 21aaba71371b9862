"""Loading the compiled kernels, infonce_kernels._C (the C++ CPU and, when built, CUDA ops).

Three install routes, told apart by what sits next to this file:

- an ahead-of-time build (``pip install --no-build-isolation [-e] .``): ``_C*.so`` and
  ``_C_build.json`` (the torch it was built against). Built against another torch, it is stale and
  not loaded (its symbols would not match).
- a pure-Python wheel (``pip install .`` or the wheel, with build isolation): ``_csrc/``, the C++
  sources, compiled on first use with torch.utils.cpp_extension (ninja) into
  ``$TORCH_EXTENSIONS_DIR`` (default ~/.cache/torch_extensions), one folder per Python, torch
  version and source hash, so later imports and other environments with the same torch reuse it.
- a source checkout that was not built: neither; the error says how to build it.
"""

import importlib
import importlib.machinery
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from . import _build_spec

_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT_BUILD = "`pip install --no-build-isolation -e .` in the source checkout"


def _in_source_checkout():
    return (_PACKAGE_DIR.parent / "setup.py").is_file() and (_PACKAGE_DIR.parent / "csrc").is_dir()


def _built_library():
    """Path of the ahead-of-time _C next to this file, or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (_PACKAGE_DIR / f"_C{suffix}").is_file():
            return _PACKAGE_DIR / f"_C{suffix}"
    return None


def _rebuild_hint():
    if _in_source_checkout():
        return f"rebuild it with {_CHECKOUT_BUILD}"
    return ("reinstall infonce_kernels for this torch (`pip install --force-reinstall --no-deps <its source "
            "or wheel>`)")


def _load_built():
    """None when the ahead-of-time _C loads, else why not."""
    info_path = _PACKAGE_DIR / "_C_build.json"
    if info_path.is_file():
        built_for = json.loads(info_path.read_text()).get("torch")
        if built_for != torch.__version__:
            return (f"infonce_kernels._C was built against torch {built_for} but torch {torch.__version__} "
                    f"is installed; {_rebuild_hint()}")
    try:
        importlib.import_module(f"{__package__}._C")
    except ImportError as exc:
        return f"infonce_kernels._C exists but does not load ({exc}); {_rebuild_hint()}"
    return None


def _jit_build_directory(csrc, with_cuda):
    from torch.utils.cpp_extension import get_default_build_root

    tag = "-".join([
        f"py{sys.version_info[0]}{sys.version_info[1]}",
        "torch" + torch.__version__.replace("+", "_"),
        "cuda" if with_cuda else "cpu",
        _build_spec.source_hash(csrc)[:16],
    ])
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # as torch's own load() reads it
    return Path(root) / f"infonce_kernels-{tag}"


def _ninja_on_path():
    """Makes the `ninja` of the pip package reachable when no ninja is on the PATH (an unactivated venv)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _load_jit(csrc):
    """None when the shipped sources compile (or were compiled before) and load, else why not."""
    from torch.utils import cpp_extension

    with_cuda = _build_spec.cuda_build_reason(str(csrc)) is None
    build_dir = _jit_build_directory(str(csrc), with_cuda)
    library = build_dir / "_C.so"
    try:
        if library.is_file():
            torch.ops.load_library(str(library))
            return None
        build_dir.mkdir(parents=True, exist_ok=True)
        print(f"infonce_kernels: compiling the C++ kernels for torch {torch.__version__} into {build_dir} "
              "(once per torch version, about a minute)", file=sys.stderr, flush=True)
        _ninja_on_path()
        cuda_flags = _build_spec.NVCC_FLAGS + _build_spec.cuda_arch_flags() if with_cuda else None
        cpp_extension.load(
            name="_C",
            sources=_build_spec.sources(str(csrc), with_cuda),
            extra_cflags=_build_spec.CXX_FLAGS,
            extra_cuda_cflags=cuda_flags,
            extra_ldflags=_build_spec.LINK_FLAGS,
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
        )
    except Exception as exc:  # noqa: BLE001 - compiler, ninja and loader failures all end up here
        last_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        return (f"the C++ kernels of this infonce_kernels wheel are compiled on first use, and compiling them "
                f"into {build_dir} failed ({last_line}); they need a C++ compiler with OpenMP and ninja "
                f"(`pip install ninja`), or install from a source checkout with {_CHECKOUT_BUILD}")
    return None


def _load():
    """None when the C++ ops are registered, else one sentence saying why not and what to do."""
    if _built_library() is not None:
        return _load_built()
    if (_PACKAGE_DIR / "_csrc").is_dir():
        return _load_jit(_PACKAGE_DIR / "_csrc")
    if _in_source_checkout():
        return f"the C++ extension infonce_kernels._C is not built in this source checkout; build it with {_CHECKOUT_BUILD}"
    return ("the C++ extension infonce_kernels._C is missing from this install and it carries no sources to "
            "compile; reinstall infonce_kernels (`pip install --force-reinstall --no-deps infonce_kernels`)")


EXTENSION_ERROR = _load()
