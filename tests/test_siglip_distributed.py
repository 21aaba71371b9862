"""ik.siglip_loss(gather_distributed=True) and the open_clip SigLipLoss adapter on gloo with
spawned processes (worker: tests/siglip_worker.py): world sizes 2 and 3, uneven batches, float64
(and float32 on the uneven world of 3), with and without labels, every reduction; the adapter against open_clip's own
SigLipLoss on every rank for each of its dist_impl modes (when open_clip is installed)."""

import pathlib
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import CPU_BACKENDS

import infonce_kernels as ik

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # spawned workers import siglip_worker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.mark.parametrize("sizes,dtypes", [([4, 4], ["float64"]), ([3, 5, 2], ["float64", "float32"])],
                         ids=["world2", "world3-uneven"])
def test_siglip_distributed_matches_single_process(tmp_path, sizes, dtypes):
    from siglip_worker import run

    backend = "cpu" if "cpu" in CPU_BACKENDS else "reference"
    mp.spawn(run, args=(len(sizes), str(tmp_path / "rendezvous"), sizes, dtypes, backend), nprocs=len(sizes),
             join=True)


def test_siglip_gather_needs_an_initialised_group():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ik.siglip_loss(x, x + 1, 10.0, -10.0, gather_distributed=True)
