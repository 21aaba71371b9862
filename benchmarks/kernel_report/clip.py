"""CLIP's large-d backward by G blocks and GEMMs (the schedule ``infonce_kernels/ops/pair_gemm.py``;
Triton: ``triton/_pair_gemm.py``, CUDA: ``ops/_cpp.py``) at the headline shape: the GEMM calls,
the elementwise passes and the extra memory of the wrapper, recorded on meta tensors.

The G kernels themselves are compiled and read like every other kernel of their backend (Triton's
``_gpair_kernel``: the ``clip`` scenario of :mod:`.triton_kernels` calls ``backward_pair`` where
the backend routes d there; CUDA's ``pair_gblock_mma_kernel``: :mod:`.cuda_kernels`); here only
what is not a G kernel: the GEMMs (``torch.mm`` / ``addmm``, cuBLAS),
**modelled at the tensor rate, not compiled here** (:func:`.siglip.gemm_time`: per call max(2 m n k
/ tensor rate, bytes / HBM rate)), the elementwise passes over the fp32 band products (bytes read
and written, at the HBM rate) and the G blocks' HBM bytes (written once by the kernel: its lower
bound in the model).
"""
from __future__ import annotations

import importlib

import torch

from . import model
from .siglip import HBM_RATE, allocations, gemm_log, gemm_time


def recorded_backward(rows: int, d: int, dtype: str, cap: int = 90, backend: str = "triton") -> dict:
    """``backward_pair`` of ``backend`` (triton or cuda) at ``rows`` x ``d`` on meta tensors
    (Triton: capability pinned): its GEMMs (:func:`.siglip.gemm_time`), elementwise bytes and time,
    G-block bytes, extra memory (outputs, scratch, peak, against the embeddings), the plan; None
    when the backend takes its paired kernel for this shape (or, cuda, the extension is not built).
    The CUDA G kernel is not a Python launch: the recording runs the backend's driver with the
    kernel's call left out (its work is modelled from its SASS, as Triton's launches are)."""
    from .triton_kernels import DTYPES, recording  # noqa: PLC0415
    dt, precision = DTYPES[dtype]
    acc = torch.float64 if dt == torch.float64 else torch.float32
    a = torch.empty(rows, d, dtype=dt, device="meta")
    b = torch.empty(rows, d, dtype=dt, device="meta")
    s, v = torch.empty((), dtype=acc, device="meta"), torch.empty(rows, dtype=acc, device="meta")
    driver = importlib.import_module("infonce_kernels.ops.pair_gemm")
    if backend == "cuda":
        from infonce_kernels._extension import EXTENSION_ERROR  # noqa: PLC0415
        cpp = importlib.import_module("infonce_kernels.ops._cpp")
        if EXTENSION_ERROR is not None or not cpp.uses_backward_pair(a.device, dt, d):
            return None
        p = cpp.pair_plan(rows, rows, d, dt)
        with gemm_log(driver) as gemms, allocations((a, b, s, v)) as alloc:
            da, db, _ = driver.pair_gradients(a, b, s, v, v, v, v, p, lambda *args: None, cpp.PAIR_TARGET_PROGRAMS)
    else:
        tb = importlib.import_module("infonce_kernels.triton")
        pg = importlib.import_module("infonce_kernels.triton._pair_gemm")
        with gemm_log(driver) as gemms, recording(cap, precision):
            if not (hasattr(tb, "uses_backward_pair") and tb.uses_backward_pair(a.device, dt, d)):
                return None
            p = pg.plan(rows, rows, d, dt, a.device)
            with allocations((a, b, s, v)) as alloc:
                da, db, _ = tb.backward_pair(a, b, s, v, v, v, v)
    el = torch.empty((), dtype=dt).element_size()
    out_bytes = (da.numel() + db.numel()) * el
    emb = 2 * rows * d * el
    scratch = alloc.peak - out_bytes
    gt = gemm_time(gemms)
    return dict(plan=dict(band=p.band, groups=p.groups, cols=p.cols), gemms=gt,
                elementwise_bytes=alloc.elementwise_bytes,
                elementwise_ms=alloc.elementwise_bytes / HBM_RATE * 1e3,
                g_block_hbm_bytes=float(rows) ** 2 * el, hbm_rate=HBM_RATE,
                memory=dict(outputs_bytes=out_bytes, scratch_bytes=scratch, extra_bytes=alloc.peak,
                            embeddings_bytes=emb, scratch_ratio=round(scratch / emb, 4)))


def headline_extras(cap: int = 90, backend: str = "triton") -> dict:
    """{headline case name: :func:`recorded_backward`} for the CLIP headline of :data:`.model.HEADLINE`
    on ``backend``."""
    out = {}
    for name, case in model.HEADLINE.items():
        if case["scenario"] == "clip":
            rec = recorded_backward(case["rows"], case["d"], case["dtype"], cap, backend)
            if rec is not None:
                out[name] = rec
    return out
