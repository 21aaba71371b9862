"""The sweep: every (kind, dtype, mode, d, provider, size) case in a fresh worker subprocess.

A case that runs out of memory (OOM) or time (TIMEOUT) is recorded instead of ending the sweep;
the larger sizes of the same series are then recorded as SKIPPED. The JSON is rewritten after
every case, so an interrupted sweep keeps what it measured.
"""

import itertools
import json
import os
import subprocess
import sys
import time

import infonce_kernels

from . import cases, report


def _import_roots():
    """The folders holding this package and infonce_kernels, so the worker imports the same code
    from any working directory (a source checkout or an installed copy)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package = os.path.dirname(os.path.dirname(os.path.abspath(infonce_kernels.__file__)))
    return list(dict.fromkeys([here, package]))


def run_case(case, timeout):
    """Runs one case in ``python -m benchmarks.worker``; returns its result dict."""
    cmd = [sys.executable, "-m", "benchmarks.worker", json.dumps(case)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(_import_roots() + [p for p in [env.get("PYTHONPATH")] if p])
    # glibc otherwise keeps freed blocks below a dynamic threshold (up to 32 MiB) mapped, so a
    # step reusing the warm-up's memory shows no RSS growth: a fixed threshold returns every
    # large block to the OS and the peak RSS counts each step's real allocations.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "TIMEOUT", "error": f"over {timeout:.0f} s"}
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_seconds"] = wall
            return result
    if proc.returncode < 0 or proc.returncode in (137, 247):  # killed (SIGKILL: the OOM killer)
        return {"status": "OOM", "error": f"worker killed by signal {-proc.returncode}"}
    tail = (proc.stderr or proc.stdout)[-1500:]
    if "out of memory" in tail.lower() or "memoryerror" in tail.lower():
        return {"status": "OOM", "error": tail[-300:]}
    return {"status": "ERROR", "error": f"worker exited {proc.returncode}: {tail}"}


def sweep(args, device, data, json_path):
    """Runs the cases ``args`` selects, appending one record per case to ``data["results"]``."""
    for kind in args.kinds:
        names = cases.providers(kind, device)
        if args.providers:
            names = [n for n in names if n in args.providers]
        if not names:
            print(f"# {kind}: no provider available here, skipped", flush=True)
        rows_label = cases.get(kind).rows_label
        for dtype, mode, dim, name in itertools.product(args.dtypes, args.modes, args.dims, names):
            failed = None
            for rows in sorted(args.rows):
                case = dict(kind=kind, provider=name, rows=rows, dim=dim, dtype=dtype, mode=mode,
                            device=str(device), repeats=args.repeats, threads=args.threads,
                            mem_limit_gib=args.mem_limit_gib)
                if failed:
                    result = {"status": "SKIPPED", "error": f"{failed} at a smaller size"}
                else:
                    result = run_case(case, args.timeout)
                    if result["status"] in ("OOM", "TIMEOUT"):
                        failed = result["status"]
                record = {k: case[k] for k in ("kind", "provider", "rows", "dim", "dtype", "mode")}
                record.update(result)
                record.setdefault("seconds", None)
                record.setdefault("peak_bytes", None)
                data["results"].append(record)
                msg = record["status"] if record["status"] != "ok" else \
                    f"{report.fmt_time(record['seconds'])}  {report.fmt_bytes(record['peak_bytes'])}"
                if record["status"] == "ERROR":
                    msg += "  " + record.get("error", "")[:200]
                print(f"{kind:8s} {mode:17s} {dtype:8s} d={dim:<4d} {rows_label}={rows:<6d} {name:18s} {msg}",
                      flush=True)
                write_json(data, json_path)

def write_json(data, path):
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
