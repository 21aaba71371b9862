"""Distributed losses on gloo with spawned processes: loss and DDP-averaged gradients equal the
single-process full-batch run (1e-10 in float64, 1e-5 in float32), even and uneven batches."""

import sys
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CPU_BACKENDS

import infonce_kernels as ik

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # spawned workers import distributed_worker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

COMPAT_LOSSES = ("lightly_ntxent", "lightly_dcl", "lightly_dclw", "open_clip_local", "open_clip_global",
                 "open_clip_local_nograd", "open_clip_global_nograd")
LOSSES = ("nt_xent", "info_nce", "clip", "supcon_views", "supcon_labels", "dcl", "dclw", "dhel")


def _spawn(tmp_path, sizes, dtype, backend, losses=LOSSES):
    from distributed_worker import run

    mp.spawn(run, args=(len(sizes), str(tmp_path / "rendezvous"), dtype, sizes, backend, losses),
             nprocs=len(sizes), join=True)


@pytest.mark.parametrize(
    "sizes,dtype",
    [([4, 4], "float64"), ([3, 5, 2], "float64"), ([3, 5, 2], "float32")],
    ids=["world2-float64", "world3-uneven-float64", "world3-uneven-float32"],
)
def test_distributed_matches_single_process(tmp_path, sizes, dtype):
    backend = "cpu" if "cpu" in CPU_BACKENDS else "reference"
    even = len(set(sizes)) == 1  # lightly and open_clip assume equal batches on every rank
    _spawn(tmp_path, sizes, dtype, backend, LOSSES + (COMPAT_LOSSES if even else ()))


def test_lightly_memory_bank_enqueues_every_rank(tmp_path):
    from distributed_worker import run_lightly_bank

    backend = "cpu" if "cpu" in CPU_BACKENDS else "reference"
    mp.spawn(run_lightly_bank, args=(2, str(tmp_path / "rendezvous"), backend), nprocs=2, join=True)


@pytest.mark.skipif("triton" not in ik.available_backends("cpu"), reason="needs TRITON_INTERPRET=1")
def test_distributed_triton_interpreter(tmp_path):
    _spawn(tmp_path, [3, 2], "float64", "triton", LOSSES)


def test_gather_needs_an_initialised_group():
    z = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ik.nt_xent(z, z + 1, gather_distributed=True)
    with pytest.raises(ValueError, match="in-batch negatives"):
        ik.info_nce(z, z, negative_keys=z, gather_distributed=True)
