"""Assemble the kernel report (JSON document) and render its markdown tables."""
from __future__ import annotations

import json
import platform
import subprocess

from . import model

METHOD = {
    "triton_specialisation": (
        "the backend's public functions are called with meta tensors (contiguous, data_ptr 0: 16-byte aligned) "
        "and the capability pinned to the target; every kernel[grid](...) launch is recorded and specialised by "
        "Triton's own binder (pointers and ints divisible by 16 get tt.divisibility=16), then triton.compile for "
        "GPUTarget('cuda', cap, 32) with the launch's constexprs, num_warps and num_stages; rows = keys = 4096"),
    "registers_spills": "ptxas -v log of the compile that produced the cubin (Triton: its own ptxas call)",
    "smem": "Triton: CompiledKernel.metadata.shared (dynamic, bytes); CUDA: ptxas static smem, and for the "
            "tensor-core kernels the dynamic smem their launchers set (tile_sizes.cuh's formula on its constants)",
    "tensor_core": "from SASS: wgmma = HGMMA present, mma.sync = HMMA/DMMA present, none = FMA only",
    "per_element": (
        "main loop = outermost backward-branch loop holding MUFU.EX2 (the key-block loop; fp64: the longest outermost loop); its body is counted "
        "statically per thread (every instruction once, predicated-off ones too; inner loops x their trip count: "
        "Triton ceil(d / BLOCK_D), CUDA 1); per unique element = count x threads per program / (BLOCK_M x BLOCK_N) "
        "x programs per tile (grid dimensions after the first: d-out chunks that recompute the same tile; 1 for the "
        "one-pass pair forward, whose second axis splits the keys). interior instr/elem: the same count without the "
        "per-tile mask paths (code a predicated forward branch in the main loop skips, with integer compares and no "
        "exponential, product, global store or branch): a tile no exclusion rule touches. "
        "mma_flops: tensor FLOPs from the HGMMA/HMMA shapes (HGMMA once per warpgroup). Ideal per element: "
        "forward 2d FLOPs and 1 exp; symmetric backward 4d FLOPs and 2 exps; CUDA figures of the general kernels "
        "count both sides of the vector/scalar load branches, so they overstate the instructions of the vector "
        "path (the resident kernels, launched for rule-free d <= 128 aligned inputs, hold only the vector path); "
        "CUDA interior instr/elem: without the masked-tile code (cuda_kernels.masked_tile_code)"),
}


def git_commit(root: str) -> str | None:
    r = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "infonce_kernels", "csrc"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


def versions(nvcc_version: str | None) -> dict:
    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415
    return dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
                nvcc=nvcc_version,
                note="the GPU image runs triton 3.6: its compiled code may differ from this triton's "
                     "(e.g. registers); re-run this report there to compare")


def document(label: str, root: str, triton_records: list[dict], cuda: dict, nvcc_version: str | None,
             command: str) -> dict:
    from . import clip  # noqa: PLC0415
    headline = model.headline(triton_records, 90, clip.headline_extras(90)) if triton_records else {}
    return dict(schema=1, label=label, command=command, commit=git_commit(root), versions=versions(nvcc_version),
                method=METHOD, model=model.MODEL_TEXT, headline_modelled=headline,
                triton=triton_records, cuda=cuda, **cuda_headline(cuda, headline))


def cuda_headline(cuda: dict, triton_headline: dict) -> dict:
    """The CUDA backend's modelled headline cases (sm_90 kernels) and its model, or nothing."""
    ks = cuda.get("90")
    if not isinstance(ks, dict) or "error" in ks:
        return {}
    return dict(cuda_model=model.CUDA_MODEL_TEXT, cuda_headline_modelled=model.cuda_headline(ks, triton_headline))


def committed_report(root: str, rev: str, tag: str) -> dict:
    """The kernel report committed at git revision ``rev`` (its JSON document)."""
    path = f"benchmarks/results/kernel_report_{tag}.json"
    r = subprocess.run(["git", "-C", root, "show", f"{rev}:{path}"], capture_output=True, text=True)
    if r.returncode != 0:
        raise ValueError(f"--before {rev}: no {path} at that revision: {r.stderr.strip()}")
    return json.loads(r.stdout)


#: what the before/after table compares: the default configurations of these sm_90 dtypes
COMPARED_DTYPES = ("bf16", "fp32")


def _variant(r: dict) -> tuple:
    """A kernel variant's identity across reports: target, dtype, d, label rule, kernel, E, KE."""
    c = r["config"]
    return (r["cap"], r["dtype"], r["d"], r["labels"], r["kernel"], c.get("E"), c.get("KE"))


def comparison(before: dict, after: dict) -> dict:
    """Before/after figures of the sm_90 bf16 and fp32 variants present in both reports, and
    the headline cases' modelled times."""
    old = {_variant(r): r for r in before["triton"]}
    fresh = after.get("updated", {}).get("groups")       # --update: only the regenerated groups
    fresh = None if fresh is None else {tuple(g) for g in fresh}
    rows = []
    for r in sorted(after["triton"], key=lambda r: (r["dtype"], r["d"], r["labels"], r["kernel"],
                                                     r["config"].get("E", 0))):
        b = old.get(_variant(r))
        if r["cap"] != 90 or r["dtype"] not in COMPARED_DTYPES or b is None:
            continue
        if fresh is not None and (r["cap"], r["dtype"], r["d"], r["labels"]) not in fresh:
            continue
        rows.append(dict(kernel=r["kernel"], dtype=r["dtype"], d=r["d"], labels=r["labels"],
                         E=r["config"].get("E"), **{f"{k}_{side}": x for side, x in (("before", b), ("after", r))
                                                    for k, x in _figures(x).items()}))
    heads = {name: dict(before=before.get("headline_modelled", {}).get(name, {}).get("modelled_ms"),
                        after=h["modelled_ms"], floor=h["floor_ms"])
             for name, h in after.get("headline_modelled", {}).items()}
    return dict(commit=before.get("commit"), label=before.get("label"), headline=heads, rows=rows)


def _figures(r: dict) -> dict:
    pe = r.get("per_element") or {}
    return dict(tile=_cfg(r), programs=r["programs_per_tile"], regs=r["regs"],
                spills=f"{r['spill_stores']}/{r['spill_loads']}", tensor=r["tensor_core"],
                mufu=pe.get("mufu"), instr=pe.get("instr"), interior=pe.get("instr_interior", pe.get("instr")),
                flops=pe.get("mma_flops"))


def _comparison_md(cmp: dict) -> list[str]:
    lines = ["", f"## Before / after (sm_90, default configurations of {' and '.join(COMPARED_DTYPES)})", "",
             f"Before: the report committed at {cmp['commit']} ({cmp['label']}).", "",
             "| headline case | before modelled ms | after modelled ms | floor ms |", "|---|---|---|---|"]
    lines += [f"| {n} | {h['before']} | {h['after']} | {h['floor']} |" for n, h in cmp["headline"].items()]
    lines += ["", "| kernel | dtype | d | labels | E | tile before -> after | programs/tile | regs | spills st/ld B | "
                  "tensor core | MUFU/elem | instr/elem | interior instr/elem | MMA FLOP/elem |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pair(r, k):
        return f"{r[k + '_before']} -> {r[k + '_after']}"

    for r in cmp["rows"]:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['d']} | {'on' if r['labels'] else 'off'} | {r['E']} | "
                     f"{pair(r, 'tile')} | {pair(r, 'programs')} | {pair(r, 'regs')} | {pair(r, 'spills')} | "
                     f"{pair(r, 'tensor')} | {pair(r, 'mufu')} | {pair(r, 'instr')} | {pair(r, 'interior')} | "
                     f"{pair(r, 'flops')} |")
    return lines


def _cfg(r: dict) -> str:
    c = r["config"]
    return f"{c.get('BLOCK_M')}x{c.get('BLOCK_N')}x{c.get('BLOCK_D')}/{r['num_warps']}w{r['num_stages']}s"


def _pe(r: dict, k: str):
    pe = r.get("per_element") or {}
    v = pe.get(k)
    return "-" if v is None else f"{v:g}"


def markdown(doc: dict) -> str:
    v = doc["versions"]
    lines = [f"# Kernel report ({doc['label']}), commit {doc['commit']}", "",
             f"triton {v['triton']}, torch {v['torch']}, nvcc: {v['nvcc']}. Compiled on CPU, no GPU: every "
             "figure is a compiled fact (registers, spills, shared memory, instruction counts) or **modelled**.",
             f"Command: `{doc['command']}`.", ""]
    if doc.get("updated"):
        u = doc["updated"]
        cuda_too = "" if doc.get("cuda_updated") else " and the CUDA part"
        lines += [f"Updated in place (`--update`): regenerated {'; '.join(u['regenerated'])}. The other "
                  f"{u['kept_triton_records']} Triton records{cuda_too} are those of commit "
                  f"{u['base_commit']} (`{u['base_command']}`): they describe the kernels as they were then."]
        lines += [f"Earlier update at {e['commit']}: `{e['command']}`." for e in u.get("earlier_updates", [])]
        lines += [""]
    if doc.get("cuda_updated"):
        c = doc["cuda_updated"]
        lines += [f"CUDA part regenerated (`--cuda-only`, {c['label']}) at commit {c['commit']}: `{c['command']}`; "
                  "the Triton part is unchanged.", ""]
    lines += ["Method:", ""]
    lines += [f"- {k}: {t}" for k, t in doc["method"].items()]
    if doc["headline_modelled"]:
        lines += ["", "## Headline cases, sm_90, bf16 (modelled, not measured)", "", f"Model: {doc['model']}.", "",
                  "| case | pass | kernel | launches | issue ms | tensor ms | overlap ms | MUFU ms | modelled ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, h in doc["headline_modelled"].items():
            for p in h["passes"]:
                lines.append(f"| {name} | {p['name']} | {p['kernel']} | {p['launches']} | {p['issue_ms']:.2f} | "
                             f"{p['mma_ms']:.2f} | {p.get('overlap_ms', 0.0):.2f} | {p['mufu_ms']:.2f} | "
                             f"{p['ms']:.2f} |")
            lines.append(f"| **{name}** | total | | | | | | | **{h['modelled_ms']} ms** (floor {h['floor_ms']} ms) |")
        for name, h in doc["headline_modelled"].items():
            lines += _g_block_md(name, h.get("g_block_path"))
    if doc.get("before"):
        lines += _comparison_md(doc["before"])
    for cap in sorted({r["cap"] for r in doc["triton"]}, reverse=True):
        lines += ["", f"## Triton kernels, sm_{cap}", "",
                  "| kernel | dtype | d | labels | E | scenarios | tile BMxBNxBD/warps,stages | programs/tile | regs | "
                  "spills st/ld B | smem B | tensor core | MUFU/elem | instr/elem | interior instr/elem | "
                  "MMA FLOP/elem |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = sorted((r for r in doc["triton"] if r["cap"] == cap),
                      key=lambda r: (r["dtype"], r["d"], r["labels"], r["kernel"], r["config"].get("E", 0)))
        for r in rows:
            lines.append(
                f"| {r['kernel']} | {r['dtype']} | {r['d']} | {'on' if r['labels'] else 'off'} | "
                f"{r['config'].get('E', '-')} | {', '.join(r['scenarios'])} | {_cfg(r)} | {r['programs_per_tile']} | "
                f"{r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['smem']} | {r['tensor_core']} | "
                f"{_pe(r, 'mufu')} | {_pe(r, 'instr')} | {_pe(r, 'instr_interior')} | {_pe(r, 'mma_flops')} |")
    lines += cuda_markdown(doc)
    return "\n".join(lines) + "\n"


def _g_block_md(name: str, g: dict | None) -> list[str]:
    """What a headline case's G-block backward adds: plan, HBM bytes, GEMMs, extra memory."""
    if not g:
        return []
    m, gm, p = g["memory"], g["gemms"], g["plan"]
    mib = 1 << 20
    return ["", f"{name}, backward by G blocks + GEMMs (`_pair_gemm`): R = {p['band']} rows x C = {p['groups']} "
            f"groups of {p['cols']} columns. G blocks: {g['g_block_hbm_bytes'] / 1e9:.2f} GB written once (the G "
            f"kernel's time is at least that at {g['hbm_rate'] / 1e12:.2f} TB/s). GEMMs (cuBLAS, **not compiled "
            f"here**): {gm['calls']} calls, {gm['flops'] / 1e12:.2f} TFLOP, {gm['hbm_bytes'] / 1e9:.2f} GB, modelled "
            f"per call as max(FLOPs / tensor rate, bytes / HBM rate). Elementwise passes over the fp32 products: "
            f"{g['elementwise_bytes'] / 1e9:.2f} GB. Extra memory (meta-tensor allocations): outputs "
            f"{m['outputs_bytes'] / mib:.1f} MiB, scratch {m['scratch_bytes'] / mib:.2f} MiB = "
            f"{m['scratch_ratio']}x the {m['embeddings_bytes'] / mib:.0f} MiB of embeddings."]


def _pe_at(r: dict, d: int, k: str):
    v = ((r.get("per_element_at") or {}).get(str(d)) or {}).get(k)
    return "-" if v is None else f"{v:g}"


def cuda_comparison(before: dict, after: dict, source: str) -> dict:
    """The CUDA headline passes of ``before`` and ``after`` (kernel report documents) side by side,
    paired by case and pass name: kernel, registers, spills and per-element counts at the case's d
    (sm_90), modelled ms; and each case's modelled total."""
    def rec(doc, kernel):
        return ((doc.get("cuda") or {}).get("90") or {}).get(kernel) or {}

    out = {}
    for case, h in (after.get("cuda_headline_modelled") or {}).items():
        bh = (before.get("cuda_headline_modelled") or {}).get(case) or {}
        old = {p["name"]: p for p in bh.get("passes", [])}
        d = str(model.HEADLINE[case]["d"])
        rows = []
        for p in h.get("passes", []):
            b = old.get(p["name"], {})
            row = dict(name=p["name"])
            for side, pp, doc in (("before", b, before), ("after", p, after)):
                k = pp.get("kernel")
                r = rec(doc, k) if k else {}
                pe = (r.get("per_element_at") or {}).get(d) or {}
                row[side] = dict(kernel=k, regs=r.get("regs"), spills=[r.get("spill_stores"), r.get("spill_loads")],
                                 instr=pe.get("instr"), instr_interior=pe.get("instr_interior"), ms=pp.get("ms"))
            rows.append(row)
        out[case] = dict(rows=rows, before_ms=bh.get("modelled_ms"), after_ms=h.get("modelled_ms"),
                         triton_ms=h.get("triton_modelled_ms"), ratio_after=h.get("ratio_to_triton"))
    return dict(source=source, commit=before.get("commit"), label=before.get("label"), cases=out)


def _cuda_comparison_md(cmp: dict) -> list[str]:
    def v(x):
        return "-" if x is None else f"{x:g}" if isinstance(x, (int, float)) else str(x)

    lines = ["", f"### CUDA before / after (before: `{cmp['source']}`, {cmp['label']}, commit {cmp['commit']})", "",
             "| case | pass | kernel before -> after | regs | spills st/ld B | instr/elem (masked tile) | "
             "interior instr/elem | modelled ms |", "|---|---|---|---|---|---|---|---|"]
    for case, c in cmp["cases"].items():
        for r in c["rows"]:
            b, a = r["before"], r["after"]
            lines.append(f"| {case} | {r['name']} | `{b['kernel']}` -> `{a['kernel']}` | {v(b['regs'])} -> "
                         f"{v(a['regs'])} | {'/'.join(map(v, b['spills']))} -> {'/'.join(map(v, a['spills']))} | "
                         f"{v(b['instr'])} -> {v(a['instr'])} | {v(b['instr_interior'])} -> {v(a['instr_interior'])} | "
                         f"{v(b['ms'])} -> {v(a['ms'])} |")
        lines.append(f"| **{case}** | total | | | | | | **{v(c['before_ms'])} -> {v(c['after_ms'])} ms** "
                     f"(Triton {v(c['triton_ms'])} ms: {v(c['ratio_after'])}x) |")
    return lines


def cuda_markdown(doc: dict) -> list[str]:
    """The CUDA part: the modelled headline cases with the verdict, then one table per architecture."""
    lines = []
    if doc.get("cuda_headline_modelled"):
        lines += ["", "## Headline cases on the CUDA backend, sm_90, bf16 (modelled, not measured)", "",
                  f"Model: {doc['cuda_model']}.", "",
                  "| case | pass | kernel | launches | issue ms | tensor ms | MUFU ms | smem ms | modelled ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, h in doc["cuda_headline_modelled"].items():
            for p in h["passes"]:
                lines.append(f"| {name} | {p['name']} | `{p['kernel']}` | {p['launches']} | {p['issue_ms']:.2f} | "
                             f"{p['mma_ms']:.2f} | {p['mufu_ms']:.2f} | {p['smem_ms']:.2f} | {p['ms']:.2f} |")
            if h["modelled_ms"] is None:
                lines.append(f"| **{name}** | total | | | | | | | not modelled: no "
                             f"{', '.join(f'`{k}`' for k in h['not_modelled'])} in the CUDA part (floor "
                             f"{h['floor_ms']} ms) |")
                continue
            verdict = ("not modelled" if h["within_target"] is None else
                       f"{h['ratio_to_triton']}x Triton's {h['triton_modelled_ms']} ms: "
                       f"{'within' if h['within_target'] else 'NOT within'} {h['target_ratio']}x")
            lines.append(f"| **{name}** | total | | | | | | | **{h['modelled_ms']} ms** (floor {h['floor_ms']} ms; "
                         f"{verdict}) |")
    if doc.get("cuda_before"):
        lines += _cuda_comparison_md(doc["cuda_before"])
    for cap, ks in sorted(doc["cuda"].items(), reverse=True):
        if not isinstance(ks, dict) or "error" in ks:
            lines += ["", f"## CUDA kernels, sm_{cap}", "", f"not compiled: {ks}"]
            continue
        lines += ["", f"## CUDA kernels, sm_{cap} (per element: d <= 128, one feature chunk; tensor-core kernels "
                      "also at d = 512)", "",
                  "| kernel | tile rows x keys | regs | spills st/ld B | static smem B | dynamic smem B d<=128 / 512 | "
                  "tensor core | cp.async (PTX) | ex2.approx (PTX) | MUFU/elem | instr/elem | interior instr/elem | "
                  "MMA FLOP/elem | ldmatrix B/elem | d=512: MUFU/elem | d=512: instr/elem |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in sorted(ks.items()):
            pe = r.get("per_element") or {}
            tile = "x".join(map(str, pe["tile"])) if "tile" in pe else "-"
            dyn = r.get("smem_dynamic") or {}
            dyn_s = " / ".join("-" if dyn.get(k) is None else str(dyn[k]) for k in ("128", "512")) if dyn else "-"
            lines.append(f"| `{name}` | {tile} | {r.get('regs')} | {r.get('spill_stores')}/{r.get('spill_loads')} | "
                         f"{r.get('smem_static')} | {dyn_s} | {r.get('tensor_core')} | {r.get('ptx_cp_async', '-')} | "
                         f"{r.get('ptx_ex2_approx', '-')} | {_pe(r, 'mufu')} | {_pe(r, 'instr')} | "
                         f"{_pe(r, 'instr_interior')} | {_pe(r, 'mma_flops')} | {_pe(r, 'ldsm_bytes')} | {_pe_at(r, 512, 'mufu')} | "
                         f"{_pe_at(r, 512, 'instr')} |")
    return lines
