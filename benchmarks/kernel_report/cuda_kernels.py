"""Compile the hand-written CUDA kernels (csrc/cuda/*.cu) for one architecture and read them.

``nvcc -ptx`` then ``ptxas`` (as ``nvcc -cubin`` does) with the flags setup.py passes (-O3 -std=c++20 -lineinfo
--expt-relaxed-constexpr, torch's -D__CUDA_NO_* defines), every directory under csrc/ on the
include path, ``-Xptxas -v`` for registers / spills / shared memory per kernel; the cubin is
disassembled with cuobjdump for the SASS counts of :mod:`.sass`.

Tile geometry (rows x keys of one CTA's tile, threads per CTA) comes from the sources' constants
(``kFwdBM`` for the tensor-core forward, ``kBM`` for its backward, ``kBN``, ``kMmaThreads``;
``16 * TM`` and ``kSimtThreads`` for the SIMT ones, TM being the kernel's second template
argument); a kernel of another family gets no per-element figures (``per_element: null`` with the
reason). The tensor-core kernels also get their figures at the feature dimensions of the modelled
cases (``per_element_at``: the S product loops over ceil(d / kDK) chunks, the backward runs
ceil(d / kDV) programs per tile that each recompute S; a resident kernel, launched only for
d <= kDK, only there) and their dynamic shared memory (``smem_dynamic``, the launchers' formula of
tile_sizes.cuh evaluated on its constants).

Masked and interior tiles: the tensor-core kernels decide once per key tile (one warp vote)
whether an exclusion, the end of the keys or a rule touches the tile; only such a masked tile runs
the per-element mask code. ``instr`` / ``mufu`` count every instruction of the main loop (a masked
tile, conservatively: both arms); ``instr_interior`` / ``mufu_interior`` the loop without the
masked-tile code (:func:`masked_tile_code`), what an interior tile runs.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

from . import sass

FLAGS = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")
_CONST = re.compile(r"constexpr\s+(?:int|size_t|unsigned)\s+(k\w+)\s*=\s*([^;]+);")
_EXPR = re.compile(r"^[\w\s+*/()-]+$")
#: feature dimensions of the modelled headline cases (model.HEADLINE)
MODEL_DS = (128, 512)


def nvcc_path() -> str | None:
    p = shutil.which("nvcc")
    if p:
        return p
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    p = os.path.join(home, "bin", "nvcc")
    return p if os.path.exists(p) else None


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "?"


def sources(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))


def include_dirs(root: str) -> list[str]:
    base = os.path.join(root, "csrc")
    return [base] + sorted(d for d in glob.glob(os.path.join(base, "**", ""), recursive=True)
                           if os.path.isdir(d) and os.path.normpath(d) != os.path.normpath(base))


def source_constants(root: str) -> dict[str, int]:
    """``constexpr int kName = value;`` of every file under csrc/cuda; the value an integer or an
    integer expression (+ - * / and parentheses) of constants defined before it."""
    out: dict[str, int] = {}
    for f in sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*"))):
        if f.endswith((".cu", ".cuh", ".h", ".hpp")):
            for name, expr in _CONST.findall(open(f).read()):
                expr = expr.split("//")[0].strip()
                if name in out or not _EXPR.match(expr):
                    continue
                try:
                    val = eval(expr.replace("/", "//"), {"__builtins__": {}}, dict(out))  # noqa: S307 (checked above)
                except (NameError, SyntaxError, ZeroDivisionError):
                    continue
                if isinstance(val, int):
                    out[name] = val
    return out


def parse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v log -> {mangled name: regs, stack, spill_stores, spill_loads, smem}."""
    res: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = res.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        if (m := _SPILL.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        if (m := _REGS.search(line)):
            cur["regs"] = int(m.group(1))
            sm = _SMEM.search(line)
            cur["smem_static"] = int(sm.group(1)) if sm else 0
    return res


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """'void ns::(anonymous namespace)::lse_fwd_mma_kernel<ns::(anonymous namespace)::BF16Tag, false>(...)'
    -> 'lse_fwd_mma_kernel<BF16Tag, false>'."""
    s = re.sub(r"\(anonymous namespace\)::|\w+::", "", demangled)
    s = s[5:] if s.startswith("void ") else s
    return s.split("(", 1)[0].strip()


def geometry(short: str, consts: dict[str, int]):
    """(rows, keys, threads) of one CTA tile, or (None, reason)."""
    if "_mma_kernel" in short:
        rows = "kFwdBM" if short.startswith("lse_fwd_") and "kFwdBM" in consts else "kBM"
        keys = "kBN"
        if short.startswith("pair_gblock_"):            # CLIP's G kernel (pair_gblock.h)
            rows, keys = "kGBM", "kGBN"
        if short.startswith("lse_bwd_resident_"):       # 32 rows per warp, 32-key tiles
            rows, keys = "kResBM", "kResBN"
        need = (rows, keys, "kMmaThreads")
        if all(k in consts for k in need):
            return consts[rows], consts[keys], consts["kMmaThreads"]
        return None, f"constants {need} not found in csrc/cuda"
    if "_simt_kernel" in short:
        m = re.search(r"<\w+, (\d+)", short)
        if m and "kSimtThreads" in consts:
            b = 16 * int(m.group(1))
            return b, b, consts["kSimtThreads"]
        return None, "TM template argument or kSimtThreads not found"
    return None, "not a tiled main kernel"


def compile_arch(root: str, cap: int, out_dir: str, nvcc: str | None = None) -> dict:
    """Compile every csrc/cuda/*.cu for sm_``cap`` -> {short kernel name: record}."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found")
    os.makedirs(out_dir, exist_ok=True)
    incs = [f"-I{d}" for d in include_dirs(root)]
    consts = source_constants(root)
    from .triton_kernels import cuobjdump_path  # noqa: PLC0415
    cuobjdump = cuobjdump_path()
    kernels: dict[str, dict] = {}
    for src in sources(root):
        stem = os.path.splitext(os.path.basename(src))[0]
        # nvcc -ptx (front end, the flags of setup.py), then the toolkit's ptxas -v on that PTX: the
        # cubin nvcc -cubin would build (nvcc passes -O3 and -lineinfo on to ptxas), compiled once
        ptx = os.path.join(out_dir, f"{stem}.sm{cap}.ptx")
        cubin = os.path.join(out_dir, f"{stem}.sm{cap}.cubin")
        r = subprocess.run([nvcc, *FLAGS, *incs, "-ptx", f"-arch=sm_{cap}", src, "-o", ptx], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed on {os.path.relpath(src, root)} for sm_{cap}:\n{r.stderr[-3000:]}")
        ptxas = os.path.join(os.path.dirname(nvcc), "ptxas")
        r = subprocess.run([ptxas, "-v", "-O3", "-lineinfo", f"--gpu-name=sm_{cap}", ptx, "-o", cubin],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ptxas failed on {os.path.relpath(src, root)} for sm_{cap}:\n{r.stderr[-3000:]}")
        res = parse_ptxas(r.stderr + r.stdout)
        ptx_text = open(ptx).read()
        funcs = {}
        if cuobjdump:
            funcs = sass.split_functions(subprocess.run([cuobjdump, "-sass", cubin], capture_output=True,
                                                        text=True, check=True).stdout)
        names = demangle(sorted(res))
        for mangled, info in res.items():
            short = short_name(names[mangled])
            ins = funcs.get(mangled, [])
            rec = dict(source=os.path.relpath(src, root), mangled=mangled, **info,
                       tensor_core=sass.tensor_kind(ins) if ins else None,
                       ptx_mma_sync=ptx_count(ptx_text, mangled, "mma.sync"),
                       ptx_ex2_approx=ptx_count(ptx_text, mangled, "ex2.approx"),
                       ptx_cp_async=ptx_count(ptx_text, mangled, "cp.async"))
            rec["per_element"] = per_element(ins, short, consts) if ins else None
            if ins and "_mma_kernel" in short:
                rec["per_element_at"] = {str(d): per_element(ins, short, consts, d) for d in MODEL_DS}
                rec["smem_dynamic"] = {str(d): mma_dynamic_smem(short, consts, d) for d in MODEL_DS}
            kernels[short] = rec
    return kernels


def ptx_count(ptx: str, mangled: str, needle: str) -> int:
    """Occurrences of ``needle`` in the PTX body of entry ``mangled``."""
    i = ptx.find(f".entry {mangled}(")
    if i < 0:
        return 0
    j = ptx.find(".entry ", i + 1)
    return ptx[i:j if j > 0 else len(ptx)].count(needle)


def mma_trips(short: str, consts: dict[str, int], d: int) -> tuple[int, int]:
    """(S-product chunk-loop trips, programs per tile) of a tensor-core kernel at feature dim d."""
    trips = -(-d // consts.get("kDK", 128))
    programs = -(-d // consts.get("kDV", 128)) if short.startswith("lse_bwd_") else 1
    return trips, programs


def mma_dynamic_smem(short: str, consts: dict[str, int], d: int) -> int | None:
    """Dynamic shared memory (bytes) of a tensor-core kernel's launch at feature dim d:
    tile_sizes.cuh's fwd_mma_smem / bwd_mma_smem (16-bit tiles of kLds-element rows)."""
    need = ("kLds", "kBM", "kBN", "kStages", "kDK")
    if not all(k in consts for k in need):
        return None
    lds, stages = consts["kLds"], consts["kStages"]
    x_resident = d <= consts["kDK"]
    xbuf = 1 if x_resident else stages
    if short.startswith("lse_fwd_") and "kFwdBM" in consts:
        return 2 * lds * (xbuf * consts["kFwdBM"] + stages * consts["kBN"])
    if short.startswith("lse_bwd_"):
        return 2 * lds * consts["kBM"] * (xbuf + stages + (0 if x_resident else stages))
    if short.startswith("pair_gblock_") and "kGBM" in consts:   # pair_gblock_smem(): X and Y, kStages each
        return 2 * lds * stages * (consts["kGBM"] + consts["kGBN"])
    return None


#: opcodes the mask pass never holds: it only reads S and the tile's rule data, and writes registers
_NOT_MASK = ("LDGSTS", "LDG", "STS", "STG", "ST.")
#: a branch: BRA [predicate,] target (the predicated form of the masked-tile test: ``@!P1 BRA 0x...``)
_BRANCH = re.compile(r"^BRA(?:\.\S+)?\s+(?:!?U?P\d,\s*)?(?:`\()?(0x[0-9a-f]+)")


def masked_tile_code(ins, body: tuple[int, int]) -> list[tuple[int, int]]:
    """(first, last) addresses of the masked-tile code in main loop ``body`` of a tensor-core kernel:

    * the forward's mask pass: :func:`sass.mask_regions` (code a predicated forward branch skips,
      with integer compares and no exponential, product, global store or branch), less any region
      holding a global load or copy or a shared-memory store (LDG, LDGSTS, STS: the next key
      tile's copies, which every tile but the last issues, and the column data that threads
      < kBN store, are skipped by branches of the same shape; the mask pass writes registers only);
    * the backward's masked copy of the S -> W' loop: a uniform if / else whose arms both hold
      MUFU.EX2, i.e. a predicated forward branch ``@P BRA X`` whose skipped block ends with an
      unconditional ``BRA Y`` (Y > X) past the other arm [X, Y); of the two arms, the one with
      more ISETP (the per-element exclusion compares) is the masked one.
    """
    seq = [i for i in ins if body[0] <= i.addr <= body[1]]
    out = []
    for a, b in sass.mask_regions(ins, body):
        if not any(a <= i.addr <= b and i.op.startswith(_NOT_MASK) for i in seq):
            out.append((a, b))
    addr = [i.addr for i in seq]
    for n, i in enumerate(seq):
        m = _BRANCH.match(i.text)
        if not (i.pred and m):
            continue
        x = int(m.group(1), 16)
        if not i.addr < x <= body[1] or x not in addr:
            continue
        k = addr.index(x)
        last = seq[k - 1]
        j = _BRANCH.match(last.text)
        if last.pred or not j or k - 1 <= n:
            continue
        y = int(j.group(1), 16)
        if not x < y <= body[1]:
            continue
        arm1 = seq[n + 1:k - 1]
        arm2 = [q for q in seq[k:] if q.addr < y]

        def has(arm, op):
            return sum(q.op.startswith(op) for q in arm)

        if not (has(arm1, "MUFU.EX2") and has(arm2, "MUFU.EX2")):
            continue
        masked = arm1 if has(arm1, "ISETP") > has(arm2, "ISETP") else arm2
        if masked is arm1:
            out.append((arm1[0].addr, last.addr))        # with the branch over the other arm
        else:
            out.append((arm2[0].addr, arm2[-1].addr))
    return sorted(out)


def per_element(ins, short: str, consts: dict[str, int], d: int | None = None):
    """Main-loop counts per element of the CTA tile. d = None: one feature chunk (inner loops
    once); a tensor-core kernel at feature dim d: the inner (chunk) loop x ceil(d / kDK), and the
    backward's ceil(d / kDV) programs per tile."""
    geo = geometry(short, consts)
    if geo[0] is None:
        return {"unavailable": geo[1]}
    rows, keys, threads = geo
    body = sass.main_loop(ins)
    if body is None:
        return {"unavailable": "no loop"}
    if d is not None and "_resident_" in short and d > consts.get("kDK", 128):
        return {"unavailable": f"launched only for d <= kDK = {consts.get('kDK', 128)}"}
    trips, programs = mma_trips(short, consts, d) if d is not None else (1, 1)
    c = sass.count_body(ins, body, trips)
    elems = rows * keys
    per = threads * programs / elems
    out = dict(method="static main-loop body x threads / tile elements; inner loops and both sides of "
                      "branches counted once", tile=[rows, keys], threads=threads,
               body_per_thread=c["total"], by_class=c["by_class"],
               instr=round(c["total"] * per, 2),
               mufu=round(c["by_class"].get("mufu", 0) * per, 3),
               mma_flops=round(c["mma_flops_per_warp"] * threads / 32 * programs / elems, 1),
               ldsm_bytes=round(sass.ldsm_bytes(ins, body, trips) * threads / 32 * programs / elems, 2))
    masked = masked_tile_code(ins, body) if "_mma_kernel" in short else []
    if masked:
        ci = sass.count_body(ins, body, trips, masked)
        out.update(instr_interior=round(ci["total"] * per, 2),
                   mufu_interior=round(ci["by_class"].get("mufu", 0) * per, 3),
                   masked_code=[[hex(a), hex(b)] for a, b in masked])
    if d is not None:
        out.update(d=d, chunk_trips=trips, programs_per_tile=programs)
    return out
