"""``python -m benchmarks``: sweep sizes, modes, dtypes and providers; write JSON, PNG, markdown.

Every case runs in a fresh subprocess (``benchmarks.worker``) with a time limit, so peak memory
is measured cleanly and a case that runs out of memory (OOM) or time (TIMEOUT) is recorded
instead of ending the sweep; once a provider fails so at some size, its larger sizes of the same
series are recorded as SKIPPED.

Examples:

    python -m benchmarks                                    # CPU defaults: nt_xent+clip fp32 fwd+bwd
    python -m benchmarks --kinds nt_xent --rows 1024 2048 4096 8192 --dims 128 --out benchmarks/results
    python -m benchmarks --device cuda --out DIR            # GPU defaults: nt_xent+clip, bf16+fp32, fwd+bwd, 2B <= 65536
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from . import machine, providers, report
from .worker import DTYPES, MODES

CPU_DEFAULTS = dict(kinds=["nt_xent", "clip"], rows=[1024, 2048, 4096, 8192], dims=[128],
                    modes=["forward+backward"], dtypes=["float32"], timeout=300, repeats=3)
CUDA_DEFAULTS = dict(kinds=["nt_xent", "clip"], rows=[4096, 8192, 16384, 32768, 65536],
                     dims=[128], modes=["forward+backward"], dtypes=["bfloat16", "float32"],
                     timeout=180, repeats=20)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument("--kinds", nargs="+", choices=providers.KINDS, help="loss kinds")
    p.add_argument("--rows", nargs="+", type=int, help="2B for nt_xent/supcon, B for clip")
    p.add_argument("--dims", nargs="+", type=int, help="feature sizes d")
    p.add_argument("--modes", nargs="+", choices=MODES)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    p.add_argument("--providers", nargs="+", help="only these providers (e.g. ours:cpu ours:reference pml)")
    p.add_argument("--repeats", type=int, help="CPU: timed steps per case (median reported)")
    p.add_argument("--timeout", type=float, help="seconds per case before it is recorded as TIMEOUT")
    p.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0: torch's default)")
    p.add_argument("--mem-limit-gib", type=float, default=8.0,
                   help="CPU: address-space growth allowed per case before allocations fail (OOM); 0 = none")
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--name", help="file name prefix (default: the device type)")
    p.add_argument("--list", action="store_true", help="print the providers available here and exit")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run_case(case, timeout):
    cmd = [sys.executable, "-m", "benchmarks.worker", json.dumps(case)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    # glibc otherwise keeps freed blocks below a dynamic threshold (up to 32 MiB) mapped, so a
    # step reusing the warm-up's memory shows no RSS growth: a fixed threshold returns every
    # large block to the OS and the peak RSS counts each step's real allocations.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
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


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.list:
        for kind in args.kinds:
            print(f"{kind}: {', '.join(providers.providers(kind, device))}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    prefix = args.name or device.type
    data = {"device": device.type, "machine": machine.describe(device), "args": vars(args), "results": []}
    data["machine"]["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    json_path = os.path.join(args.out, f"{prefix}.json")
    for kind in args.kinds:
        names = providers.providers(kind, device)
        if args.providers:
            names = [n for n in names if n in args.providers]
        if not names:
            print(f"# {kind}: no provider available here, skipped", flush=True)
        for dtype in args.dtypes:
            for mode in args.modes:
                for dim in args.dims:
                    for name in names:
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
                                f"{report._fmt_time(record['seconds'])}  {report._fmt_bytes(record['peak_bytes'])}"
                            if record["status"] == "ERROR":
                                msg += "  " + record.get("error", "")[:200]
                            print(f"{kind:8s} {mode:17s} {dtype:8s} d={dim:<4d} {rows_label(kind)}={rows:<6d} "
                                  f"{name:18s} {msg}", flush=True)
                            with open(json_path, "w") as f:  # keep what is done if interrupted
                                json.dump(data, f, indent=1)
    data["machine"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    md = report.markdown(data)
    with open(os.path.join(args.out, f"{prefix}.md"), "w") as f:
        f.write(f"# infonce_kernels benchmark ({device.type})\n\n{md}\n")
    pngs = report.plots(data, args.out, prefix)
    print(f"\nwrote {json_path}, {prefix}.md and {len(pngs)} plot(s) in {args.out}")
    head = report.headline(data, fused="ours:cpu" if device.type == "cpu" else "ours:triton")
    if head:
        print(f"headline (nt_xent fwd+bwd fp32 2B=8192 d=128): time ratio {head[0]:.2f}, memory ratio 1/{1 / head[1]:.0f}")
    return 0


def rows_label(kind):
    return "B" if kind == "clip" else "2B"
