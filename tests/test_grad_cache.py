"""Gradient caching (infonce_kernels.grad_cache.cached_step): the cached step's parameter gradients
equal one full-batch backward (float64 to 1e-10 relative, float32 and bf16 autocast by the 2x
same-precision rule), with dropout replayed per chunk, several chunk sizes (one not dividing the
batch), a learnable temperature, two towers (CLIP), BatchNorm's two modes, DDP on two gloo
processes, and the trainer's --grad-cache-chunk end to end.
"""

import math
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import infonce_kernels as ik
from infonce_kernels.grad_cache import cached_step

B, D_IN, D_OUT = 24, 7, 5
CHUNKS = [5, 8, 24, 100]  # 5 does not divide the batch; 24 and 100 give one chunk


def mlp(dtype=torch.float64, dropout=0.3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, D_OUT)).to(dtype)


def bn_mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, D_OUT)).to(dtype)


def views(dtype=torch.float64, seed=1, n=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g, dtype=dtype), torch.randn(n, D_IN, generator=g, dtype=dtype)


def grads(*modules):
    out = []
    for m in modules:
        out += [p.grad.detach().clone() for p in m.parameters()]
        m.zero_grad(set_to_none=True)
    return out


def chunked_with_graph(model, x, chunk):
    """The full-batch forward drawing its randomness chunk by chunk, as the cached step does: the
    function whose one backward the cached step must reproduce."""
    return torch.cat([model(c) for c in x.split(chunk)])


def rel_err(got, want):
    return max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-300)) for g, w in zip(got, want))


def nt_xent_pair(a, b):
    return ik.nt_xent(a, b, 0.5)


# ---------------------------------------------------------------------------------------------- float64


@pytest.mark.parametrize("chunk", CHUNKS)
def test_float64_dropout_two_views(chunk):
    model = mlp()
    x1, x2 = views()
    torch.manual_seed(123)
    out = cached_step([model, model], [x1, x2], nt_xent_pair, chunk)
    after_cached = torch.get_rng_state()
    got = grads(model)
    torch.manual_seed(123)
    want_loss = nt_xent_pair(chunked_with_graph(model, x1, chunk), chunked_with_graph(model, x2, chunk))
    want_loss.backward()
    want = grads(model)
    assert rel_err(got, want) <= 1e-10
    torch.testing.assert_close(out.loss, want_loss.detach(), rtol=1e-12, atol=0)
    # the generator continues where pass 1 left it: where the full-batch forward leaves it
    assert torch.equal(after_cached, torch.get_rng_state())
    assert [tuple(z.shape) for z in out.embeddings] == [(B, D_OUT), (B, D_OUT)]
    assert not any(z.requires_grad for z in out.embeddings)


@pytest.mark.parametrize("chunk", [5, 8])
def test_dropout_randomness_is_replayed(chunk):
    """Without the replay, pass 3 would draw new dropout masks: the gradient would be wrong."""
    model = mlp()
    x = torch.cat(views())
    torch.manual_seed(7)
    cached_step(model, x, lambda z: ik.nt_xent(*z.chunk(2), 0.5), chunk)
    got = grads(model)
    torch.manual_seed(7)
    ik.nt_xent(*chunked_with_graph(model, x, chunk).chunk(2), 0.5).backward()
    want = grads(model)
    torch.manual_seed(8)  # other masks in the reference: the gradients differ by far more than 1e-10
    ik.nt_xent(*chunked_with_graph(model, x, chunk).chunk(2), 0.5).backward()
    other = grads(model)
    assert rel_err(got, want) <= 1e-10 < rel_err(other, want)


@pytest.mark.parametrize("chunk", [5, 8, 100])
def test_float64_equals_one_full_forward_without_randomness(chunk):
    """No dropout, no BatchNorm: the reference is literally one forward over the whole batch."""
    model = mlp(dropout=0.0)
    x = torch.cat(views())
    cached_step(model, x, lambda z: ik.nt_xent(*z.chunk(2), 0.5), chunk)
    got = grads(model)
    ik.nt_xent(*model(x).chunk(2), 0.5).backward()
    assert rel_err(got, grads(model)) <= 1e-10


@pytest.mark.parametrize("chunk", [5, 8])
def test_learnable_temperature(chunk):
    model = mlp()
    tau = ik.LearnableTemperature(0.2).double()
    x1, x2 = views()
    loss = lambda a, b: ik.nt_xent(a, b, tau())  # noqa: E731
    torch.manual_seed(3)
    out = cached_step([model, model], [x1, x2], loss, chunk)
    got = grads(model, tau)
    torch.manual_seed(3)
    want_loss = loss(chunked_with_graph(model, x1, chunk), chunked_with_graph(model, x2, chunk))
    want_loss.backward()
    want = grads(model, tau)
    assert got[-1].abs() > 0  # the temperature gets a gradient, once
    assert rel_err(got, want) <= 1e-10
    torch.testing.assert_close(out.loss, want_loss.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk", [5, 8])
def test_two_towers_clip(chunk):
    """Image and text towers of different widths and batch inputs, CLIP's loss with a learnable scale."""
    image = mlp(seed=1)
    torch.manual_seed(2)
    text = nn.Sequential(nn.Embedding(50, 12), nn.Flatten(), nn.Linear(36, D_OUT)).double()
    tau = ik.LearnableTemperature(0.07).double()
    pixels = views()[0]
    tokens = torch.randint(0, 50, (B, 3), generator=torch.Generator().manual_seed(4))
    loss = lambda a, b: ik.clip_loss(a, b, tau.scale)  # noqa: E731
    torch.manual_seed(5)
    cached_step([image, text], [pixels, tokens], loss, chunk)
    got = grads(image, text, tau)
    torch.manual_seed(5)
    loss(chunked_with_graph(image, pixels, chunk), chunked_with_graph(text, tokens, chunk)).backward()
    assert rel_err(got, grads(image, text, tau)) <= 1e-10


def test_tuple_inputs_and_unused_encoder():
    """An encoder taking two tensors; an encoder the loss ignores gets no gradient (as in a full backward)."""
    torch.manual_seed(0)
    a = nn.Bilinear(D_IN, D_IN, D_OUT).double()
    unused = mlp(seed=3)
    x1, x2 = views()
    cached_step([a, unused], [(x1, x2), x1], lambda za, zu: ik.nt_xent(za[:12], za[12:], 0.5), 5)
    got = grads(a)
    ik.nt_xent(*a(x1, x2).chunk(2), 0.5).backward()
    assert rel_err(got, grads(a)) <= 1e-10
    assert all(p.grad is None for p in unused.parameters())


# ---------------------------------------------------------------------------------------------- float32, bf16


def _errors(dtype, chunk, autocast):
    """(error of the cached step, error of the plain full-batch step) against float64, both in
    ``dtype`` (or float32 under bf16 autocast)."""
    x1, x2 = views()
    ref = mlp(dropout=0.0)
    ik.nt_xent(ref(x1), ref(x2), 0.5).backward()
    want = grads(ref)
    model = mlp(dtype=dtype, dropout=0.0)
    a, b = x1.to(dtype), x2.to(dtype)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with ctx:
        cached_step([model, model], [a, b], nt_xent_pair, chunk)
    cached = grads(model)
    with ctx:
        nt_xent_pair(model(a), model(b)).backward()
    plain = grads(model)
    return rel_err([g.double() for g in cached], want), rel_err([g.double() for g in plain], want)


@pytest.mark.parametrize("chunk", [5, 8])
def test_float32_same_precision_rule(chunk):
    cached, plain = _errors(torch.float32, chunk, autocast=False)
    assert 0 < plain and cached <= 2 * plain


@pytest.mark.parametrize("chunk", [5, 8])
def test_bf16_autocast_same_precision_rule(chunk):
    cached, plain = _errors(torch.float32, chunk, autocast=True)
    assert plain > 1e-4  # the bf16 matmuls really ran
    assert cached <= 2 * plain


def test_autocast_with_dropout_matches_the_graph_step():
    model = mlp(dtype=torch.float32)
    x1, x2 = views(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(9)
        out = cached_step([model, model], [x1, x2], nt_xent_pair, 5)
        got = grads(model)
        torch.manual_seed(9)
        nt_xent_pair(chunked_with_graph(model, x1, 5), chunked_with_graph(model, x2, 5)).backward()
    assert out.embeddings[0].dtype == torch.bfloat16
    # the same bf16 embeddings in both passes; the graph step sums the chunks' weight gradients in
    # bf16 (autocast's one cached cast of each weight), the cached step in float32 (.grad): they
    # agree to a few bf16 roundings
    assert rel_err(got, grads(model)) <= 4 * 2.0 ** -8


# ---------------------------------------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize("chunk", [5, 8])
def test_batchnorm_chunk_mode(chunk):
    """Per-chunk statistics in both passes (the gradient of the chunked network), and the running
    statistics updated once per chunk, as by the chunked forward, not twice."""
    model = bn_mlp()
    x = torch.cat(views())
    cached_step(model, x, lambda z: ik.nt_xent(*z.chunk(2), 0.5), chunk)
    got, stats = grads(model), [b.clone() for b in model[1].buffers()]
    ref = bn_mlp()
    ik.nt_xent(*chunked_with_graph(ref, x, chunk).chunk(2), 0.5).backward()
    assert rel_err(got, grads(ref)) <= 1e-10
    for s, r in zip(stats, ref[1].buffers()):
        torch.testing.assert_close(s, r, rtol=1e-12, atol=1e-12)
    assert int(model[1].num_batches_tracked) == math.ceil(2 * B / chunk)
    assert model[1].track_running_stats and model.training


def test_batchnorm_chunk_mode_differs_from_full_batch_statistics():
    """What the documentation says differs: with BatchNorm in training mode the per-chunk
    statistics change the function, so the gradient is not the full-batch one."""
    model = bn_mlp()
    x = torch.cat(views())
    cached_step(model, x, lambda z: ik.nt_xent(*z.chunk(2), 0.5), 8)
    got = grads(model)
    ref = bn_mlp()
    ik.nt_xent(*ref(x).chunk(2), 0.5).backward()
    assert rel_err(got, grads(ref)) > 1e-3


@pytest.mark.parametrize("chunk", [5, 8])
def test_batchnorm_eval_mode(chunk):
    """Eval-mode BatchNorm in both passes: exactly the full-batch step of the eval-mode network;
    running statistics untouched; the modules back in training mode afterwards."""
    model = bn_mlp()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    before = [b.clone() for b in model[1].buffers()]
    x = torch.cat(views())
    cached_step(model, x, lambda z: ik.nt_xent(*z.chunk(2), 0.5), chunk, batchnorm="eval")
    got = grads(model)
    assert model[1].training
    for s, r in zip(before, model[1].buffers()):
        assert torch.equal(s, r)
    model[1].eval()
    ik.nt_xent(*model(x).chunk(2), 0.5).backward()
    assert rel_err(got, grads(model)) <= 1e-10


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input():
    model = mlp()
    x = torch.cat(views())
    loss = lambda z: ik.nt_xent(*z.chunk(2), 0.5)  # noqa: E731
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size"):
            cached_step(model, x, loss, bad)
    with pytest.raises(ValueError, match="batchnorm"):
        cached_step(model, x, loss, 4, batchnorm="sync")
    with pytest.raises(ValueError, match="inputs"):
        cached_step([model, model], x, loss, 4)
    with pytest.raises(ValueError, match="inputs"):
        cached_step(model, (x, x[:3]), loss, 4)
    with pytest.raises(TypeError, match="encoders"):
        cached_step([], [], loss, 4)
    with pytest.raises(ValueError, match="loss_fn"):
        cached_step(model, x, lambda z: z.sum(0), 4)
    with pytest.raises(ValueError, match="loss_fn"):
        cached_step(model, x, lambda z: torch.tensor(1.0), 4)
    with pytest.raises(TypeError, match=r"encoders\[0\]"):
        cached_step(lambda t: (t, t), x, loss, 4)


# ---------------------------------------------------------------------------------------------- DDP on gloo


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, chunk):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gc

    import torch.distributed as dist

    from distributed_worker import gloo_threads

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        _ddp_check(rank, world, chunk)
    finally:
        gc.collect()  # the DDP module (its reducer holds the group) is gone before the group
        dist.destroy_process_group()
    assert not gloo_threads(), f"process group outlived destroy_process_group: {gloo_threads()}"


def _ddp_check(rank, world, chunk):
    """On each rank: its rows through a DDP-wrapped model in chunks; the averaged gradients (and
    the temperature's, averaged as the trainer does) equal one process's full-batch gradients."""
    import torch.distributed as dist

    model = mlp(dropout=0.0)
    tau = ik.LearnableTemperature(0.3).double()
    x1, x2 = views()  # the global batch; this rank holds its rows
    rows = slice(rank * B // world, (rank + 1) * B // world)
    ddp = nn.parallel.DistributedDataParallel(model)
    reductions = []

    def counting_allreduce(state, bucket):
        reductions.append(bucket.index())
        fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, counting_allreduce)
    loss = lambda a, b: ik.nt_xent(a, b, tau(), gather_distributed=True)  # noqa: E731
    out = cached_step([ddp, ddp], [x1[rows], x2[rows]], loss, chunk)
    # no synchronisation until the last chunk: each bucket reduced once in the whole step
    assert len(reductions) == len(set(reductions)) >= 1, reductions
    got = [p.grad.clone() for p in model.parameters()]
    tau_grad = tau.log_scale.grad.clone()
    dist.all_reduce(tau_grad)  # the temperature is outside DDP: average it as the trainer does
    tau_grad /= world
    mean_loss = out.loss.clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    # one process, one full-batch backward
    ref, ref_tau = mlp(dropout=0.0), ik.LearnableTemperature(0.3).double()
    want_loss = ik.nt_xent(ref(x1), ref(x2), ref_tau())
    want_loss.backward()
    want = [p.grad for p in ref.parameters()] + [ref_tau.log_scale.grad]
    assert rel_err(got + [tau_grad], want) <= 1e-10
    torch.testing.assert_close(mean_loss, want_loss.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk", [5])
def test_ddp_two_processes_gloo(chunk):
    mp.spawn(_ddp_worker, args=(2, _free_port(), chunk), nprocs=2, join=True)


# ---------------------------------------------------------------------------------------------- trainer


def _tiny(tmp_path, name, **kw):
    from infonce_kernels.train import TrainConfig

    base = dict(dataset="digits", subset=64, batch_size=32, epochs=1, width=8, hidden_dim=16, proj_dim=16,
                eval_every=0, knn_k=5, few_shot=0, probe=False, progress=False, plot=False, device="cpu",
                output_dir=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def test_trainer_grad_cache_chunk(tmp_path):
    pytest.importorskip("kornia")
    pytest.importorskip("sklearn")
    from infonce_kernels.train import cli, train

    lines = []
    train(_tiny(tmp_path, "cached", grad_cache_chunk=12), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    text = "\n".join(lines)
    assert "batch 32 (gradient caching: 3 chunks of <= 12 images, both views each)" in text
    cached = torch.load(tmp_path / "cached" / "last.pt", map_location="cpu", weights_only=False)
    assert cached["global_step"] == 2 and cached["config"]["grad_cache_chunk"] == 12
    assert all(math.isfinite(r["loss"]) for r in cached["history"]["steps"])
    # one chunk holding the whole batch: the plain step up to float32 rounding (same BN statistics)
    train(_tiny(tmp_path, "one_chunk", grad_cache_chunk=32), log=lambda *a, **k: None)
    train(_tiny(tmp_path, "plain"), log=lambda *a, **k: None)
    one = torch.load(tmp_path / "one_chunk" / "last.pt", map_location="cpu", weights_only=False)
    plain = torch.load(tmp_path / "plain" / "last.pt", map_location="cpu", weights_only=False)
    for k, v in plain["model"].items():
        torch.testing.assert_close(one["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for r, s in zip(one["history"]["steps"], plain["history"]["steps"]):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-4)
    with pytest.raises(SystemExit):
        cli.main(["--grad-cache-chunk", "0"])
