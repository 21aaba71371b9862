"""Retrieval InfoNCE with hard negatives (sentence-transformers' MultipleNegativesRankingLoss): B
queries, their B positive documents and K = 7 hard negatives per query, every document a
candidate of every query (B x 8B logits), cosine similarity, scale 20."""

import torch

import infonce_kernels as ik

from .base import Case, Inputs, Provider, randn

SCALE = 20.0
NEGATIVES = 7


def make_inputs(rows, dim, dtype, device, requires_grad, generator):
    return Inputs((randn(generator, (rows, dim), dtype, device, requires_grad),
                   randn(generator, (rows, dim), dtype, device, requires_grad),
                   randn(generator, (rows, NEGATIVES, dim), dtype, device, requires_grad)))


def _sentence_transformers(aux):
    """sentence-transformers' own loss on the embeddings: the (B, 8B) cosine matrix, logsumexp."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    loss = MultipleNegativesRankingLoss(None, scale=SCALE)
    return lambda q, d, n: loss.compute_loss_from_embeddings([q, d, *n.unbind(1)], None)


def _sentence_transformers_cached(aux):
    """The loss stage of sentence-transformers' CachedMultipleNegativesRankingLoss: the rows in
    mini-batches of 32 against all documents, each mini-batch's backward run at once (to the
    embeddings), so one (32, 8B) matrix lives at a time. Its returned loss is detached: the
    step's ``backward()`` is a no-op on a stand-in leaf, the gradients being already computed."""
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    loss = CachedMultipleNegativesRankingLoss(torch.nn.Sequential(torch.nn.Identity()), scale=SCALE, mini_batch_size=32)

    def step(q, d, n):
        value = loss.calculate_loss([[q], [d], *([x] for x in n.unbind(1))], with_backward=True)
        return value.requires_grad_()

    return step


CASE = Case(
    kind="retrieval",
    rows_label="B",
    settings=f"scale {SCALE:g} (tau 0.05), cosine, B queries with {NEGATIVES} hard negatives each",
    make_inputs=make_inputs,
    fused=lambda aux, backend: lambda q, d, n: ik.retrieval_info_nce(q, d, n, temperature=1 / SCALE,
                                                                      backend=backend),
    baselines=(
        Provider("sentence_transformers", _sentence_transformers, needs=("sentence_transformers",)),
        Provider("sentence_transformers_cached", _sentence_transformers_cached, needs=("sentence_transformers",),
                 max_rows=4096),
    ),
)


# ---------------------------------------------------------------- one full-size step per provider
# At B = 16,384 one step is minutes of CPU time, so this measurement runs each provider's
# forward+backward ONCE (no warm-up step, unlike the suite's worker), in a fresh process under an
# address-space cap, and records time, CPU time and the peak resident memory above the inputs:
#   python -m benchmarks.cases.retrieval --rows 16384 --dim 768 --mem-limit-gib 8 -o FILE.json
def _one(spec):
    """One provider's step in this process: {"status", "seconds", "cpu_seconds", "peak_bytes"}."""
    import time

    from .. import worker
    from . import build

    torch.set_num_threads(spec["threads"])
    worker._limit_cpu_memory(spec["mem_limit_gib"])
    try:
        inputs, fn = build("retrieval", spec["provider"], spec["rows"], spec["dim"], torch.float32,
                           torch.device("cpu"), requires_grad=True)
        _, step = worker._step_fns("forward+backward", fn, inputs)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := the current RSS
        before = worker._status_kib("VmRSS")
        wall, cpu = time.perf_counter(), time.process_time()
        step(None)
        out = {"status": "ok", "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
               "peak_bytes": max(worker._status_kib("VmHWM") - before, 0) * 1024}
    except Exception as exc:  # noqa: BLE001 - recorded, as the suite's worker does
        status = "OOM" if worker._is_oom(exc) else "ERROR"
        out = {"status": status, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    out["threads"] = torch.get_num_threads()
    return out


def _main(argv=None):
    import argparse
    import json
    import os
    import subprocess
    import sys

    from ..machine import describe

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--providers", nargs="+",
                        default=["ours:cpu", "sentence_transformers_cached", "sentence_transformers"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mem-limit-gib", type=float, default=8.0)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(_one(json.loads(args.one))), flush=True)
        return 0
    record = {"command": "python -m benchmarks.cases.retrieval " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": describe("cpu"), "case": CASE.settings, "rows": args.rows, "dim": args.dim,
              "negatives": NEGATIVES, "mode": "forward+backward, one step, no warm-up", "dtype": "float32",
              "mem_limit_gib": args.mem_limit_gib, "results": {}}
    for provider in args.providers:
        spec = {"provider": provider, "rows": args.rows, "dim": args.dim, "threads": args.threads,
                "mem_limit_gib": args.mem_limit_gib}
        load = os.getloadavg()
        try:
            done = subprocess.run([sys.executable, "-m", "benchmarks.cases.retrieval", "--output", args.output,
                                   "--one", json.dumps(spec)], capture_output=True, text=True, timeout=args.timeout)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            result = json.loads(line[-1][7:]) if line else {"status": "ERROR", "error": done.stderr[-500:]}
        except subprocess.TimeoutExpired:
            result = {"status": "TIMEOUT"}
        result["loadavg_before"], result["loadavg_after"] = load, os.getloadavg()
        record["results"][provider] = result
        print(provider, json.dumps(result), flush=True)
        with open(args.output, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
