"""Bytes each rank sends per training step under torch.distributed: this package's gathered
losses (O(N) backward traffic) against the plain gather / reduce-scatter scheme.

    python scripts/distributed_traffic.py --world 8 --rows 65536 --dim 128 --out benchmarks/results
    python scripts/distributed_traffic.py --loss retrieval --world 4 --rows 4096 --negatives 7 --dim 128 \
        --out benchmarks/results

``--loss nt_xent`` (default): NT-Xent over 2B = ``--rows`` rows. ``--loss retrieval``:
:func:`infonce_kernels.retrieval_info_nce` (query_to_doc, as sentence-transformers'
MultipleNegativesRankingLoss) over B = ``--rows`` (query, document) pairs with ``--negatives``
own hard negatives each; the plain scheme gathers the documents and negatives with a gather whose
backward reduce-scatters their gradients.

Spawns ``--world`` gloo processes on this machine, each holding rows/world of the rows, runs
one forward+backward of each scheme, and counts what every collective call is handed, by
wrapping torch.distributed's collectives. Bytes sent by one rank follow the ring algorithms:
all_gather of an s-byte input sends (W-1)·s, all_to_all of s bytes in all sends (W-1)/W·s,
reduce_scatter of s bytes sends (W-1)/W·s, all_reduce of s bytes sends 2(W-1)/W·s. Writes
JSON with every count.
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _nbytes(x):
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return x.numel() * x.element_size()


class Counter:
    """Wraps the collectives of torch.distributed and adds up ring-model bytes sent."""

    def __init__(self):
        self.calls, self.sent, self.phase = [], {}, "setup"
        world = dist.get_world_size()
        rules = {
            "all_gather": lambda args: (world - 1) * _nbytes(args[1]),
            "all_to_all": lambda args: (world - 1) / world * _nbytes(args[1]),
            "reduce_scatter": lambda args: (world - 1) / world * _nbytes(args[1]),
            "all_reduce": lambda args: 2 * (world - 1) / world * _nbytes(args[0]),
        }
        for name, rule in rules.items():
            self._wrap(name, rule)

    def _wrap(self, name, rule):
        original = getattr(dist, name)

        def counted(*args, **kwargs):
            sent = rule(args)
            self.sent[self.phase] = self.sent.get(self.phase, 0) + sent
            self.calls.append({"phase": self.phase, "op": name, "bytes_sent": sent})
            return original(*args, **kwargs)

        setattr(dist, name, counted)


def _plain_nt_xent(z1, z2, tau):
    """The plain scheme: all-gather with autograd (backward: reduce-scatter of N×d gradients)."""
    import infonce_kernels as ik
    from infonce_kernels import distributed as d

    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    where = d.rank_rows(z.shape[0], z.device)
    keys = d.gather_rows_with_grad(z, where)
    n, b = z.shape[0], z1.shape[0]
    self_index = where.offset + torch.arange(n)
    r = ik.lse(z, keys, 1.0 / tau, exclude=self_index[:, None])
    pos = (z[:b] * z[b:]).sum(1) / tau
    return d.scale_loss(r - torch.cat([pos, pos]), "mean", where)


def _plain_retrieval(q, d, n, tau):
    """The plain scheme for query_to_doc with own negatives n (b, K, d): documents and negatives
    all-gathered with autograd (backward: reduce-scatter of their N(1+K)×d gradients)."""
    import infonce_kernels as ik
    from infonce_kernels import distributed as dd

    q, d, n = (torch.nn.functional.normalize(x, dim=-1) for x in (q, d, n.reshape(-1, n.shape[-1])))
    where = dd.rank_rows(q.shape[0], q.device)
    keys = torch.cat([dd.gather_rows_with_grad(d, where),
                      dd.gather_rows_with_grad(n, dd.rank_rows(n.shape[0], n.device))])
    r = ik.lse(q, keys, 1.0 / tau)  # every document and negative of every rank; the positive among them
    return dd.scale_loss(r - (q * d).sum(1) / tau, "mean", where)


def _inputs_and_schemes(loss, rows, world, dim, negatives):
    """(a function making one step's inputs, {scheme: loss of those inputs})."""
    import infonce_kernels as ik

    if loss == "nt_xent":
        b = rows // world // 2
        return (lambda: [torch.randn(b, dim, requires_grad=True) for _ in range(2)],
                {"infonce_kernels": lambda z1, z2: ik.nt_xent(z1, z2, 0.5, gather_distributed=True),
                 "plain_gather_reduce_scatter": lambda z1, z2: _plain_nt_xent(z1, z2, 0.5)})
    b = rows // world
    return (lambda: [torch.randn(b, dim, requires_grad=True), torch.randn(b, dim, requires_grad=True),
                     torch.randn(b, negatives, dim, requires_grad=True)],
            {"infonce_kernels": lambda q, d, n: ik.retrieval_info_nce(q, d, n, temperature=0.05,
                                                                      gather_distributed=True),
             "plain_gather_reduce_scatter": lambda q, d, n: _plain_retrieval(q, d, n, 0.05)})


def worker(rank, world, init_file, loss_name, rows, dim, negatives, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)

    counter = Counter()
    torch.manual_seed(rank)
    results = {}
    inputs, schemes = _inputs_and_schemes(loss_name, rows, world, dim, negatives)
    for scheme, loss_fn in schemes.items():
        for step in ("warm-up", "measured"):  # the warm-up step loads kernels and thread pools
            tensors = inputs()
            counter.sent, counter.phase = {}, "forward"
            start = time.perf_counter()
            loss = loss_fn(*tensors)
            counter.phase = "backward"
            loss.backward()
        results[scheme] = {"bytes_sent": dict(counter.sent), "seconds": time.perf_counter() - start}
    if rank == 0:
        pathlib.Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=("nt_xent", "retrieval"), default="nt_xent")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--rows", type=int, default=65536,
                        help="all ranks together: 2B for nt_xent, B pairs for retrieval")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--negatives", type=int, default=7, help="retrieval: hard negatives per query")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rank0.json")
        mp.spawn(worker, args=(args.world, os.path.join(tmp, "rendezvous"), args.loss, args.rows, args.dim,
                               args.negatives, out_file),
                 nprocs=args.world, join=True)
        results = json.loads(pathlib.Path(out_file).read_text())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"loss": args.loss, "world": args.world, "rows": args.rows, "dim": args.dim, "dtype": "float32",
              "bytes_model": "ring algorithms, bytes sent by rank 0 per step", "machine": platform.processor() or
              platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__, "commit": commit,
              "schemes": results}
    for scheme in results.values():
        scheme["total_bytes_sent"] = sum(scheme["bytes_sent"].values())
    ours = results["infonce_kernels"]["total_bytes_sent"]
    plain = results["plain_gather_reduce_scatter"]["total_bytes_sent"]
    report["ratio_ours_to_plain"] = ours / plain
    if args.loss == "retrieval":
        report["negatives"] = args.negatives
        name = f"distributed_traffic_retrieval_w{args.world}_b{args.rows}_k{args.negatives}_d{args.dim}.json"
    else:
        name = f"distributed_traffic_w{args.world}_n{args.rows}_d{args.dim}.json"
    path = pathlib.Path(args.out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
