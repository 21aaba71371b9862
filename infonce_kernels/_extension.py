"""Loading the compiled kernels, infonce_kernels._C (the C++ CPU and, when built, CUDA ops)."""


def _load():
    """None when infonce_kernels._C loads (importing it registers the ops), else why not."""
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:
        return f"the C++ extension infonce_kernels._C is not built ({exc}); run `pip install --no-build-isolation -e .`"
    return None


EXTENSION_ERROR = _load()
