"""Worker for tests/test_siglip_distributed.py: one process of a gloo group (spawned).

Every rank holds the same model and global batch and takes its own rows. It checks that
ik.siglip_loss(gather_distributed=True) gives, averaged over the ranks, the single-process loss
of the whole batch and, after DDP-style averaging, its gradients (model, logit_scale and
logit_bias), with and without labels, for every reduction; and that the open_clip adapter's
SigLipLoss gives, on every rank, open_clip's own loss and gradients for each dist_impl.
"""

import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_worker import _ddp_step, _group

import infonce_kernels as ik

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
import load  # noqa: E402

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _siglip(model, log_t, bias, x1, x2, labels, reduction, **kw):
    img, txt = F.normalize(model(x1), dim=1), F.normalize(model(x2), dim=1)
    out = ik.siglip_loss(img, txt, log_t.exp(), bias, labels=labels, reduction=reduction, **kw)
    if reduction != "none":
        return out
    # "none": the per-image losses; reduced here the way "mean" is under the convention
    rows = x1.shape[0] if not kw.get("gather_distributed") else None
    return out.sum() / rows if rows else out.sum() * (dist.get_world_size() / _total[0])


_total = [0]


def check_gathered(rank, world, sizes, dtype, backend):
    torch.manual_seed(0)
    total = _total[0] = sum(sizes)
    x1, x2 = torch.randn(total, 7, dtype=dtype), torch.randn(total, 7, dtype=dtype)
    labels = torch.randint(0, 3, (total,))
    model = torch.nn.Linear(7, 5).to(dtype)
    log_t = torch.nn.Parameter(torch.tensor(math.log(10.0), dtype=dtype))
    bias = torch.nn.Parameter(torch.tensor(-10.0, dtype=dtype))
    params = [*model.parameters(), log_t, bias]
    lo = sum(sizes[:rank])
    rows = slice(lo, lo + sizes[rank])
    tol = TOLERANCE[dtype]
    for with_labels in (False, True):
        for reduction in ("mean", "sum", "none"):
            what = f"labels={with_labels} reduction={reduction} {dtype}"
            local = labels[rows] if with_labels else None
            loss, grads = _ddp_step(params, world, lambda: _siglip(model, log_t, bias, x1[rows], x2[rows], local,
                                                                   reduction, gather_distributed=True,
                                                                   backend=backend))
            dist.all_reduce(loss)  # the mean over ranks is the loss of the whole batch
            loss /= world
            want, want_grads = _ddp_step(params, 1, lambda: _siglip(model, log_t, bias, x1, x2,
                                                                    labels if with_labels else None, reduction,
                                                                    backend=backend))
            torch.testing.assert_close(loss, want, rtol=tol, atol=tol, msg=f"{what} loss")
            for i, (g, h) in enumerate(zip(grads, want_grads)):
                torch.testing.assert_close(g, h, rtol=tol, atol=tol, msg=f"{what} gradient {i}")


def check_second_order_refused(rank, world, backend):
    """A gradient taken with create_graph=True is right; differentiating it again raises."""
    torch.manual_seed(2)
    img = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    for reduction in ("mean", "none"):
        loss = ik.siglip_loss(img, txt, 10.0, -10.0, reduction=reduction, gather_distributed=True, backend=backend)
        (gx,) = torch.autograd.grad(loss.sum(), img, create_graph=True)
        try:
            gx.sum().backward()
        except RuntimeError as e:
            assert "second-order" in str(e), e
        else:
            raise AssertionError(f"second-order derivative through the gathered loss ({reduction}) was not refused")


def check_open_clip(rank, world, backend):
    """Per rank, not only on average: the adapter's loss and gradients are open_clip's."""
    from infonce_kernels.compat.open_clip import SigLipLoss

    oc = load.module("open_clip.loss")
    torch.manual_seed(1)
    n = 3
    img_all = F.normalize(torch.randn(world * n, 6, dtype=torch.float64), dim=1)
    txt_all = F.normalize(torch.randn(world * n, 6, dtype=torch.float64), dim=1)
    mine = slice(rank * n, rank * n + n)
    for dist_impl in ("bidir", "shift", "reduce", "gather"):
        out = []
        for make in (lambda: SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl, backend=backend),
                     lambda: oc.SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)):
            img, txt = img_all[mine].clone().requires_grad_(), txt_all[mine].clone().requires_grad_()
            t = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
            b = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
            loss = make()(img, txt, t, b)
            loss.backward()
            out.append([loss.detach(), img.grad, txt.grad, t.grad, b.grad])
        for i, (a, w) in enumerate(zip(*out)):
            torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-12, msg=f"open_clip {dist_impl} item {i}")


def run(rank, world, init_file, sizes, dtypes, backend):
    with _group(rank, world, init_file):
        for dtype in dtypes:
            check_gathered(rank, world, sizes, getattr(torch, dtype), backend)
        check_second_order_refused(rank, world, backend)
        if load.module("open_clip.loss") is not None:
            check_open_clip(rank, world, backend)
