"""Modelled GPU time of the headline cases from the compiled kernels' counts (not a measurement).

Model (H100/H200 SXM, bf16; every figure in the output is labelled "modelled"):

* issue: 132 SMs x 4 schedulers x 1 warp-instruction per clock x 32 threads x 1.98 GHz
  = 33.4e12 thread-instructions/s;
* tensor cores: 790e12 dense bf16 FLOP/s (what large wgmma GEMMs reach; 989e12 is the peak);
* MUFU: 132 SMs x 16 lanes x 1.98 GHz x ~0.93 = 3.9e12 operations/s;
* a launch over E unique tile elements takes  max(I E / issue + F E / tensor - O E,  U E / mufu)
  with I, F, U the thread-instructions, tensor FLOPs and MUFU operations per unique element read
  from the SASS (replication included); the MUFU pipe overlaps with both other terms.
* overlap O of the instruction stream with the tensor cores, credited only where the SASS shows
  it (``sass.wgmma_overlap``): per wgmma group of the main loop (the HGMMAs up to the one that
  commits with ``gsb0``), the instructions that issue between its commit and the
  ``WARPGROUP.DEPBAR.LE gsb0, N`` that retires it (in loop order, wrapping to the next
  iteration) run while it computes, so  O = sum over groups of min(in-flight instr / issue,
  group FLOPs / tensor). A product waited on right after its commit (Triton's code for a score
  tile the softmax consumes next) has nothing in flight: issue and tensor time add up for it.
  A kernel whose every product is in flight during all of its other instructions is modelled
  as max(issue, tensor); one without in-flight instructions as their sum.
  Memory traffic, launch overhead and tail effects are ignored (O(N d) bytes against O(N^2 d) FLOPs).
* masked tiles: the kernels branch once per key tile around their exclusion mask; ``instr`` counts
  a masked tile (every instruction), ``instr_interior`` an interior one (the SASS's mask path,
  ``sass.mask_regions``, skipped); a headline launch mixes them by the fraction of its tiles
  that meet an excluded pair or the end of the keys (:func:`masked_fraction`).
* the floor of a loss: per pass, max(ideal FLOPs / tensor, ideal exponentials / mufu), summed.
* a backward by G blocks and GEMMs (CLIP at d = 512: :mod:`.clip`): the G kernel's launches share
  one pass over the pairs (:data:`BLOCK_KERNELS`), at least its G writes at the HBM rate; the
  GEMMs (cuBLAS, not compiled here) per call max(FLOPs / tensor, bytes / HBM rate) and the
  elementwise passes over the fp32 products at the HBM rate (3.35e12 B/s, H100 SXM), added.
"""
from __future__ import annotations

ISSUE_RATE = 132 * 4 * 32 * 1.98e9          # thread-instructions / s
TENSOR_RATE = 790e12                          # bf16 FLOP / s
MUFU_RATE = 3.9e12                            # MUFU operations / s

MODEL_TEXT = (
    "modelled, not measured: H100/H200 SXM, issue 33.4e12 thread-instr/s (132 SMs x 4 schedulers x 32 x "
    "1.98 GHz), tensor 790e12 bf16 FLOP/s, MUFU 3.9e12 op/s; launch time = max(instr/issue + mma_flops/tensor "
    "- overlap, mufu/MUFU) over the unique tile elements, MUFU overlapped; overlap (from the SASS) = sum over "
    "the main loop's wgmma groups of min(instructions issued between the group's commit (HGMMA ... gsb0) and "
    "the WARPGROUP.DEPBAR that retires it / issue, the group's FLOPs / tensor): a product waited on right "
    "after it is issued overlaps nothing (issue + tensor), one in flight during all other instructions gives "
    "max(issue, tensor); instructions per element mix the masked-tile and interior-tile counts of the SASS by "
    "the fraction of tiles that meet an excluded pair at the case's shape; memory traffic, launch overhead "
    "and tails ignored")

#: headline cases; ideal: (pass, FLOPs per element / d, exponentials per element)
#: self_excluded: each row excludes its own index (NT-Xent), else nothing is excluded (CLIP)
HEADLINE = {
    "nt_xent_2B65536_d128_bf16": dict(scenario="nt_xent", rows=65536, d=128, dtype="bf16", self_excluded=True,
                                      ideal=[("forward", 2, 1), ("backward", 4, 2)]),
    "clip_B32768_d512_bf16": dict(scenario="clip", rows=32768, d=512, dtype="bf16", self_excluded=False,
                                  ideal=[("forward", 2, 2), ("backward", 6, 2)]),
}


def masked_fraction(case: dict, config: dict) -> float:
    """Fraction of a launch's tiles that take the per-tile mask path at the case's shape: with the
    self exclusion, the key tiles that meet a row block's own indices (ceil(BLOCK_M / BLOCK_N) of
    rows / BLOCK_N, aligned blocks); plus a last partial key tile when BLOCK_N does not divide
    the rows (none here: powers of two)."""
    bm, bn, n = config.get("BLOCK_M") or 1, config.get("BLOCK_N") or 1, case["rows"]
    tiles = -(-n // bn)
    masked = (-(-bm // bn) if case["self_excluded"] else 0) + (1 if n % bn else 0)
    return min(1.0, masked / tiles)


def tile_mix(pe: dict, fraction: float) -> dict:
    """Per-element counts of a launch whose tiles take the mask path with ``fraction``: the
    instructions mix ``instr`` (masked tile) and ``instr_interior``; without an interior count
    (no mask path in the SASS), ``instr`` throughout."""
    if "instr_interior" not in pe:
        return pe
    return dict(pe, instr=fraction * pe["instr"] + (1 - fraction) * pe["instr_interior"])


def launch_time(pe: dict, elements: float) -> dict:
    """Modelled seconds of one launch from its per-element counts."""
    t_issue = pe["instr"] * elements / ISSUE_RATE
    t_mma = pe["mma_flops"] * elements / TENSOR_RATE
    t_mufu = pe["mufu"] * elements / MUFU_RATE
    t_overlap = overlap_seconds(pe.get("overlap") or [], elements)
    return dict(issue_ms=t_issue * 1e3, mma_ms=t_mma * 1e3, mufu_ms=t_mufu * 1e3, overlap_ms=t_overlap * 1e3,
                ms=max(t_issue + t_mma - t_overlap, t_mufu) * 1e3)


def overlap_seconds(groups: list[dict], elements: float) -> float:
    """Seconds of instruction issue hidden under the tensor cores: per wgmma group (per unique
    element: ``in_flight`` instructions issued while it computes, its ``mma_flops``),
    min(in-flight issue time, the group's tensor time), summed."""
    return sum(min(g["in_flight"] * elements / ISSUE_RATE, g["mma_flops"] * elements / TENSOR_RATE)
               for g in groups)


def floor_ms(case: dict) -> float:
    """Tensor/MUFU floor of the loss with ideal work (one S per tile, one pass per LSE side)."""
    e = float(case["rows"]) ** 2
    return sum(max(fl * case["d"] * e / TENSOR_RATE, ex * e / MUFU_RATE) for _, fl, ex in case["ideal"]) * 1e3


#: kernels whose launches share the pairs of a pass (each launch one G block of rows x columns):
#: a variant's time is its share of the launches of that kernel in the pass times one full pass
BLOCK_KERNELS = {"_gpair_kernel"}


def headline(records: list[dict], cap: int = 90, extras: dict | None = None) -> dict:
    """Modelled time of each headline case: every launch the loss makes (records' ``uses``).

    ``extras``: {case: :func:`.clip.recorded_backward`} for a case whose backward takes G blocks
    and GEMMs: the G kernel's launches share the pairs (:data:`BLOCK_KERNELS`) and are bounded
    below by their G writes at ``hbm_rate``; the GEMMs (modelled at the tensor rate, not compiled
    here) and the elementwise passes over the fp32 products (HBM bytes at ``hbm_rate``) are passes
    of their own, and the case states its extra memory."""
    out = {}
    extras = extras or {}
    for name, case in HEADLINE.items():
        e = float(case["rows"]) ** 2
        ext = extras.get(name)
        passes, total, missing = [], 0.0, []
        for phase in ("forward", "backward"):
            use = f"{case['scenario']}/{phase}/nolabels"
            mine = [r for r in records if (r["cap"], r["dtype"], r["d"]) == (cap, case["dtype"], case["d"])
                    and use in r.get("uses", {})]
            block_launches = {}
            for r in mine:
                if r["kernel"] in BLOCK_KERNELS:
                    block_launches[r["kernel"]] = block_launches.get(r["kernel"], 0) + r["uses"][use]
            for r in mine:
                n = r["uses"][use]
                pe = r.get("per_element") or {}
                if "instr" not in pe:
                    missing.append(r["kernel"])
                    continue
                f = masked_fraction(case, r["config"])
                share = n / block_launches[r["kernel"]] if r["kernel"] in BLOCK_KERNELS else n
                t = {k: v * share for k, v in launch_time(tile_mix(pe, f), e).items()}
                if r["kernel"] in BLOCK_KERNELS and ext:        # its G writes: a lower bound
                    t["hbm_ms"] = ext["g_block_hbm_bytes"] * share / ext["hbm_rate"] * 1e3
                    t["ms"] = max(t["ms"], t["hbm_ms"])
                if r["kernel"] in BLOCK_KERNELS and ext:        # the launches at the case's shape
                    p = ext["plan"]
                    n = round(share * p["groups"] * -(-case["rows"] // p["band"]))
                passes.append(dict(name=phase, kernel=r["kernel"], launches=n, masked_tiles=round(f, 5),
                                   **{k: round(v, 3) for k, v in t.items()}))
                total += t["ms"]
        if ext and passes:
            gt = ext["gemms"]
            passes.append(dict(name="backward GEMMs (cuBLAS: modelled at the tensor rate, not compiled here)",
                               kernel="torch.mm / torch.addmm", launches=gt["calls"], issue_ms=0.0,
                               mma_ms=round(gt["tensor_ms"], 3), mufu_ms=0.0, hbm_ms=round(gt["hbm_ms"], 3),
                               ms=round(gt["ms"], 3)))
            passes.append(dict(name="backward elementwise (fp32 products scaled / added / rounded: HBM bytes)",
                               kernel="torch addcmul / mul / copy", launches="-", issue_ms=0.0, mma_ms=0.0,
                               mufu_ms=0.0, hbm_ms=round(ext["elementwise_ms"], 3),
                               ms=round(ext["elementwise_ms"], 3)))
            total += gt["ms"] + ext["elementwise_ms"]
        out[name] = dict(modelled_ms=round(total, 2) if passes else None, floor_ms=round(floor_ms(case), 2),
                         passes=passes, not_modelled=missing, rows=case["rows"], d=case["d"], dtype=case["dtype"])
        if ext and passes:
            out[name]["g_block_path"] = ext
    return out


# --- the CUDA backend (csrc/cuda) -------------------------------------------------------------

#: shared memory: 128 B per clock per SM (32 banks x 4 B) x 132 SMs x 1.98 GHz
SMEM_RATE = 128 * 132 * 1.98e9
#: the CUDA backend's launches in each headline case: (pass, kernel, launches); the backward adds
#: absmax / sum_partials, O(N) work, not modelled. CLIP at d = 512 (bf16, d > 128: the backend's
#: ``uses_backward_pair``): the backward by G blocks and GEMMs (``ops/pair_gemm.py``), the G
#: kernel's launches (one per band x column group; the cp.async variant: d % 8 == 0) sharing one pass over the pairs
#: (:data:`CUDA_BLOCK_KERNELS`), the GEMMs and elementwise passes from :func:`.clip.recorded_backward`
CUDA_HEADLINE = {
    # d = 128 <= kDK, aligned rows, no label / threshold rule: launch_mma.cu picks the resident kernels
    "nt_xent_2B65536_d128_bf16": [("forward", "lse_fwd_resident_mma_kernel<BF16Tag>", 1),
                                  ("backward", "lse_bwd_resident_mma_kernel<BF16Tag, 2>", 1)],
    "clip_B32768_d512_bf16": [("forward", "lse_fwd_mma_kernel<BF16Tag, false, false>", 2),
                              ("backward", "pair_gblock_mma_kernel<BF16Tag, true>", 1)],
}
#: CUDA kernels whose launches share the pairs of a pass (each launch one G block): modelled as one
#: full pass, at least its G writes at the HBM rate, with the GEMMs of the G-block path beside it
CUDA_BLOCK_KERNELS = {f"pair_gblock_mma_kernel<{tag}, {vec}>"
                      for tag in ("BF16Tag", "F16Tag") for vec in ("true", "false")}
#: issue 16: the CUDA backend within this factor of Triton on the headline cases
CUDA_TARGET_RATIO = 1.5

CUDA_MODEL_TEXT = (
    "modelled, not measured: the Triton model above, plus a shared-memory term for the mma.sync kernels: "
    "launch time = max(instr/issue + mma_flops/tensor, mufu/MUFU, ldmatrix bytes/smem) with smem 33.8e12 B/s "
    "(128 B/clock/SM x 132 x 1.98 GHz; the tiles' cp.async stores and the column-data loads are not counted); "
    "per-element counts at the case's d (the S product's chunk loop x ceil(d/128), the backward's ceil(d/128) "
    "programs per tile); masked and interior tiles as in the Triton model: instructions and MUFU operations "
    "mix the kernel's masked-tile count (every instruction of the main loop, both arms of its per-tile mask "
    "branch) and its interior count (without the masked-tile code: the forward's mask pass, the backward's "
    "masked copy of the S -> W' loop) by the fraction of key tiles that meet a row block's own indices or "
    "the end of the keys; a case with d <= 128, 16-B aligned rows and no label or threshold rule (NT-Xent "
    "here) runs the resident kernels, which hold only the cp.async tile loads and one feature chunk; the "
    "general kernels' counts (CLIP's forward at d = 512) include both sides of their vector/scalar tile-load "
    "branches, which overstates the vector path these aligned, d % 8 == 0 cases take; CLIP's backward by G "
    "blocks: the G kernel's launches one pass over the pairs (at least its G writes at the HBM rate), the "
    "GEMMs (cuBLAS, not compiled here) per call max(FLOPs / tensor, bytes / HBM) and the elementwise passes "
    "over the fp32 products at the HBM rate (3.35e12 B/s), added")


def cuda_masked_fraction(case: dict, pe: dict) -> float:
    """Fraction of a CUDA launch's key tiles that run the masked-tile code at the case's shape
    (:func:`masked_fraction` with the kernel's tile, rows x keys)."""
    rows, keys = pe.get("tile") or (None, None)
    return masked_fraction(case, {"BLOCK_M": rows, "BLOCK_N": keys})


def cuda_launch_time(pe: dict, elements: float, masked: float = 1.0) -> dict:
    """:func:`launch_time` with the shared-memory (ldmatrix) bound of the mma.sync kernels; a kernel
    with an interior count (``instr_interior``, ``mufu_interior``) runs it on the 1 - ``masked``
    fraction of its tiles and its full count on the rest."""
    if "instr_interior" in pe:
        pe = dict(pe, instr=masked * pe["instr"] + (1 - masked) * pe["instr_interior"],
                  mufu=masked * pe["mufu"] + (1 - masked) * pe.get("mufu_interior", pe["mufu"]))
    t = launch_time(pe, elements)
    t_smem = pe.get("ldsm_bytes", 0.0) * elements / SMEM_RATE * 1e3
    return dict(t, smem_ms=t_smem, ms=max(t["ms"], t_smem))


def cuda_headline(kernels: dict, triton_headline: dict, extras: dict | None = None) -> dict:
    """Modelled time of each headline case on the CUDA backend (``kernels``: one architecture's
    records of cuda_kernels.compile_arch) and the verdict on "within CUDA_TARGET_RATIO x of
    Triton" against ``triton_headline`` (:func:`headline`).

    ``extras``: {case: :func:`.clip.recorded_backward` on the cuda backend} for the cases whose
    backward takes G blocks (default: recorded here); their G kernel's launches are one pass
    (:data:`CUDA_BLOCK_KERNELS`), at least the G writes at the HBM rate, and the GEMMs (cuBLAS,
    modelled at the tensor rate) and elementwise passes are added as passes of their own."""
    if extras is None and any(k in CUDA_BLOCK_KERNELS for launches in CUDA_HEADLINE.values() for _, k, _ in launches):
        from . import clip  # noqa: PLC0415
        extras = clip.headline_extras(90, backend="cuda")
    extras = extras or {}
    out = {}
    for name, launches in CUDA_HEADLINE.items():
        case = HEADLINE[name]
        e = float(case["rows"]) ** 2
        ext = extras.get(name)
        passes, total, missing = [], 0.0, []
        for phase, kernel, n in launches:
            pe = ((kernels.get(kernel) or {}).get("per_element_at") or {}).get(str(case["d"]))
            if not pe or "instr" not in pe:
                missing.append(kernel)
                continue
            f = cuda_masked_fraction(case, pe)
            t = {k: v * n for k, v in cuda_launch_time(pe, e, f).items()}
            if kernel in CUDA_BLOCK_KERNELS:
                if not ext:
                    missing.append(f"{kernel}'s GEMMs (the G-block path not recorded: infonce_kernels._C not built?)")
                    continue
                t["hbm_ms"] = ext["g_block_hbm_bytes"] / ext["hbm_rate"] * 1e3
                t["ms"] = max(t["ms"], t["hbm_ms"])
                n = ext["plan"]["groups"] * -(-case["rows"] // ext["plan"]["band"])
            passes.append(dict(name=phase, kernel=kernel, launches=n, masked_tiles=round(f, 5),
                               **{k: round(v, 3) for k, v in t.items()}))
            total += t["ms"]
            if kernel in CUDA_BLOCK_KERNELS:
                gt = ext["gemms"]
                passes.append(dict(name="backward GEMMs (cuBLAS: modelled at the tensor rate, not compiled here)",
                                   kernel="torch.mm / torch.addmm", launches=gt["calls"], issue_ms=0.0,
                                   mma_ms=round(gt["tensor_ms"], 3), mufu_ms=0.0, smem_ms=0.0,
                                   hbm_ms=round(gt["hbm_ms"], 3), ms=round(gt["ms"], 3)))
                passes.append(dict(name="backward elementwise (fp32 products scaled / added / rounded: HBM bytes)",
                                   kernel="torch addcmul / mul / copy", launches="-", issue_ms=0.0, mma_ms=0.0,
                                   mufu_ms=0.0, smem_ms=0.0, hbm_ms=round(ext["elementwise_ms"], 3),
                                   ms=round(ext["elementwise_ms"], 3)))
                total += gt["ms"] + ext["elementwise_ms"]
        tri = (triton_headline.get(name) or {}).get("modelled_ms")
        ms = round(total, 2) if passes and not missing else None
        ratio = round(ms / tri, 2) if ms and tri else None
        out[name] = dict(modelled_ms=ms, floor_ms=round(floor_ms(case), 2), passes=passes, not_modelled=missing,
                         triton_modelled_ms=tri, ratio_to_triton=ratio, target_ratio=CUDA_TARGET_RATIO,
                         within_target=None if ratio is None else ratio <= CUDA_TARGET_RATIO)
        if ext and passes:
            out[name]["g_block_path"] = ext
    return out
