"""Time and peak memory of the loss cases over sizes, modes, dtypes and providers: JSON, markdown, plots.

Run as ``python -m benchmarks`` or, installed, ``infonce-bench`` (from any directory).

Every case runs in a fresh subprocess with a time limit; OOM and TIMEOUT are recorded and the
larger sizes of that series SKIPPED. Results go to ./infonce-bench-<timestamp>/ unless --output
names a folder; a folder that already holds results of the same --name is refused without
--overwrite (the committed results change only when asked).

Examples:

    python -m benchmarks                                    # CPU defaults: nt_xent+clip fp32 fwd+bwd
    python -m benchmarks --kinds nt_xent --rows 1024 2048 --dims 128 --output bench-out
    python -m benchmarks --device cuda                      # GPU: nt_xent+clip, bf16+fp32, 2B <= 65536
    python -m benchmarks --list                             # the cases and the providers available here
    python -m benchmarks --from-json R/cpu.json --output R --overwrite    # redraw R's tables and plots
"""

import argparse
import json
import os
import sys
import time

import torch

from . import cases, machine, report, runner
from .worker import DTYPES, MODES

CPU_DEFAULTS = dict(kinds=["nt_xent", "clip"], rows=[1024, 2048, 4096, 8192], dims=[128],
                    modes=["forward+backward"], dtypes=["float32"], timeout=300, repeats=3)
CUDA_DEFAULTS = dict(kinds=["nt_xent", "clip"], rows=[4096, 8192, 16384, 32768, 65536],
                     dims=[128], modes=["forward+backward"], dtypes=["bfloat16", "float32"],
                     timeout=180, repeats=20)


def parse_args(argv):
    prog = "python -m benchmarks" if os.path.basename(sys.argv[0]) == "__main__.py" else None
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument("--kinds", nargs="+", choices=list(cases.CASES), help="loss cases (default: nt_xent clip)")
    p.add_argument("--rows", nargs="+", type=int, help="sizes: 2B for two-view losses, B for paired ones")
    p.add_argument("--dims", nargs="+", type=int, help="feature sizes d")
    p.add_argument("--modes", nargs="+", choices=MODES)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    p.add_argument("--providers", nargs="+",
                   help="only these providers (e.g. ours:cpu materialised:bf16 pml)")
    p.add_argument("--repeats", type=int, help="CPU: timed steps per case (median reported)")
    p.add_argument("--timeout", type=float, help="seconds per case before it is recorded as TIMEOUT")
    p.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0: torch's default)")
    p.add_argument("--mem-limit-gib", type=float, default=8.0,
                   help="CPU: address-space growth allowed per case before allocations fail (OOM); 0 = none")
    p.add_argument("-o", "--output", "--out", dest="output",
                   help="output folder (default: a fresh ./infonce-bench-<timestamp>/)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --output even if it holds results of the same --name")
    p.add_argument("--name", help="file name prefix (default: the device type)")
    p.add_argument("--list", action="store_true",
                   help="print the cases and their providers available here, and exit")
    p.add_argument("--from-json", metavar="FILE",
                   help="measure nothing: write the markdown and plots of a results JSON "
                        "(prefix: its file name)")
    args = p.parse_args(argv)
    defaults = CUDA_DEFAULTS if torch.device(args.device).type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def fresh_folder(base="."):
    """A folder that does not exist yet: infonce-bench-<YYYYmmdd-HHMMSS>[-n] under ``base``."""
    stem = os.path.join(base, "infonce-bench-" + time.strftime("%Y%m%d-%H%M%S"))
    path, n = stem, 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}"
    return path


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.list:
        for kind in args.kinds:
            case = cases.get(kind)
            print(f"{kind} ({case.rows_label}; {case.settings}): {', '.join(cases.providers(kind, device))}")
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        prefix = args.name or os.path.splitext(os.path.basename(args.from_json))[0]
        out = _output_folder(args, f"{prefix}.md")
        if out is None:
            return 2
        _write_report(data, out, prefix)
        return 0
    prefix = args.name or device.type
    out = _output_folder(args, f"{prefix}.json")
    if out is None:
        return 2
    json_path = os.path.join(out, f"{prefix}.json")
    data = {"device": device.type, "machine": machine.describe(device), "args": vars(args), "results": []}
    data["machine"]["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runner.sweep(args, device, data, json_path)
    data["machine"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    data["machine"]["load_average_finished"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    runner.write_json(data, json_path)
    _write_report(data, out, prefix, f"{prefix}.json")
    return 0


def _output_folder(args, first_file):
    """The absolute output folder, created and announced; None (after one error line) if it holds
    ``first_file`` and --overwrite was not given."""
    out = os.path.abspath(args.output or fresh_folder())
    if os.path.exists(os.path.join(out, first_file)) and not args.overwrite:
        print(f"error: {os.path.join(out, first_file)} exists; pass --overwrite to replace it, "
              "or choose another --output or --name", file=sys.stderr)
        return None
    os.makedirs(out, exist_ok=True)
    print(f"writing to {out}", flush=True)
    if not report.can_plot():
        print("note: matplotlib is not installed, so no plots (pip install matplotlib)", flush=True)
    return out


def _write_report(data, out, prefix, *written):
    with open(os.path.join(out, f"{prefix}.md"), "w") as f:
        f.write(f"# infonce_kernels benchmark ({data['device']})\n\n{report.markdown(data)}\n")
    pngs = report.plots(data, out, prefix) if report.can_plot() else []
    print(f"\nwrote {', '.join([*written, f'{prefix}.md'])} and {len(pngs)} plot(s) in {out}")
