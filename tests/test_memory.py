"""The cpu backend's forward+backward stays O(N d): its peak extra memory is at most 1/8 of the
materialising reference's, measured as peak RSS in fresh subprocesses."""

import json
import pathlib
import subprocess
import sys

import pytest
from conftest import CPU_BACKENDS

PROBE = pathlib.Path(__file__).with_name("rss_probe.py")


def probe(backend, rows, dim):
    out = subprocess.run([sys.executable, str(PROBE), "--backend", backend, "--rows", str(rows),
                          "--dim", str(dim)], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="C++ extension not built")
def test_cpu_backend_peak_memory_is_a_fraction_of_reference():
    rows, dim = 4096, 64
    ref = probe("reference", rows, dim)
    cpu = probe("cpu", rows, dim)
    # One fp32 N x N matrix alone is 64 MiB here; the reference holds several at once.
    assert ref["extra_bytes"] >= rows * rows * 4, ref
    assert cpu["extra_bytes"] * 8 <= ref["extra_bytes"], (cpu, ref)
