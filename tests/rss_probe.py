"""Peak extra resident memory of one NT-Xent forward+backward, measured in this process.

    python tests/rss_probe.py --backend cpu --rows 8192 --dim 128

Prints one JSON line: the backend, the shape, the seconds the step took and ``extra_bytes``,
the peak resident set size during the step minus the resident size just before it (the
inputs already allocated). The peak counter is reset through /proc/self/clear_refs (Linux), so
each probe must run in a fresh process.
"""

import argparse
import json
import time

import torch

import infonce_kernels as ik


def status_kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS: resident now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe_args(doc: str, rows_help: str, **extra):
    """The probes' command line: ``--rows``, ``--dim``, ``--threads`` and the ``extra`` arguments
    (name -> add_argument keywords); sets the thread count and seeds torch."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, kwargs in extra.items():
        parser.add_argument(f"--{name}", **kwargs)
    parser.add_argument("--rows", type=int, required=True, help=rows_help)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def measured_step(step):
    """Runs ``step()`` once with the peak RSS counter reset just before it; returns the seconds it
    took and its peak resident bytes above the resident size before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = status_kib("VmRSS")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return seconds, (status_kib("VmHWM") - before) * 1024


def main():
    args = probe_args(__doc__, "2B, the number of anchors", backend=dict(required=True))
    b = args.rows // 2
    z1 = torch.randn(b, args.dim, requires_grad=True)
    z2 = torch.randn(b, args.dim, requires_grad=True)
    # Warm up on a small batch (thread pool, BLAS buffers, kernels); the measured step is the
    # first at full size, so nothing a full-size step leaves behind is hidden.
    ik.nt_xent(z1[:256], z2[:256], 0.5, backend=args.backend).backward()
    z1.grad = z2.grad = None
    seconds, extra = measured_step(lambda: ik.nt_xent(z1, z2, 0.5, backend=args.backend).backward())
    print(json.dumps({"backend": args.backend, "rows": args.rows, "dim": args.dim,
                      "threads": torch.get_num_threads(), "seconds": seconds, "extra_bytes": extra}))

if __name__ == "__main__":
    main()
