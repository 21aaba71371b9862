"""Kernel report: what the Triton and CUDA kernels compile to on sm_90 / sm_80, read without a GPU.

    python -m benchmarks.kernel_report --output benchmarks/results            # the committed report
    python -m benchmarks.kernel_report --small --output DIR                   # the CI subset

Writes ``kernel_report_<tag>.json`` and ``.md``: per compiled kernel variant the registers,
spills, shared memory, tensor-core instruction (wgmma / mma.sync) and per unique tile element the
MUFU operations, thread-instructions and tensor FLOPs of the main loop (method in :mod:`.sass`
and :mod:`.triton_report`), plus a *modelled* time of the headline cases (:mod:`.model`).

Modules: ``triton_kernels`` (record the wrappers' launches, compile them as the JIT does),
``triton_report`` (records), ``cuda_kernels`` (nvcc + ptxas + SASS), ``sass`` (SASS parsing and
counting), ``model`` (performance model), ``report`` (JSON / markdown), ``cli``.
Needs a process without ``TRITON_INTERPRET``.
"""
