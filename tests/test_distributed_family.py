"""debiased / hard-negative NT-Xent, KCL and uniformity with gather_distributed=True on gloo:
loss and DDP-averaged gradients equal the single-process full-batch run (the mechanism of
tests/distributed_worker.py), an uneven batch."""

import pathlib
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CPU_BACKENDS

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # spawned workers import distributed_worker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

LOSSES = ("debiased", "hard_negative", "kcl", "uniformity")


@pytest.mark.parametrize("sizes,dtype", [([3, 5, 2], "float64")], ids=["world3-uneven-float64"])
def test_family_distributed_matches_single_process(tmp_path, sizes, dtype):
    from distributed_worker import run

    backend = "cpu" if "cpu" in CPU_BACKENDS else "reference"
    mp.spawn(run, args=(len(sizes), str(tmp_path / "rendezvous"), dtype, sizes, backend, LOSSES),
             nprocs=len(sizes), join=True)
