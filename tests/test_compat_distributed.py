"""open_clip's ClipLoss over 2 gloo processes against open_clip's own loss module: with
``local_loss=False, gather_with_grad=True`` every rank's loss and gradients (features and
``logit_scale``) equal open_clip's on that rank, not only their DDP average."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
import load  # noqa: E402


def _worker(rank, world, port, local_loss, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from infonce_kernels.compat.open_clip import ClipLoss

        oc = load.module("open_clip.loss")
        torch.manual_seed(0)
        img_all = F.normalize(torch.randn(world * 4, 6, dtype=torch.float64), dim=1)
        txt_all = F.normalize(torch.randn(world * 4, 6, dtype=torch.float64), dim=1)
        out = []
        for cls in (ClipLoss, oc.ClipLoss):
            img = img_all[rank * 4: rank * 4 + 4].clone().requires_grad_()
            txt = txt_all[rank * 4: rank * 4 + 4].clone().requires_grad_()
            scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
            loss = cls(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world)(img, txt, scale)
            loss.backward()
            out.append([loss.detach(), img.grad, txt.grad, scale.grad])
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("local_loss", [False, True])
def test_open_clip_per_rank_gradients(local_loss):
    if load.module("open_clip.loss") is None:
        pytest.skip("open_clip is not installed here (pip install the test extra)")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with mp.Manager() as manager:
        results = manager.dict()
        port = 29500 + os.getpid() % 1000 + (7 if local_loss else 0)
        mp.spawn(_worker, args=(2, port, local_loss, results), nprocs=2, join=True)
        for rank in range(2):
            ours, theirs = results[rank]
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
