"""Compile the shipped Triton kernels for an NVIDIA target without a GPU, as the runtime would.

How the launches are found (robust to renamed kernels and restructured wrappers):

1. every ``triton.jit`` function in the modules of ``infonce_kernels.triton`` gets its ``run``
   replaced by a recorder, so ``kernel[grid](*args, **kwargs)`` records (kernel, grid, args,
   kwargs) instead of launching;
2. the backend's public entry points (``forward``, ``backward``, ``backward_paired``) are called
   with **meta** tensors (no storage; ``data_ptr() == 0``, i.e. 16-byte aligned, and contiguous),
   with the device capability the wrappers read (``_config._capability``) pinned to the target
   and the backend's availability check answered "yes". The wrappers therefore pick exactly the
   tile configuration, constexprs and launch options they pick on that GPU.
3. each recorded launch is specialised by Triton's own binder (``native_specialize_impl``: a
   pointer whose address is a multiple of 16 and an integer divisible by 16 get
   ``tt.divisibility = 16``, an integer equal to 1 becomes a constant), i.e. the variant the JIT
   compiles for contiguous 16-byte-aligned inputs, and compiled with ``triton.compile`` for
   ``GPUTarget("cuda", cap, 32)``. ptxas's ``-v`` log of that very compile gives registers and
   spills; the cubin is disassembled for the SASS counts.

Run in a process without ``TRITON_INTERPRET`` (the kernels must be ``JITFunction`` objects).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import pkgutil
from dataclasses import dataclass, field

import torch

from infonce_kernels.ops import Exclusion

#: dtype name -> (torch dtype, float32 matmul precision the wrappers see)
DTYPES = {
    "bf16": (torch.bfloat16, "highest"),
    "fp16": (torch.float16, "highest"),
    "fp32": (torch.float32, "highest"),      # exact FMA path ("ieee")
    "fp32-tf32": (torch.float32, "high"),    # torch.set_float32_matmul_precision("high"): tf32
    "fp64": (torch.float64, "highest"),
}


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""
    kernel: object            # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    phase: str = ""           # "forward" or "backward": which call of the loss launched it

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class Scenario:
    """Calls of the backend's public functions that one loss makes (forward + backward)."""
    name: str                 # nt_xent (symmetric), general (dq + dk), clip (paired)
    dtype: str
    d: int
    labels: bool
    rows: int = 4096
    launches: list = field(default_factory=list)


def kernel_modules():
    """The modules of ``infonce_kernels.triton`` (imported; each one decorates its kernels)."""
    pkg = importlib.import_module("infonce_kernels.triton")
    mods = [pkg]
    for info in pkgutil.iter_modules(pkg.__path__):
        mods.append(importlib.import_module(f"{pkg.__name__}.{info.name}"))
    return mods


def jit_functions(mods) -> list:
    """Every ``triton.jit`` object defined in ``mods`` (kernels and device helpers)."""
    from triton.runtime.jit import JITFunction  # noqa: PLC0415
    seen, out = set(), []
    for m in mods:
        for v in vars(m).values():
            if isinstance(v, JITFunction) and id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    if not out:
        raise RuntimeError("no triton.jit functions found in infonce_kernels.triton "
                           "(is TRITON_INTERPRET set? the report needs compiled kernels)")
    return out


@contextlib.contextmanager
def recording(cap: int, precision: str):
    """Record launches instead of running them, with the wrappers seeing capability ``cap``."""
    mods = kernel_modules()
    recorded: list[Launch] = []
    patches = []   # (object, attribute, old value or a sentinel for "was absent")
    absent = object()

    def patch(obj, attr, value):
        patches.append((obj, attr, vars(obj).get(attr, absent) if hasattr(obj, "__dict__") else absent))
        setattr(obj, attr, value)

    for fn in jit_functions(mods):
        def run(*args, grid, warmup, _fn=fn, **kwargs):
            recorded.append(Launch(_fn, tuple(grid) if not callable(grid) else grid, args, kwargs))
        patch(fn, "run", run)
    cap_hooks = 0
    for m in mods:
        if callable(getattr(m, "_capability", None)):
            patch(m, "_capability", lambda device, _c=cap: (_c // 10, _c % 10))
            cap_hooks += 1
        if callable(getattr(m, "available", None)):
            patch(m, "available", lambda device: (True, "kernel report: launches are recorded"))
    if not cap_hooks:
        raise RuntimeError("kernel report: no _capability(device) hook in infonce_kernels.triton's modules; "
                           "the tile choice per GPU generation cannot be pinned to the target")
    old_prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield recorded
    finally:
        torch.set_float32_matmul_precision(old_prec)
        for obj, attr, old in reversed(patches):
            if old is absent:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def record_scenario(sc: Scenario, cap: int) -> list[Launch]:
    """Launches of one loss's forward and backward (meta tensors, nothing runs)."""
    tb = importlib.import_module("infonce_kernels.triton")
    dt, precision = DTYPES[sc.dtype]
    acc = torch.float64 if dt == torch.float64 else torch.float32
    M = sc.rows
    i64 = torch.int64
    scale = _meta((), dtype=acc)
    no_lab = _meta(0, dtype=i64)
    with recording(cap, precision) as rec:
        if sc.name == "nt_xent":      # symmetric, self excluded (E = 1)
            z = _meta(M, sc.d, dtype=dt)
            ex = _meta(M, 1, dtype=i64)
            lab = (_meta(M, dtype=i64),) * 3 if sc.labels else (no_lab,) * 3
            spec = Exclusion.from_tensors(ex, *lab, True)
            lse = tb.forward(z, z, scale, spec)
            n_fwd = len(rec)
            tb.backward(_meta(M, dtype=acc), z, z, scale, spec, lse)
        elif sc.name == "general":    # InfoNCE-style: q against separate keys, one exclusion
            q, k = _meta(M, sc.d, dtype=dt), _meta(M, sc.d, dtype=dt)
            ex = _meta(M, 1, dtype=i64)
            lab = (_meta(M, dtype=i64),) * 3 if sc.labels else (no_lab,) * 3
            spec = Exclusion.from_tensors(ex, *lab)
            lse = tb.forward(q, k, scale, spec)
            n_fwd = len(rec)
            tb.backward(_meta(M, dtype=acc), q, k, scale, spec, lse)
        elif sc.name == "clip":       # two row LSEs (image->text, text->image), paired backward
            a, b = _meta(M, sc.d, dtype=dt), _meta(M, sc.d, dtype=dt)
            ex = _meta(M, 0, dtype=i64)
            lab = (_meta(M, dtype=i64),) * 3 if sc.labels else (no_lab,) * 3
            kpos = _meta(M, dtype=i64) if sc.labels else no_lab
            spec = Exclusion.from_tensors(ex, *lab)
            if sc.labels or not hasattr(tb, "forward_pair"):
                ra = tb.forward(a, b, scale, spec)
                rb = tb.forward(b, a, scale, spec)
            else:                     # what the CLIP op runs: both directions in one pass
                ra, rb = tb.forward_pair(a, b, scale)
            n_fwd = len(rec)
            g = _meta(M, dtype=acc)
            key_spec = spec.keys_as_rows(ex, kpos)
            if not sc.labels and hasattr(tb, "backward_pair") and tb.uses_backward_pair(a.device, dt, sc.d):
                tb.backward_pair(a, b, scale, ra, rb, g, g)     # the CLIP op's large-d backward: G blocks + GEMMs
            else:
                tb.backward_paired(g, a, b, scale, spec, ra, g, rb, key_spec, 0)
                tb.backward_paired(g, b, a, scale, spec, rb, g, ra, key_spec, 0)
        else:
            raise ValueError(f"unknown scenario {sc.name!r}")
    for i, launch in enumerate(rec):
        launch.phase = "forward" if i < n_fwd else "backward"
    sc.launches = rec
    return rec


def specialise(launch: Launch, cap: int):
    """(ASTSource, options dict, signature, constexprs, attrs) exactly as the JIT builds them."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource, make_backend  # noqa: PLC0415
    from triton.runtime.jit import create_function_from_signature  # noqa: PLC0415
    kern = launch.kernel
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kern.signature, kern.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kern._pack_args(backend, kwargs, bound, spec, options)
    return ASTSource(kern, signature, constexprs, attrs), options, target, signature, constexprs, attrs


def compile_launch(launch: Launch, cap: int):
    """Compile one recorded launch for sm_``cap``: -> (CompiledKernel, ptxas -v log)."""
    import triton  # noqa: PLC0415
    from triton import knobs  # noqa: PLC0415
    src, options, target, *_ = specialise(launch, cap)
    buf = io.StringIO()
    old = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(src, target=target, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    return ck, buf.getvalue()


def launch_key(launch: Launch, cap: int) -> tuple:
    """Identity of the compiled variant: kernel, signature, constexprs, attrs, warps, stages."""
    _, options, _, signature, constexprs, attrs = specialise(launch, cap)
    return (launch.name, tuple(sorted(signature.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in attrs.items())), options.num_warps, options.num_stages)


def constexpr_values(launch: Launch) -> dict:
    """Name -> value of the kernel's constexpr parameters in this launch."""
    names = [p.name for p in launch.kernel.params]
    vals = dict(zip(names, launch.args))
    vals.update(launch.kwargs)
    return {p.name: vals[p.name] for p in launch.kernel.params if p.is_constexpr and p.name in vals}


def triton_version() -> str:
    import triton  # noqa: PLC0415
    return triton.__version__


def ptxas_path(cap: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415
    return get_ptxas(cap).path


def cuobjdump_path() -> str | None:
    """Triton's bundled cuobjdump, else the CUDA toolkit's."""
    import triton  # noqa: PLC0415
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(p):
        return p
    for c in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),):
        if os.path.exists(c):
            return c
    return None
