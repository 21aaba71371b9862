"""``python -m benchmarks.kernel_report``: compile the kernels, write kernel_report_<tag>.{json,md}."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPES = ["bf16", "fp16", "fp32", "fp32-tf32", "fp64"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report", description=__doc__)
    p.add_argument("--output", required=True, help="folder for kernel_report_<tag>.json and .md")
    p.add_argument("--tag", default="sm90", help="file name tag (default sm90)")
    p.add_argument("--label", default="before", help="what the report describes, e.g. 'before' / 'after'")
    p.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES, help="sm_90 dtypes")
    p.add_argument("--ds", nargs="+", type=int, default=[64, 128, 256, 512], help="sm_90 feature dimensions")
    p.add_argument("--sm80-dtypes", nargs="*", default=["bf16", "fp32"], choices=DTYPES)
    p.add_argument("--sm80-ds", nargs="*", type=int, default=[128, 512])
    p.add_argument("--labels", choices=["off", "on", "both"], default="both")
    p.add_argument("--scenarios", nargs="+", default=["nt_xent", "general", "clip"])
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels")
    p.add_argument("--cuda-caps", nargs="+", type=int, default=[90, 80], help="CUDA architectures")
    p.add_argument("--small", action="store_true",
                   help="the CI subset: sm_90, bf16, d = 128, labels off, nt_xent + general, no sm_80, no CUDA")
    p.add_argument("--jobs", type=int, default=1, help="processes compiling in parallel")
    p.add_argument("--before", default=None, metavar="REV",
                   help="git revision whose committed benchmarks/results/kernel_report_<tag>.json the report "
                        "compares against (a before/after table of the sm_90 bf16 and fp32 kernels and headline)")
    p.add_argument("--sass-dir", default=None, help="also keep each Triton kernel's SASS here")
    p.add_argument("--update", action="store_true",
                   help="merge into the kernel_report_<tag>.json already in --output: the Triton records of the "
                        "regenerated (target, dtype, d, label rule) groups replace the old ones, every other record "
                        "stays (and, with --no-cuda, the CUDA part); the report lists what was regenerated")
    p.add_argument("--cuda-only", action="store_true",
                   help="recompile only the CUDA kernels into the kernel_report_<tag>.json already in --output: its "
                        "Triton part (records, headline, before/after table, update history) stays as it is; the "
                        "report records the CUDA part's own commit, command and --label")
    p.add_argument("--cuda-before", default=None, metavar="JSON",
                   help="with --cuda-only: a kernel report JSON whose CUDA headline passes the new ones are compared "
                        "with (a before/after table of the CUDA part)")
    a = p.parse_args(argv)
    if a.cuda_before and not a.cuda_only:
        p.error("--cuda-before needs --cuda-only")
    if a.small:
        a.dtypes, a.ds, a.sm80_dtypes, a.sm80_ds, a.labels, a.no_cuda = ["bf16"], [128], [], [], "off", True
        a.scenarios = ["nt_xent", "general"]
    return a


def _group(job):
    cap, dt, ds, labels, scenarios, sass_dir = job
    from .triton_report import collect  # noqa: PLC0415
    t0 = time.time()
    recs = collect([cap], [dt], ds, labels=labels, scenarios=scenarios, sass_dir=sass_dir)
    print(f"[kernel_report] sm_{cap} {dt}: {len(recs)} variants in {time.time() - t0:.0f} s", file=sys.stderr,
          flush=True)
    return recs


def main(argv=None) -> int:
    a = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off"):
        print("kernel_report: unset TRITON_INTERPRET (the report compiles the kernels)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # what gpu_check and the GPU run use
    os.environ.pop("INFONCE_TRITON_AUTOTUNE", None)           # the default configurations
    from . import cuda_kernels, report  # noqa: PLC0415
    if a.cuda_only:
        return cuda_only(a, argv)
    labels = {"off": (False,), "on": (True,), "both": (False, True)}[a.labels]
    jobs = [(90, dt, a.ds, labels, a.scenarios, a.sass_dir) for dt in a.dtypes]
    jobs += [(80, dt, a.sm80_ds, labels, a.scenarios, a.sass_dir) for dt in a.sm80_dtypes]
    if a.jobs > 1:
        with multiprocessing.get_context("fork").Pool(a.jobs) as pool:
            groups = pool.map(_group, jobs, chunksize=1)
    else:
        groups = [_group(j) for j in jobs]
    triton_records = [r for g in groups for r in g]
    command = "python -m benchmarks.kernel_report " + " ".join(shlex.quote(x) for x in _public_args(argv, a.output))
    base = os.path.join(a.output, f"kernel_report_{a.tag}")
    os.makedirs(a.output, exist_ok=True)

    cuda, nvcc_ver, updated = {}, None, None
    if a.update:
        triton_records, cuda, nvcc_ver, updated = merge_into(base + ".json", triton_records, jobs, a.no_cuda)
    if not a.no_cuda:
        # the Triton part first, so that a failure in the CUDA part leaves it on disk
        write(base, report.document(a.label, ROOT, triton_records, {"pending": "CUDA part running"}, None, command))
        cuda, nvcc_ver = compile_cuda(a.cuda_caps)

    doc = report.document(a.label, ROOT, triton_records, cuda, nvcc_ver, command)
    if updated:
        doc["updated"] = updated
    if a.before:
        doc["before"] = report.comparison(report.committed_report(ROOT, a.before, a.tag), doc)
    write(base, doc)
    print(f"[kernel_report] wrote {base}.json and {base}.md", file=sys.stderr)
    return 0


def compile_cuda(caps: list[int]):
    """({cap: records of cuda_kernels.compile_arch, or {"error": ...}}, nvcc version or None)."""
    import tempfile  # noqa: PLC0415

    from . import cuda_kernels  # noqa: PLC0415
    nvcc = cuda_kernels.nvcc_path()
    if nvcc is None:
        return {"error": "nvcc not found"}, None
    cuda = {}
    for cap in caps:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                cuda[str(cap)] = cuda_kernels.compile_arch(ROOT, cap, tmp, nvcc)
            except Exception as e:  # noqa: BLE001  (recorded in the report, the Triton part stays)
                cuda[str(cap)] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(f"[kernel_report] CUDA sm_{cap} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return cuda, cuda_kernels.nvcc_version(nvcc)


def cuda_only(a, argv) -> int:
    """``--cuda-only``: the report in --output with its CUDA part (kernels, CUDA headline, nvcc version)
    recompiled from this tree and everything of the Triton part kept."""
    from . import report  # noqa: PLC0415
    base = os.path.join(a.output, f"kernel_report_{a.tag}")
    with open(base + ".json") as f:
        doc = json.load(f)
    cuda, nvcc_ver = compile_cuda(a.cuda_caps)
    if nvcc_ver is None:
        print("kernel_report: --cuda-only needs nvcc", file=sys.stderr)
        return 2
    for k in ("cuda_model", "cuda_headline_modelled", "cuda_before"):
        doc.pop(k, None)
    doc["cuda"] = cuda
    doc["versions"]["nvcc"] = nvcc_ver
    doc.update(report.cuda_headline(cuda, doc.get("headline_modelled") or {}))
    command = "python -m benchmarks.kernel_report " + " ".join(shlex.quote(x) for x in _public_args(argv, a.output))
    doc["cuda_updated"] = dict(commit=report.git_commit(ROOT), command=command, label=a.label)
    if a.cuda_before:
        with open(a.cuda_before) as f:
            before = json.load(f)
        doc["cuda_before"] = report.cuda_comparison(before, doc, _shown(a.cuda_before))
    write(base, doc)
    print(f"[kernel_report] wrote the CUDA part of {base}.json and {base}.md", file=sys.stderr)
    return 0


def _shown(path: str) -> str:
    """A path as the report records it: relative to the repository, or its file name."""
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return rel if not rel.startswith("..") else os.path.basename(path)


def merge_into(path: str, records: list[dict], jobs: list[tuple], keep_cuda: bool):
    """(records, cuda, nvcc version, what was updated) for ``--update``: the report at ``path``
    with its Triton records of the groups ``jobs`` compiled, (target, dtype, d, label rule),
    replaced by ``records``; its CUDA part and nvcc version when ``keep_cuda``."""
    with open(path) as f:
        old = json.load(f)
    groups = {(cap, dt, d, lab) for cap, dt, ds, labels, _, _ in jobs for d in ds for lab in labels}
    kept = [r for r in old["triton"] if (r["cap"], r["dtype"], r["d"], r["labels"]) not in groups]
    # an update of an updated report: the groups of both count as regenerated, against the first base
    prior = old.get("updated") or {}
    steps = prior.get("steps", []) + ([dict(commit=old.get("commit"), command=old.get("command"))] if prior else [])
    every = groups | {tuple(g) for g in prior.get("groups", [])}
    updated = dict(base_commit=prior.get("base_commit", old.get("commit")),
                   base_command=prior.get("base_command", old.get("command")), earlier_updates=steps,
                   regenerated=sorted(f"sm_{cap} {dt} d={d} labels {'on' if lab else 'off'}"
                                      for cap, dt, d, lab in every),
                   groups=sorted([cap, dt, d, lab] for cap, dt, d, lab in every),
                   kept_triton_records=sum((r["cap"], r["dtype"], r["d"], r["labels"]) not in every for r in kept))
    cuda = old.get("cuda", {}) if keep_cuda else {}
    nvcc = old.get("versions", {}).get("nvcc") if keep_cuda else None
    return kept + records, cuda, nvcc, updated


def _public_args(argv, output: str) -> list[str]:
    """The command line as recorded: an output folder outside the repository reads as DIR."""
    args = list(argv if argv is not None else sys.argv[1:])
    rel = os.path.relpath(os.path.abspath(output), ROOT)
    shown = rel if not rel.startswith("..") else "DIR"
    return [shown if x == output else x for x in args]


def write(base: str, doc: dict) -> None:
    from . import report  # noqa: PLC0415
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(report.markdown(doc))


if __name__ == "__main__":
    sys.exit(main())
