"""CLIP's large-d backward (``infonce_kernels/triton/_pair_gemm.py``) at the headline shape: the GEMM
calls, the elementwise passes and the extra memory of the wrapper, recorded on meta tensors.

The G kernel itself (``_gpair_kernel``) is compiled and read like every other Triton kernel (the
``clip`` scenario of :mod:`.triton_kernels` calls ``backward_pair`` where the backend routes d
there); here only what is not a Triton kernel: the GEMMs (``torch.mm`` / ``addmm``, cuBLAS),
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


def recorded_backward(rows: int, d: int, dtype: str, cap: int = 90) -> dict:
    """``backward_pair`` at ``rows`` x ``d`` on meta tensors (capability pinned): its GEMMs
    (:func:`.siglip.gemm_time`), elementwise bytes and time, G-block bytes, extra memory (outputs,
    scratch, peak, against the embeddings), the plan; None when the backend takes the paired kernel
    for this shape."""
    from .triton_kernels import DTYPES, recording  # noqa: PLC0415
    tb = importlib.import_module("infonce_kernels.triton")
    pg = importlib.import_module("infonce_kernels.triton._pair_gemm")
    dt, precision = DTYPES[dtype]
    acc = torch.float64 if dt == torch.float64 else torch.float32
    a = torch.empty(rows, d, dtype=dt, device="meta")
    b = torch.empty(rows, d, dtype=dt, device="meta")
    s, v = torch.empty((), dtype=acc, device="meta"), torch.empty(rows, dtype=acc, device="meta")
    with gemm_log(pg) as gemms, recording(cap, precision):
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


def headline_extras(cap: int = 90) -> dict:
    """{headline case name: :func:`recorded_backward`} for the CLIP headline of :data:`.model.HEADLINE`."""
    out = {}
    for name, case in model.HEADLINE.items():
        if case["scenario"] == "clip":
            rec = recorded_backward(case["rows"], case["d"], case["dtype"], cap)
            if rec is not None:
                out[name] = rec
    return out
