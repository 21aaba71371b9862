"""Runs ONE benchmark case in this (fresh) process and prints one ``RESULT {json}`` line.

    python -m benchmarks.worker '{"kind": "nt_xent", "provider": "ours:cpu", "rows": 8192, "dim": 128,
                                  "dtype": "float32", "mode": "forward+backward", "device": "cpu"}'

Time: on CPU, the median of ``repeats`` steps after one full-size warm-up step; on CUDA, the
median of ``triton.testing.do_bench`` (CUDA events when triton is missing).
Memory: on CPU the peak resident set size during one step minus the resident size just before it
(VmHWM reset through /proc/self/clear_refs, as tests/rss_probe.py); on CUDA the peak allocated
bytes during one step minus the bytes allocated before it (inputs and, for "backward", the
forward's saved tensors). An allocation failure is reported as status "OOM".
"""

import json
import math
import resource
import statistics
import sys
import time
import traceback

import torch

from . import cases

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
MODES = ("forward", "backward", "forward+backward")


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _limit_cpu_memory(gib):
    """Cap this process's address space at (current + gib): a runaway peer fails to allocate
    (reported as OOM) instead of pushing the shared machine into swap or the OOM killer."""
    if not gib:
        return
    limit = _status_kib("VmSize") * 1024 + int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _is_oom(exc):
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                   "std::bad_alloc"))


def _step_fns(mode, fn, inputs):
    """(prepare, step): ``prepare()`` runs untimed before every measured ``step(state)``."""
    def zero():
        for x in inputs:
            x.grad = None

    if mode == "forward":
        return (lambda: None), (lambda _: fn(*inputs))
    if mode == "backward":
        def prepare():
            zero()
            return fn(*inputs)
        return prepare, (lambda loss: loss.backward())

    def full(_):
        zero()
        fn(*inputs).backward()
    return (lambda: None), full


def run_cpu(case, fn, inputs):
    prepare, step = _step_fns(case["mode"], fn, inputs)
    step(prepare())  # full-size warm-up: thread pools, BLAS buffers, allocator
    times = []
    state = prepare()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    step(state)
    times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM")
    del state
    for _ in range(case.get("repeats", 3) - 1):
        state = prepare()
        start = time.perf_counter()
        step(state)
        times.append(time.perf_counter() - start)
        del state
    return {"seconds": statistics.median(times), "seconds_all": times, "peak_bytes": max(peak - before, 0) * 1024}


def run_cuda(case, fn, inputs):
    device = inputs[0].device
    mode = case["mode"]
    loss = fn(*inputs) if mode == "backward" else None  # the graph backward() reuses

    def zero():
        for x in inputs:
            x.grad = None

    if mode == "forward":
        def step():
            fn(*inputs)
    elif mode == "backward":
        def step():
            loss.backward(retain_graph=True)
    else:
        def step():
            fn(*inputs).backward()
    step()
    zero()
    torch.cuda.synchronize(device)
    # memory: one step, peak allocated minus what was allocated before it
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    zero()
    try:
        from triton.testing import do_bench

        ms = do_bench(step, warmup=case.get("warmup_ms", 25), rep=case.get("rep_ms", 100), grad_to_none=list(inputs),
                      return_mode="median")
    except ImportError:
        times = []
        for _ in range(case.get("repeats", 20)):
            zero()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b))
        ms = statistics.median(times)
    return {"seconds": ms / 1e3, "peak_bytes": int(peak)}


def run(case):
    device = torch.device(case["device"])
    if device.type == "cpu":
        if case.get("threads"):
            torch.set_num_threads(case["threads"])
        _limit_cpu_memory(case.get("mem_limit_gib", 0))
    dtype = DTYPES[case["dtype"]]
    try:
        # this process runs one case: the provider's TF32 setting applies to it alone
        torch.backends.cuda.matmul.allow_tf32 = cases.provider(case["kind"], case["provider"], device).tf32
        inputs, fn = cases.build(case["kind"], case["provider"], case["rows"], case["dim"], dtype, device,
                                 requires_grad=case["mode"] != "forward")
        if case["mode"] == "forward":
            with torch.no_grad():
                result = run_cpu(case, fn, inputs) if device.type == "cpu" else run_cuda(case, fn, inputs)
        else:
            result = run_cpu(case, fn, inputs) if device.type == "cpu" else run_cuda(case, fn, inputs)
        result["status"] = "ok"
        if not math.isfinite(result["seconds"]):
            result["status"] = "ERROR"
    except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded status
        if _is_oom(exc):
            result = {"status": "OOM", "error": str(exc).splitlines()[0][:300]}
        else:
            result = {"status": "ERROR", "error": f"{type(exc).__name__}: {exc}"[:500],
                      "traceback": traceback.format_exc()[-2000:]}
    result["threads"] = torch.get_num_threads() if device.type == "cpu" else None
    result["tf32"] = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    case = json.loads(argv[0])
    print("RESULT " + json.dumps(run(case)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
