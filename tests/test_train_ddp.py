"""DDP smoke test of the trainer: 2 CPU processes (gloo), as torchrun would start them."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("kornia")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, losses):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from infonce_kernels.train import TrainConfig, train
    try:
        # One process group for every loss: the first train() starts it, the others reuse it.
        for loss in losses:
            train(TrainConfig(dataset="digits", subset=64, batch_size=32, epochs=1, width=8, hidden_dim=8, proj_dim=8,
                              loss=loss, eval_every=0, knn_k=3, probe=False, progress=False, plot=False, device="cpu",
                              output_dir=os.path.join(out, loss)), log=lambda *a, **k: None)
    finally:
        torch.distributed.destroy_process_group()
    from distributed_worker import gloo_threads
    assert not gloo_threads(), f"process group outlived destroy_process_group: {gloo_threads()}"


LOSSES = ("nt_xent", "kcl")  # the package's distributed loss; gathered inputs


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    out = str(tmp_path / "ddp")
    mp.spawn(_worker, args=(2, _free_port(), out, LOSSES), nprocs=2, join=True)
    for loss in LOSSES:
        ck = torch.load(os.path.join(out, loss, "last.pt"), map_location="cpu", weights_only=True)
        assert ck["global_step"] == 2 and len(ck["rng"]) == 2, loss
        # each rank drew its own augmentations
        assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"]), loss
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in ck["history"]["steps"]), loss
