"""Every loss of the family stays O(N d) in memory: forward+backward at 2B = 8,192 anchors,
d = 32, on the cpu backend, with a peak extra resident memory under 64 MiB per loss (one fp32
N x N matrix alone would be 256 MiB; the losses measure 3-7 MiB).

All losses run in ONE fresh subprocess (this file run as a script), one after the other; before
each step the peak counter (VmHWM) is reset through /proc/self/clear_refs, so each loss's extra
peak over the resident size just before it is measured separately (as tests/rss_probe.py does).
``MALLOC_MMAP_THRESHOLD_`` (1 MiB) makes glibc return freed large blocks to the OS, so memory freed by one
step is not silently reused by the next.

    python tests/test_loss_family_memory.py --rows 32768 --dim 32     # one JSON line per loss, any size

Marked ``slow``: the 2B = 8,192 forward+backward passes are ~6.7e7 pairs each (about 15 s for the
whole family on 2 cores).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
from rss_probe import status_kib  # this folder is on sys.path both under pytest and as a script

ROWS, DIM = 8192, 32
LIMIT = 64 << 20  # a quarter of one fp32 ROWS x ROWS matrix


def _cases(ik, torch, z1, z2, labels, backend):
    return {
        "supcon": lambda: ik.supcon(torch.stack([z1, z2], 1), labels, 0.1, backend=backend),
        "dcl": lambda: ik.dcl(z1, z2, 0.1, backend=backend),
        "dclw": lambda: ik.dclw(z1, z2, 0.1, 0.5, backend=backend),
        "dhel": lambda: ik.dhel(z1, z2, 0.3, backend=backend),
        "kcl": lambda: ik.kcl(z1, z2, 2.0, 16.0, backend=backend),
        "hard_negative_nt_xent": lambda: ik.hard_negative_nt_xent(z1, z2, 0.5, 1.0, 0.1, backend=backend),
        "debiased_nt_xent": lambda: ik.debiased_nt_xent(z1, z2, 0.5, 0.1, backend=backend),
        "uniformity": lambda: ik.uniformity(z1, 2.0, backend=backend),
        "alignment": lambda: ik.alignment(z1, z2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS, help="2B, the number of anchors")
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--only", nargs="*", help="run only these losses")
    args = parser.parse_args()
    import torch

    import infonce_kernels as ik

    torch.manual_seed(0)
    b = args.rows // 2
    z1 = torch.randn(b, args.dim, requires_grad=True)
    z2 = torch.randn(b, args.dim, requires_grad=True)
    labels = torch.randint(0, 100, (b,))
    # Warm up every loss once on 2048 rows: thread pools, BLAS buffers (the kernels' tiles are
    # already full-size there) and code paths are set up once per process, not part of a step.
    w = min(1024, b)
    small = _cases(ik, torch, z1[:w].detach().requires_grad_(), z2[:w].detach().requires_grad_(),
                   labels[:w], args.backend)
    for name, fn in small.items():
        if not args.only or name in args.only:
            fn().backward()
    del small
    for name, fn in _cases(ik, torch, z1, z2, labels, args.backend).items():
        if args.only and name not in args.only:
            continue
        z1.grad = z2.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = status_kib("VmRSS")
        start = time.perf_counter()
        loss = fn()
        loss.backward()
        seconds = time.perf_counter() - start
        peak = status_kib("VmHWM")
        ok = bool(torch.isfinite(loss)) and bool(torch.isfinite(z1.grad).all())
        del loss
        print(json.dumps({"loss": name, "rows": args.rows, "dim": args.dim, "backend": args.backend,
                          "threads": torch.get_num_threads(), "seconds": round(seconds, 3),
                          "extra_bytes": (peak - before) * 1024, "finite": ok}), flush=True)


@pytest.mark.slow
def test_loss_family_peak_memory_is_linear():
    import infonce_kernels as ik

    if "cpu" not in ik.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--rows", str(ROWS),
                          "--dim", str(DIM)], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["loss"] for r in results] == ["supcon", "dcl", "dclw", "dhel", "kcl", "hard_negative_nt_xent",
                                            "debiased_nt_xent", "uniformity", "alignment"]
    for r in results:
        assert r["finite"], r
        assert r["extra_bytes"] < LIMIT, f"{r['loss']}: peak extra {r['extra_bytes'] / 2**20:.0f} MiB >= 64 MiB ({r})"


if __name__ == "__main__":
    main()
