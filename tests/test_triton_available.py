"""infonce_kernels.triton imports and reports (not raises) when it cannot run.

Runs in every environment (with or without triton, with or without
TRITON_INTERPRET); each case spawns a fresh interpreter because Triton reads
TRITON_INTERPRET when kernels are decorated.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str, env_update: dict, drop=("TRITON_INTERPRET",)) -> str:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_without_triton_installed():
    out = _run(
        """
        import sys
        sys.modules["triton"] = None          # import triton -> ImportError
        import torch
        import infonce_kernels as ik
        import infonce_kernels.triton as t
        ok, why = t.available("cpu")
        loss = ik.nt_xent(torch.randn(4, 3), torch.randn(4, 3))  # the package works without triton
        print(ok, "|", why, "|", "triton" in ik.available_backends("cpu"), "|", bool(torch.isfinite(loss)))
        """,
        {},
    )
    assert out == "False | triton is not installed | False | True"


def test_cpu_needs_interpreter():
    pytest.importorskip("triton")
    out = _run(
        """
        import infonce_kernels.triton as t
        ok, why = t.available("cpu")
        print(ok, "|", why)
        """,
        {},
    )
    ok, why = out.split(" | ")
    assert ok == "False" and "TRITON_INTERPRET=1" in why
