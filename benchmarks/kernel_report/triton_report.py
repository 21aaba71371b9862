"""Kernel records of the Triton backend: compile every launch the wrappers make, read the result.

One record per distinct compiled variant (kernel x specialisation x target), with the scenarios
(losses) that launch it, its tile configuration, ptxas's registers / spills, shared memory, the
tensor-core instruction, and the main-loop counts per unique tile element (see :mod:`.sass`):

    per_element.X = main-loop count per thread x threads per program / (BLOCK_M x BLOCK_N)
                    x programs per tile

``instr`` counts every instruction of the loop body (a tile that takes the masked path);
``instr_interior`` skips the per-tile mask paths (:func:`.sass.mask_regions`): an interior tile.

where *programs per tile* is the product of the launch grid's dimensions after the first (the
d-out chunks of the backward: each of those programs recomputes the same score tile; 1 for the
kernels of KEY_SPLIT_KERNELS, whose second axis splits the keys), so a
replicated tile shows as a larger number, never a smaller one.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile

from . import sass
from .triton_kernels import Scenario, compile_launch, constexpr_values, cuobjdump_path, launch_key, record_scenario

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")

#: kernels whose grid's second axis splits the keys (each program its own tiles), not d-out chunks
KEY_SPLIT_KERNELS = {"_lse_pair_fwd_kernel"}

#: scenario name -> whether it runs with the label rule as well
SCENARIOS = {"nt_xent": True, "general": True, "clip": False}


def _grid_tuple(grid):
    return tuple(grid) if isinstance(grid, (tuple, list)) else None


def _ttgir_mma(ttgir: str) -> list[int]:
    return sorted({int(v) for v in re.findall(r"nvidia_mma<\{versionMajor = (\d)", ttgir)})


def kernel_record(launch, cap: int, d: int, sass_dir: str | None = None) -> dict:
    """Compile one recorded launch for sm_``cap`` and read registers, smem, SASS counts."""
    ck, log = compile_launch(launch, cap)
    cx = constexpr_values(launch)
    regs = _REGS.search(log)
    sp = _SPILL.search(log)
    ptx, ttgir = ck.asm["ptx"], ck.asm["ttgir"]
    ins = []
    cuobjdump = cuobjdump_path()
    if cuobjdump:
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "k.cubin")
            open(p, "wb").write(ck.asm["cubin"])
            text = subprocess.run([cuobjdump, "-sass", p], capture_output=True, text=True, check=True).stdout
        if sass_dir:
            os.makedirs(sass_dir, exist_ok=True)
            open(os.path.join(sass_dir, f"sm{cap}_{launch.name}_d{d}.sass"), "w").write(text)
        funcs = sass.split_functions(text)
        ins = next(iter(funcs.values()), [])
    grid = _grid_tuple(launch.grid)
    rec = dict(
        kernel=launch.name, cap=cap, d=d,
        config={k: cx[k] for k in sorted(cx) if k.startswith("BLOCK_") or k in ("SINGLE_D", "E", "KE", "HAS_LABELS",
                                                                                 "INPUT_PRECISION")},
        num_warps=ck.metadata.num_warps, num_stages=launch.kwargs.get("num_stages"),
        programs_per_tile=(1 if launch.name in KEY_SPLIT_KERNELS else math.prod(grid[1:])) if grid else None,
        regs=int(regs.group(1)) if regs else None,
        stack=int(sp.group(1)) if sp else None,
        spill_stores=int(sp.group(2)) if sp else None,
        spill_loads=int(sp.group(3)) if sp else None,
        smem=ck.metadata.shared,
        tensor_core=sass.tensor_kind(ins) if ins else None,
        ttgir_mma_versions=_ttgir_mma(ttgir),
        ptx=dict(wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                 cp_async=ptx.count("cp.async.ca") + ptx.count("cp.async.cg"), ex2=ptx.count("ex2.approx")),
    )
    rec["per_element"] = per_element(ins, rec, cx, d) if ins else None
    return rec


def per_element(ins, rec: dict, cx: dict, d: int):
    """Main-loop counts per unique tile element (module docstring)."""
    bm, bn = cx.get("BLOCK_M"), cx.get("BLOCK_N")
    body = sass.main_loop(ins)
    if not (bm and bn) or body is None:
        return {"unavailable": "no BLOCK_M/BLOCK_N constexpr" if body is not None else "no loop"}
    trips = math.ceil(d / cx["BLOCK_D"]) if cx.get("BLOCK_D") else 1
    c = sass.count_body(ins, body, trips)
    masks = sass.mask_regions(ins, body)
    interior = sass.count_body(ins, body, trips, skip=masks)
    threads = rec["num_warps"] * 32
    rep = rec["programs_per_tile"] or 1
    scale = threads / (bm * bn) * rep
    return dict(
        instr=round(c["total"] * scale, 2),
        instr_interior=round(interior["total"] * scale, 2),
        mask_regions=[[hex(a), hex(b)] for a, b in masks],
        mufu=round(c["by_class"].get("mufu", 0) * scale, 3),
        ex2=round(c["ops"].get("MUFU.EX2", 0) * scale, 3),
        mma_flops=round(c["mma_flops_per_warp"] * rec["num_warps"] / (bm * bn) * rep, 1),
        by_class={k: round(v * scale, 2) for k, v in sorted(c["by_class"].items())},
        body_per_thread=c["total"], inner_loops=c["inner_loops"], inner_trips=c["inner_trips"],
        main_loop=c["body"], threads=threads, tile=[bm, bn],
        overlap=[dict(commit=g["commit"], retire=g["retire"],
                      mma_flops=round(g["flops_per_warp"] * rec["num_warps"] / (bm * bn) * rep, 1),
                      in_flight=round(g["in_flight"] * scale, 2))
                 for g in sass.wgmma_overlap(ins, body)],
    )


def collect(caps, dtypes, ds, labels=(False, True), scenarios=tuple(SCENARIOS), rows: int = 4096,
            sass_dir: str | None = None, progress=None) -> list[dict]:
    """Records of every distinct variant the given scenarios launch (deduplicated per target)."""
    out: dict[tuple, dict] = {}
    for cap in caps:
        for dt in dtypes:
            for d in ds:
                for lab in labels:
                    for name in scenarios:
                        if lab and not SCENARIOS[name]:
                            continue
                        sc = Scenario(name, dt, d, lab, rows=rows)
                        for launch in record_scenario(sc, cap):
                            key = (cap, dt, d) + launch_key(launch, cap)
                            if key not in out:
                                out[key] = kernel_record(launch, cap, d, sass_dir)
                                out[key].update(dtype=dt, labels=lab, scenarios=[], uses={})
                                if progress:
                                    progress(out[key])
                            rec = out[key]
                            if name not in rec["scenarios"]:
                                rec["scenarios"].append(name)
                            # launches per (scenario, phase), for this label setting
                            use = f"{name}/{launch.phase}/{'labels' if lab else 'nolabels'}"
                            rec["uses"][use] = rec["uses"].get(use, 0) + 1
    return list(out.values())
