"""Kernel report of the pairwise sigmoid (SigLIP) kernels and the modelled SigLIP headline case.

    python -m benchmarks.kernel_report.siglip --output DIR            # sm_90 + sm_80, Triton + CUDA
    python -m benchmarks.kernel_report.siglip --small --output DIR    # the CI subset: sm_90, bf16, d = 768

The Triton sweeps are recorded and compiled exactly as the lse kernels are (:mod:`.triton_kernels`:
the backend's public ``sigmoid_forward`` / ``sigmoid_backward`` called on meta tensors with the
capability pinned, every launch specialised by Triton's own binder and compiled for the target), and
read the same way (:mod:`.triton_report`: ptxas registers / spills, shared memory, wgmma or
mma.sync, MUFU and thread-instructions per unique tile element of the main loop). The CUDA kernels
are the ``sigmoid_*`` entries of :func:`.cuda_kernels.compile_arch`.

Model of the headline case (SigLIP fwd+bwd, B = 65,536 image and text rows, d = 768, bf16): the
training step calls ``sigmoid_forward(with_grad=True)`` once. Its launches are recorded at the
headline size and every Triton launch is timed by :func:`.model.launch_time` (same rates and the
same no-overlap assumption as the lse headline) over its share of the B^2 pairs: the two sweeps
(d <= 128: each covers all pairs) or the G-block kernel (d = 768: its launches cover the pairs
once, so launch variants are weighted by their launch counts). The G-block path's GEMMs
(``torch.mm`` / ``addmm``, cuBLAS) are **modelled at the tensor rate, not compiled here**: each
call max(2 m n k / tensor rate, HBM bytes / HBM_RATE), its bytes being the G block, the other
operand and the fp32 result (read and written when accumulated); the G block the kernel writes is
stated as HBM bytes too and bounds the kernel's time from below. Floor: three GEMM-sized products
(S, G y, G^T x: 6 B^2 d FLOPs) at the tensor rate, against 2 exponentials-class MUFU operations per
pair. Extra memory: the wrapper's allocations on meta tensors (:func:`extra_memory`): outputs,
scratch, peak of what is alive at once.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time

import torch

from . import model

#: the headline case of issue 17
HEADLINE = dict(name="siglip_B65536_d768_bf16", rows=65536, d=768, dtype="bf16", target_ms=35.0,
                memory_target=1.5)

#: the headline as the previous committed report modelled it (two sweeps, 6 programs per tile at d = 768)
BEFORE = dict(commit="bb66400", modelled_ms=248.49, ratio=1.0014)

#: HBM bandwidth of an H100 SXM (H200: 4.8e12): the G-block path's traffic term
HBM_RATE = 3.35e12

#: calls of one SigLIP step: phase -> the backend calls it makes (recorded on meta tensors)
PHASES = {
    "fused": "sigmoid_forward(with_grad=True): loss rows and every gradient (the training step)",
    "forward": "sigmoid_forward(with_grad=False): loss rows only",
    "backward": "sigmoid_backward(grad): gradients for a general upstream gradient",
}


def record(dtype: str, d: int, labels: bool, cap: int, rows: int = 4096, phases=tuple(PHASES)) -> list:
    """Launches of each of ``phases`` (Launch objects with .phase set), nothing runs."""
    from .triton_kernels import DTYPES, recording  # noqa: PLC0415
    tb = importlib.import_module("infonce_kernels.triton")
    dt, precision = DTYPES[dtype]
    acc = torch.float64 if dt == torch.float64 else torch.float32
    x = torch.empty(rows, d, dtype=dt, device="meta")
    y = torch.empty(rows, d, dtype=dt, device="meta")
    t, b = torch.empty((), dtype=acc, device="meta"), torch.empty((), dtype=acc, device="meta")
    lab = (torch.empty(rows, dtype=torch.int64, device="meta"),) * 2 if labels else ()
    out = []
    for phase in phases:
        with recording(cap, precision) as rec:
            if phase == "fused":
                tb.sigmoid_forward(x, y, t, b, lab, 0, True)
            elif phase == "forward":
                tb.sigmoid_forward(x, y, t, b, lab, 0, False)
            else:
                tb.sigmoid_backward(torch.empty(rows, dtype=acc, device="meta"), x, y, t, b, lab, 0)
        for launch in rec:
            launch.phase = phase
        out += rec
    return out


def collect(caps, dtypes, ds, labels=(False, True), phases=tuple(PHASES), rows: int = 4096) -> list[dict]:
    """One record per distinct compiled sigmoid variant, with the phases that launch it."""
    from .triton_kernels import launch_key  # noqa: PLC0415
    from .triton_report import kernel_record  # noqa: PLC0415
    out: dict[tuple, dict] = {}
    for cap in caps:
        for dt in dtypes:
            for d in ds:
                for lab in labels:
                    for launch in record(dt, d, lab, cap, rows=rows, phases=phases):
                        key = (cap, dt, d) + launch_key(launch, cap)
                        if key not in out:
                            out[key] = kernel_record(launch, cap, d)
                            cx = out[key]["config"]
                            row = _constexpr(launch, "ROW_SWEEP")
                            out[key].update(dtype=dt, labels=lab, uses={}, rows=rows,
                                            sweep="G block" if row is None else "row" if row else "column",
                                            loss=bool(_constexpr(launch, "WITH_LOSS")),
                                            grad=row is None or bool(_constexpr(launch, "WITH_GRAD")))
                            cx.pop("HAS_LABELS", None)
                        use = f"{launch.phase}/{'labels' if lab else 'nolabels'}"
                        out[key]["uses"][use] = out[key]["uses"].get(use, 0) + 1
    return list(out.values())


def _constexpr(launch, name):
    from .triton_kernels import constexpr_values  # noqa: PLC0415
    return constexpr_values(launch).get(name)


def _recorded_call(rows: int, d: int, dtype: str, cap: int):
    """Run the fused call on meta tensors at ``rows`` x ``d`` with launches recorded, the wrapper's
    allocations tracked and the G-block path's GEMMs logged -> (outputs, launches, gemms, memory)."""
    from .triton_kernels import DTYPES, recording  # noqa: PLC0415
    tb = importlib.import_module("infonce_kernels.triton")
    gm = importlib.import_module("infonce_kernels.triton._sigmoid_gemm")
    dt, precision = DTYPES[dtype]
    acc = torch.float64 if dt == torch.float64 else torch.float32
    x = torch.empty(rows, d, dtype=dt, device="meta")
    t = torch.empty((), dtype=acc, device="meta")

    with gemm_log(gm) as gemms, recording(cap, precision) as rec, allocations((x, t)) as alloc:
        outs = tb.sigmoid_forward(x, x, t, t, (), 0, True)
    out_bytes = sum(o.numel() * o.element_size() for o in outs)
    emb = 2 * rows * d * torch.empty((), dtype=dt).element_size()
    scratch = alloc.peak - out_bytes
    mem = dict(outputs_bytes=out_bytes, scratch_bytes=scratch, extra_bytes=alloc.peak, embeddings_bytes=emb,
               ratio=round(alloc.peak / emb, 4))
    return outs, rec, gemms, mem


@contextlib.contextmanager
def gemm_log(module):
    """The GEMM calls ``module._mm_into(out, a, b, accumulate)`` makes inside, logged (m, n, k,
    accumulate, operand and result bytes per element) into the list it yields."""
    gemms, orig = [], module._mm_into

    def logged(out, a, b, accumulate):
        gemms.append(dict(m=a.shape[0], n=b.shape[1], k=a.shape[1], accumulate=accumulate,
                          in_bytes=a.element_size(), out_bytes=out.element_size()))
        return orig(out, a, b, accumulate)

    module._mm_into = logged
    try:
        yield gemms
    finally:
        module._mm_into = orig


def allocations(inputs):
    """A dispatch mode that tracks the bytes of the storages created inside it that are alive
    (``peak``: their largest sum), ``inputs``' storages excluded; and (``elementwise_bytes``) the
    bytes read and written by every op that is neither a view, an allocation nor a GEMM: the
    wrapper's elementwise passes over its buffers."""
    from torch.multiprocessing.reductions import StorageWeakRef  # noqa: PLC0415
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415
    skip = {"mm", "addmm", "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "zero_", "full", "fill_",
            "ones_like", "scalar_tensor", "lift_fresh"}

    class Alloc(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.peak, self.elementwise_bytes = {}, 0, 0
            self.inputs = {a.untyped_storage()._cdata for a in inputs}      # not the call's allocations

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if not func.is_view and func._schema.name.split("::")[-1] not in skip:
                seen = {}
                for a in list(args) + list((kwargs or {}).values()) + list(outs):
                    if isinstance(a, torch.Tensor) and a.dim() > 0:
                        seen[id(a)] = a.numel() * a.element_size()
                self.elementwise_bytes += sum(seen.values())
            for o in outs:
                if isinstance(o, torch.Tensor):
                    st = o.untyped_storage()
                    key = st._cdata
                    if key not in self.live and key not in self.inputs:
                        self.live[key] = (StorageWeakRef(st), st.nbytes())
            self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
            return out

    return Alloc()


def extra_memory(rows: int, d: int, dtype: str, cap: int = 90) -> dict:
    """Peak bytes the fused call allocates beyond its inputs (outputs and scratch alive at once),
    from the wrapper's own allocations on meta tensors (every storage an op creates, freed when
    its last reference goes)."""
    return _recorded_call(rows, d, dtype, cap)[3]


def gemm_time(gemms: list[dict]) -> dict:
    """Modelled ms of the G-block path's GEMM calls: per call max(2 m n k / TENSOR_RATE, bytes /
    HBM_RATE), bytes = A + B + the result (twice when accumulated). Not compiled here (cuBLAS)."""
    flops = mem = ms = 0.0
    for g in gemms:
        f = 2.0 * g["m"] * g["n"] * g["k"]
        b = (g["m"] * g["k"] + g["k"] * g["n"]) * g["in_bytes"] + g["m"] * g["n"] * g["out_bytes"] * (
            2 if g["accumulate"] else 1)
        flops, mem = flops + f, mem + b
        ms += max(f / model.TENSOR_RATE, b / HBM_RATE) * 1e3
    return dict(calls=len(gemms), flops=flops, hbm_bytes=mem, tensor_ms=flops / model.TENSOR_RATE * 1e3,
                hbm_ms=mem / HBM_RATE * 1e3, ms=ms)


def headline(records: list[dict], cap: int = 90, memory: dict | None = None, gemms: list | None = None) -> dict:
    """Modelled time of the SigLIP training step (the fused phase) from the compiled counts, and its
    extra memory. ``memory`` / ``gemms``: :func:`extra_memory` and the GEMM calls of the headline
    case (recorded here if None)."""
    h = HEADLINE
    e = float(h["rows"]) ** 2
    if memory is None or gemms is None:
        _, _, g_rec, m_rec = _recorded_call(h["rows"], h["d"], h["dtype"], cap)
        memory = m_rec if memory is None else memory
        gemms = g_rec if gemms is None else gemms
    passes, total, missing = [], 0.0, []
    mine = [r for r in records if r["cap"] == cap and r["dtype"] == h["dtype"] and r["d"] == h["d"]
            and r["uses"].get("fused/nolabels")]
    g_launches = sum(r["uses"]["fused/nolabels"] for r in mine if r["sweep"] == "G block")
    el = 2 if h["dtype"] in ("bf16", "fp16") else 4
    for r in mine:
        n = r["uses"]["fused/nolabels"]
        pe = r.get("per_element") or {}
        if "instr" not in pe:
            missing.append(r["kernel"])
            continue
        share = n / g_launches if r["sweep"] == "G block" else n      # G-block launches share the pairs
        t = {k: v * share for k, v in model.launch_time(pe, e).items()}
        if r["sweep"] == "G block":                                     # its G writes: a lower bound
            t["hbm_ms"] = e * share * el / HBM_RATE * 1e3
            t["ms"] = max(t["ms"], t["hbm_ms"])
        passes.append(dict(name=f"{r['sweep']}" + ("" if r["sweep"] == "G block" else " sweep"), kernel=r["kernel"],
                           launches=n, **{k: round(v, 3) for k, v in t.items()}))
        total += t["ms"]
    gt = gemm_time(gemms)
    if gt["calls"]:
        passes.append(dict(name="GEMMs (cuBLAS: modelled at the tensor rate, not compiled here)",
                           kernel="torch.mm / torch.addmm", launches=gt["calls"], issue_ms=0.0,
                           mma_ms=round(gt["tensor_ms"], 3), mufu_ms=0.0, hbm_ms=round(gt["hbm_ms"], 3),
                           ms=round(gt["ms"], 3)))
        total += gt["ms"]
    floor = max(6 * h["d"] * e / model.TENSOR_RATE, 2 * e / model.MUFU_RATE) * 1e3
    return dict(case=h["name"], modelled_ms=round(total, 2) if passes else None, floor_ms=round(floor, 2),
                target_ms=h["target_ms"], meets_target=bool(passes) and not missing and total <= h["target_ms"],
                passes=passes, not_modelled=missing, memory=memory, gemms=gt if gt["calls"] else None, g_block_hbm_bytes=e * el if g_launches else 0,
                meets_memory_target=memory["ratio"] <= h["memory_target"], hbm_rate=HBM_RATE)


def cuda_records(cuda: dict) -> dict:
    """The sigmoid kernels of a CUDA part of the kernel report ({cap: {name: record}})."""
    return {cap: {k: v for k, v in ks.items() if k.startswith("sigmoid_")} if isinstance(ks, dict) and
            "error" not in ks else ks for cap, ks in cuda.items()}


def _pe(r: dict, k: str):
    v = (r.get("per_element") or {}).get(k)
    return "-" if v is None else f"{v:g}"


def markdown(doc: dict) -> str:
    h = doc["headline_modelled"]
    m = h["memory"]
    lines = ["# Kernel report: pairwise sigmoid (SigLIP) kernels", "",
             f"triton {doc['versions']['triton']}, nvcc: {doc['versions'].get('nvcc')}. Compiled on CPU, no GPU: "
             "every figure is a compiled fact or **modelled**.", f"Command: `{doc['command']}`.", "",
             f"## Headline: {h['case']} fwd+bwd (modelled, not measured)", "", f"Model: {doc['model']}.", "",
             "| pass | kernel | launches | issue ms | tensor ms | MUFU ms | HBM ms | modelled ms |",
             "|---|---|---|---|---|---|---|---|"]
    for p in h["passes"]:
        hbm = f"{p['hbm_ms']:.2f}" if "hbm_ms" in p else "-"
        lines.append(f"| {p['name']} | {p['kernel']} | {p['launches']} | {p['issue_ms']:.2f} | {p['mma_ms']:.2f} | "
                     f"{p['mufu_ms']:.2f} | {hbm} | {p['ms']:.2f} |")
    lines += [f"| **total** | | | | | | | **{h['modelled_ms']} ms** (floor {h['floor_ms']} ms, target "
              f"{h['target_ms']} ms: {'met' if h['meets_target'] else 'NOT met'}) |", ""]
    g = h.get("gemms")
    if g:
        lines += [f"GEMMs of the G-block path (cuBLAS, **modelled at the tensor rate, not compiled here**): {g['calls']} "
                  f"calls, {g['flops'] / 1e12:.2f} TFLOP ({g['tensor_ms']:.2f} ms at the tensor rate), "
                  f"{g['hbm_bytes'] / 1e9:.1f} GB of HBM traffic ({g['hbm_ms']:.2f} ms at {h['hbm_rate'] / 1e12:g} TB/s; "
                  "each call max(tensor, HBM)). G scratch traffic: the kernel writes "
                  f"{h['g_block_hbm_bytes'] / 1e9:.1f} GB of G blocks, which the two GEMMs read back (counted in "
                  "their bytes).", ""]
    lines += [f"Extra memory of the fused call (peak of the wrapper's allocations alive at once, on meta tensors): "
              f"{m['extra_bytes'] / 2**20:.1f} MiB = {m['ratio']}x the embeddings "
              f"({m['embeddings_bytes'] / 2**20:.1f} MiB): outputs (loss rows, dx, dy, dscale, dbias) "
              f"{m['outputs_bytes'] / 2**20:.1f} MiB, scratch {m['scratch_bytes'] / 2**20:.3f} MiB "
              f"(target <= 1.5x: {'met' if h['meets_memory_target'] else 'NOT met'}).", ""]
    before = doc.get("before")
    if before:
        lines += [f"Before (commit {before['commit']}, the two sweeps at 6 programs per tile): modelled "
                  f"{before['modelled_ms']} ms, extra memory {before['ratio']}x the embeddings. After (this "
                  f"report): modelled {h['modelled_ms']} ms, {m['ratio']}x.", ""]
    for cap in sorted({r["cap"] for r in doc["triton"]}, reverse=True):
        lines += [f"## Triton sigmoid kernels (sweeps, G block), sm_{cap}", "",
                  "| sweep | loss | grad | dtype | d | labels | phases | tile BMxBNxBD/DO, warps, stages | programs/tile "
                  "| regs | spills st/ld B | smem B | tensor core | MUFU/elem | instr/elem | MMA FLOP/elem |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in doc["triton"] if r["cap"] == cap),
                        key=lambda r: (r["dtype"], r["d"], r["labels"], r["sweep"], r["loss"], r["grad"])):
            c = r["config"]
            lines.append(
                f"| {r['sweep']} | {'y' if r['loss'] else '-'} | {'y' if r['grad'] else '-'} | {r['dtype']} | {r['d']} | "
                f"{'on' if r['labels'] else 'off'} | {', '.join(sorted(r['uses']))} | "
                f"{c.get('BLOCK_M')}x{c.get('BLOCK_N')}x{c.get('BLOCK_D')}/{c.get('BLOCK_DO') or '-'}, {r['num_warps']}w"
                f"{r['num_stages']}s | {r['programs_per_tile']} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | "
                f"{r['smem']} | {r['tensor_core']} | {_pe(r, 'mufu')} | {_pe(r, 'instr')} | {_pe(r, 'mma_flops')} |")
    for cap, ks in sorted(doc.get("cuda", {}).items(), reverse=True):
        if not isinstance(ks, dict) or "error" in ks:
            lines += ["", f"## CUDA sigmoid kernels, sm_{cap}", "", f"not compiled: {ks}"]
            continue
        lines += ["", f"## CUDA sigmoid kernels, sm_{cap} (KIND 0 loss only, 1 loss + dx, 2 dx, 3 dy; per "
                  "element: d <= 128, one feature chunk)", "",
                  "| kernel | regs | spills st/ld B | static smem B | tensor core | MUFU/elem | instr/elem | "
                  "MMA FLOP/elem |", "|---|---|---|---|---|---|---|---|"]
        for name, r in sorted(ks.items()):
            lines.append(f"| `{name}` | {r.get('regs')} | {r.get('spill_stores')}/{r.get('spill_loads')} | "
                         f"{r.get('smem_static')} | {r.get('tensor_core')} | {_pe(r, 'mufu')} | {_pe(r, 'instr')} | "
                         f"{_pe(r, 'mma_flops')} |")
    return "\n".join(lines) + "\n"


def document(triton_records: list[dict], cuda: dict, nvcc_version, command: str) -> dict:
    from .report import git_commit, versions  # noqa: PLC0415
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return dict(schema=1, command=command, commit=git_commit(root), versions=versions(nvcc_version),
                model=model.MODEL_TEXT, phases=PHASES, headline_modelled=headline(triton_records), before=BEFORE,
                triton=triton_records, cuda=cuda_records(cuda))


def sigmoid_sources_root(root: str, tmp: str) -> str:
    """A tree under ``tmp`` that mirrors csrc/ (links) but holds only the sigmoid .cu sources, so that
    :func:`.cuda_kernels.compile_arch` compiles just them."""
    import glob  # noqa: PLC0415
    mirror = os.path.join(tmp, "tree")
    for path in glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True):
        rel = os.path.relpath(path, root)
        if os.path.isdir(path) or (rel.endswith(".cu") and not os.path.basename(rel).startswith("sigmoid_")):
            continue
        os.makedirs(os.path.dirname(os.path.join(mirror, rel)), exist_ok=True)
        os.symlink(path, os.path.join(mirror, rel))
    return mirror


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report.siglip", description=__doc__)
    p.add_argument("--output", required=True)
    p.add_argument("--small", action="store_true", help="CI subset: sm_90, bf16, d = 768, labels off, no CUDA")
    p.add_argument("--no-cuda", action="store_true")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off"):
        print("kernel_report.siglip: unset TRITON_INTERPRET (the report compiles the kernels)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    t0 = time.time()
    if a.small:
        recs = collect([90], ["bf16"], [HEADLINE["d"]], labels=(False,), rows=HEADLINE["rows"])
    else:
        recs = collect([90], ["bf16"], [128]) + collect([90], ["bf16"], [768], rows=HEADLINE["rows"]) \
            + collect([90], ["fp32"], [128], (False,)) + collect([80], ["bf16"], [768], (False,), rows=HEADLINE["rows"])
    print(f"[kernel_report.siglip] {len(recs)} Triton variants in {time.time() - t0:.0f} s", file=sys.stderr)
    cuda, nvcc_ver = {}, None
    if not (a.small or a.no_cuda):
        import tempfile  # noqa: PLC0415

        from . import cuda_kernels  # noqa: PLC0415
        nvcc = cuda_kernels.nvcc_path()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if nvcc is None:
            cuda = {"error": "nvcc not found"}
        else:
            nvcc_ver = cuda_kernels.nvcc_version(nvcc)
            for cap in (90, 80):
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        cuda[str(cap)] = cuda_kernels.compile_arch(sigmoid_sources_root(root, tmp), cap, tmp, nvcc)
                    except Exception as e:  # noqa: BLE001  (recorded; the Triton part stays)
                        cuda[str(cap)] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    args = ["--small"] if a.small else []
    doc = document(recs, cuda, nvcc_ver, "python -m benchmarks.kernel_report.siglip " + " ".join(args + ["--output", "DIR"]))
    os.makedirs(a.output, exist_ok=True)
    base = os.path.join(a.output, "kernel_report_siglip_sm90")
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(markdown(doc))
    print(f"[kernel_report.siglip] wrote {base}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
