"""Worker for tests/test_distributed.py: one process of a gloo group (spawned, not forked).

Every rank holds the same model and the same global batch, takes its own slice of rows, and
checks that (a) the mean over ranks of its distributed loss equals the single-process loss of
the whole batch and (b) its parameter gradients, averaged over ranks as DistributedDataParallel
does, equal the single-process gradients.
"""

import contextlib
import math
import os
import time

import torch
import torch.distributed as dist

import infonce_kernels as ik

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _nt_xent(model, tau, x1, x2, **kw):
    return ik.nt_xent(model(x1), model(x2), tau, **kw)


def _info_nce(model, tau, x1, x2, **kw):
    return ik.info_nce(model(x1), model(x2), temperature=tau, **kw)


def _clip(model, tau, x1, x2, **kw):
    return ik.clip_loss(model(x1), model(x2), 1.0 / tau, **kw)


def _supcon_views(model, tau, x1, x2, **kw):
    return ik.supcon(torch.stack([model(x1), model(x2)], 1), None, tau, **kw)


def _supcon_labels(model, tau, x1, x2, labels, **kw):
    return ik.supcon(torch.stack([model(x1), model(x2)], 1), labels, tau, **kw)


def _dcl(model, tau, x1, x2, **kw):
    return ik.dcl(model(x1), model(x2), tau, **kw)


def _dclw(model, tau, x1, x2, **kw):
    return ik.dclw(model(x1), model(x2), tau, detach_weights=False, **kw)


def _dhel(model, tau, x1, x2, **kw):
    return ik.dhel(model(x1), model(x2), tau, **kw)


def _lightly_ntxent(model, tau, x1, x2, gather_distributed=False, backend="auto"):
    from infonce_kernels.compat.lightly import NTXentLoss

    return NTXentLoss(float(tau.detach()), gather_distributed=gather_distributed, backend=backend)(model(x1), model(x2))


def _lightly_dcl(weighted):
    def loss(model, tau, x1, x2, gather_distributed=False, backend="auto"):
        from infonce_kernels.compat.lightly import DCLLoss, DCLWLoss

        kind, kw = (DCLWLoss, {"sigma": 0.7}) if weighted else (DCLLoss, {})
        return kind(float(tau.detach()), gather_distributed=gather_distributed, backend=backend, **kw)(model(x1),
                                                                                                     model(x2))

    return loss


def _lightly_dclw_formula(model, tau, x1, x2):
    """lightly 1.6's distributed DCLWLoss written out: gathered keys, weights from the rank's own pairs."""
    from test_compat import lightly_dcl
    from torch.distributed.nn.functional import all_gather

    from infonce_kernels.compat.lightly import negative_mises_fisher_weights

    return lightly_dcl(model(x1), model(x2), float(tau.detach()), lambda a, b: negative_mises_fisher_weights(a, b, 0.7),
                       gather=all_gather, rank=dist.get_rank())


def _open_clip(local_loss, gather_with_grad=True):
    def loss(model, tau, x1, x2, gather_distributed=False, backend="auto"):
        from infonce_kernels.compat.open_clip import ClipLoss

        world = dist.get_world_size() if gather_distributed else 1
        rank = dist.get_rank() if gather_distributed else 0
        clip = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world,
                        backend=backend)
        a, b = torch.nn.functional.normalize(model(x1), dim=1), torch.nn.functional.normalize(model(x2), dim=1)
        return clip(a, b, 1.0 / tau)

    return loss


def _open_clip_formula(local_loss):
    """open_clip's ClipLoss with gather_with_grad=False written out: gather_features (all_gather
    without gradient; the rank's own features spliced back in unless local_loss), then the logits
    and the two cross-entropies, materialised."""
    def loss(model, tau, x1, x2):
        img, txt = torch.nn.functional.normalize(model(x1), dim=1), torch.nn.functional.normalize(model(x2), dim=1)
        rank, world, scale = dist.get_rank(), dist.get_world_size(), 1.0 / tau
        gathered = []
        for x in (img, txt):
            parts = [torch.zeros_like(x) for _ in range(world)]
            dist.all_gather(parts, x.detach())
            if not local_loss:
                parts[rank] = x
            gathered.append(torch.cat(parts))
        all_img, all_txt = gathered
        if local_loss:
            per_image, per_text = scale * img @ all_txt.T, scale * txt @ all_img.T
            labels = torch.arange(img.shape[0]) + img.shape[0] * rank
        else:
            per_image = scale * all_img @ all_txt.T
            per_text = per_image.T
            labels = torch.arange(per_image.shape[0])
        ce = torch.nn.functional.cross_entropy
        return (ce(per_image, labels) + ce(per_text, labels)) / 2

    return loss


LOSSES = {"lightly_ntxent": _lightly_ntxent, "lightly_dcl": _lightly_dcl(False), "lightly_dclw": _lightly_dcl(True),
          "open_clip_local": _open_clip(True), "open_clip_global": _open_clip(False),
          "open_clip_local_nograd": _open_clip(True, False), "open_clip_global_nograd": _open_clip(False, False),
          "nt_xent": _nt_xent, "info_nce": _info_nce, "clip": _clip, "supcon_views": _supcon_views,
          "supcon_labels": _supcon_labels, "dcl": _dcl, "dclw": _dclw, "dhel": _dhel,
          "debiased": lambda m, tau, x1, x2, **kw: ik.debiased_nt_xent(m(x1), m(x2), tau, 0.1, **kw),
          "hard_negative": lambda m, tau, x1, x2, **kw: ik.hard_negative_nt_xent(m(x1), m(x2), tau, 0.5, 0.1, **kw),
          "kcl": lambda m, tau, x1, x2, **kw: ik.kcl(m(x1), m(x2), tau, 4.0, **kw),
          "uniformity": lambda m, tau, x1, x2, **kw: ik.uniformity(m(x1), tau, **kw)}
LABELLED = {"supcon_labels"}
# losses without a single-process twin, compared on each rank with the library's own distributed formula
PER_RANK = {"lightly_dclw": _lightly_dclw_formula, "open_clip_local_nograd": _open_clip_formula(True),
            "open_clip_global_nograd": _open_clip_formula(False)}


def gloo_threads():
    """Names of this process's gloo threads (Linux /proc; empty elsewhere)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, tid, "comm")) as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended while we listed
            pass
    return [n for n in names if "gloo" in n]


def _ddp_step(params, world, compute):
    """(loss, parameter gradients averaged over the ``world`` ranks as DistributedDataParallel
    averages them; None where a parameter got no gradient) of one backward of ``compute()``."""
    for p in params:
        p.grad = None
    loss = compute()
    loss.backward()
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    if world > 1:
        for g in grads:
            if g is not None:
                dist.all_reduce(g)
                g /= world
    return loss.detach().clone(), grads


@contextlib.contextmanager
def _group(rank, world, init_file):
    """A gloo group for the block; afterwards no gloo thread may remain: one still alive at
    interpreter shutdown can abort the process (see the torch.distributed.nn import in
    infonce_kernels/distributed.py, which the custom ops' first call would otherwise trigger)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        yield
    finally:
        dist.destroy_process_group()
    left = gloo_threads()
    deadline = time.monotonic() + 10.0  # threads that are ending may still be listed for a moment
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = gloo_threads()
    assert not left, f"process group outlived destroy_process_group by 10 s: {left}"


def run(rank, world, init_file, dtype_name, sizes, backend, losses):
    with _group(rank, world, init_file):
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        total = sum(sizes)
        x1, x2 = torch.randn(total, 7, dtype=dtype), torch.randn(total, 7, dtype=dtype)
        labels = torch.randint(0, 3, (total,))
        model = torch.nn.Linear(7, 5).to(dtype)
        log_tau = torch.nn.Parameter(torch.tensor(math.log(0.3), dtype=dtype))
        params = [*model.parameters(), log_tau]
        lo = sum(sizes[:rank])
        rows = slice(lo, lo + sizes[rank])
        tol = TOLERANCE[dtype]
        for name in losses:
            fn = LOSSES[name]
            local_kw = {"labels": labels[rows]} if name in LABELLED else {}
            full_kw = {"labels": labels} if name in LABELLED else {}
            loss, grads = _ddp_step(params, world, lambda: fn(model, log_tau.exp(), x1[rows], x2[rows],
                                                              gather_distributed=True, backend=backend, **local_kw))
            if name in PER_RANK:
                want, want_grads = _ddp_step(params, world, lambda: PER_RANK[name](model, log_tau.exp(), x1[rows],
                                                                                   x2[rows]))
            else:
                dist.all_reduce(loss)  # the mean over ranks is the loss of the whole batch
                loss /= world
                want, want_grads = _ddp_step(params, 1, lambda: fn(model, log_tau.exp(), x1, x2, backend=backend,
                                                                   **full_kw))
            torch.testing.assert_close(loss, want, rtol=tol, atol=tol, msg=f"{name} loss")
            for i, (g, h) in enumerate(zip(grads, want_grads)):
                if g is None or h is None:  # a loss that takes the temperature as a float
                    assert g is None and h is None, f"{name} gradient {i}"
                else:
                    torch.testing.assert_close(g, h, rtol=tol, atol=tol, msg=f"{name} gradient {i}")


def run_lightly_bank(rank, world, init_file, backend):
    """lightly's NTXentLoss with a memory bank and gather_distributed: the loss is local (queries
    against the bank), and every rank enqueues the normalised out1 of every rank, in rank order."""
    from infonce_kernels.compat.lightly import NTXentLoss

    with _group(rank, world, init_file):
        torch.manual_seed(0)  # the same initial bank on every rank, as the same seed gives in lightly
        loss = NTXentLoss(0.3, memory_bank_size=(16, 5), gather_distributed=True, backend=backend).double()
        first_bank = None
        for step in range(2):
            torch.manual_seed(100 + step)  # the same global batch on every rank; rank r holds rows 3r..3r+2
            out0, out1 = torch.randn(3 * world, 5, dtype=torch.float64), torch.randn(3 * world, 5, dtype=torch.float64)
            mine = slice(3 * rank, 3 * rank + 3)
            if step == 0:
                first_bank = loss.bank.clone()
            value = loss(out0[mine].requires_grad_(), out1[mine])
            if step == 0:  # local queries against the initial bank
                alone = NTXentLoss(0.3, memory_bank_size=(16, 5), backend=backend).double()
                alone.bank = first_bank.clone()
                torch.testing.assert_close(value, alone(out0[mine].requires_grad_(), out1[mine]), rtol=1e-12, atol=1e-12)
            everyone = torch.nn.functional.normalize(out1, dim=1)
            torch.testing.assert_close(loss.bank[3 * world * step: 3 * world * (step + 1)], everyone, rtol=0, atol=1e-15)
        assert int(loss.bank_ptr) == 6 * world
