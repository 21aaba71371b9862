"""Values and gradients of every public loss on the cpu backend are bit for bit those of the
committed baseline (scripts/check_bitwise.py; the baseline predates the package's restructuring)."""

import os
import subprocess
import sys

import pytest

import infonce_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif("cpu" not in infonce_kernels.available_backends("cpu"), reason="C++ extension not built")
def test_losses_bitwise_equal_to_baseline():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_bitwise.py")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all bitwise equal" in run.stdout
