"""Read a kernel's SASS (``cuobjdump -sass``): instructions, loops, counts by class.

Method (the numbers in the kernel report):

* a **loop** is a backward branch ``BRA target`` at address ``a`` with ``target <= a``; its body is
  ``[target, a]``; loops nest by address containment;
* the **main loop** is the outermost loop whose body holds a ``MUFU.EX2`` (the loop over key
  blocks, where the exponentials of the tile are taken); in a kernel without MUFU.EX2 (fp64, whose
  exp is computed in software) the outermost loop with the longest body;
* one main-loop iteration is counted **statically**: every instruction of the body once (both
  sides of a branch inside it, predicated-off instructions too: they still issue), each inner loop
  multiplied by a trip count the caller gives (the Triton kernels' only inner loop is the d-chunk
  loop of the score product: ``ceil(D / BLOCK_D)``); counts are per thread (SASS is per warp,
  every lane of a warp issues each instruction once).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_FUNC = re.compile(r"Function : (\S+)")
_BRA = re.compile(r"^BRA(?:\.\S+)?\s+(?:`\()?(0x[0-9a-f]+)")
_SHAPE = re.compile(r"^(HGMMA|HMMA|DMMA|IMMA)\.(\d+)x?(\d+)?x?(\d+)?")


@dataclass(frozen=True)
class Ins:
    addr: int
    pred: str
    op: str      # full opcode with modifiers, e.g. HGMMA.64x128x16.F32.BF16
    text: str


def split_functions(sass: str) -> dict[str, list[Ins]]:
    """``cuobjdump -sass`` text -> {mangled function name: instructions in address order}."""
    funcs: dict[str, list[Ins]] = {}
    cur = None
    for line in sass.splitlines():
        fm = _FUNC.search(line)
        if fm:
            cur = funcs.setdefault(fm.group(1), [])
            continue
        m = _INS.search(line)
        if m and cur is not None:
            txt = m.group(2).strip()
            pred = ""
            if txt.startswith("@"):
                pred, txt = txt.split(None, 1)
            cur.append(Ins(int(m.group(1), 16), pred, txt.split()[0], txt))
    return funcs


def loops(ins: list[Ins]) -> list[tuple[int, int]]:
    """(first, last) addresses of every loop body (backward branches), outermost first."""
    out = []
    for i in ins:
        m = _BRA.match(i.text)
        if m:
            t = int(m.group(1), 16)
            if t <= i.addr:
                out.append((t, i.addr))
    return sorted(set(out), key=lambda r: (r[0], -r[1]))


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1] and inner != outer


def main_loop(ins: list[Ins]):
    """The outermost loop holding a MUFU.EX2 -> (first, last); without any MUFU.EX2 (fp64: exp in
    software) the outermost loop with the most instructions; None without loops."""
    ex2 = [i.addr for i in ins if i.op.startswith("MUFU.EX2")]
    every = loops(ins)
    cands = [lp for lp in every if any(lp[0] <= a <= lp[1] for a in ex2)]
    outer = [lp for lp in cands if not any(_inside(lp, o) for o in cands)]
    if not outer:
        tops = [lp for lp in every if not any(_inside(lp, o) for o in every)]
        return max(tops, key=lambda lp: lp[1] - lp[0]) if tops else None
    # several disjoint candidates (e.g. peeled copies): the one with the most exponentials
    return max(outer, key=lambda lp: sum(lp[0] <= a <= lp[1] for a in ex2))


def classify(op: str) -> str:
    """Instruction class for the counts (tensor, mufu, smem, gmem, fp, int, control, other)."""
    o = op.split(".")[0]
    if o in ("HGMMA", "HMMA", "DMMA", "IMMA", "WARPGROUP", "BGMMA"):
        return "tensor"
    if o == "MUFU":
        return "mufu"
    if o in ("LDS", "STS", "LDSM", "STSM", "ATOMS"):
        return "smem"
    if o in ("LDG", "STG", "LDGSTS", "LDGDEPBAR", "DEPBAR", "UBLKCP", "UTMALDG", "UTMASTG", "SYNCS", "RED", "ATOMG",
             "LD", "ST", "LDC", "ULDC", "LDL", "STL"):
        return "memory"
    if o in ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK", "FSWZADD", "F2F", "F2FP", "HADD2", "HMUL2",
             "HFMA2", "HMNMX2", "DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "FRND"):
        return "float"
    if o in ("BRA", "BAR", "BSSY", "BSYNC", "WARPSYNC", "EXIT", "NOP", "RET", "CALL", "YIELD", "ELECT", "FENCE",
             "MEMBAR", "ERRBAR", "CCTL", "ARRIVES", "BREAK", "BPT", "JMP", "KILL"):
        return "control"
    if o == "SHFL":
        return "shuffle"
    return "int_logic_move"   # IMAD, ISETP, LOP3, SHF, LEA, SEL, MOV, PRMT, I2F, uniform ops, ...


def mma_flops(op: str) -> int:
    """FLOPs of one issue of a tensor instruction, for the unit that issues it.

    HGMMA.MxNxK: one warpgroup-wide product (issued by each of its 4 warps: counted once per
    warpgroup by dividing by 4 in :func:`count_body`); HMMA.MNK (16816, 1688, ...) and DMMA: one warp.
    """
    m = _SHAPE.match(op)
    if not m:
        return 0
    kind = m.group(1)
    if kind == "HGMMA":
        M, N, K = int(m.group(2)), int(m.group(3)), int(m.group(4))
        return 2 * M * N * K
    digits = m.group(2)          # HMMA.16816 -> 16, 8, 16; HMMA.1688 -> 16, 8, 8; DMMA.884 -> 8, 8, 4
    shapes = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "8816": (8, 8, 16), "16832": (16, 8, 32),
              "1684": (16, 8, 4), "168": (16, 8, 8)}
    M, N, K = shapes.get(digits, (0, 0, 0))
    return 2 * M * N * K


_FWD_BRA = re.compile(r"^BRA(?:\.\S+)?\s+(?:!?U?P\d,\s*)?(?:`\()?(0x[0-9a-f]+)")


def mask_regions(ins: list[Ins], body: tuple[int, int]) -> list[tuple[int, int]]:
    """(first, last) addresses of the per-tile mask paths in loop ``body``: code that a predicated
    forward branch skips, holding integer compares (ISETP: the exclusion rule's index compares) and
    no exponential (MUFU.EX2), no product (HGMMA/HMMA), no global store (STG: e.g. the pair
    forward's once-per-row-block partials) and no other branch. The kernels branch
    once per tile around their exclusion mask (``tile_masked``): interior tiles, which no rule can
    touch, skip that code."""
    seq = [i for i in ins if body[0] <= i.addr <= body[1]]
    out = []
    for n, i in enumerate(seq):
        m = _FWD_BRA.match(i.text)
        if not (i.pred and m):
            continue
        target = int(m.group(1), 16)
        if not i.addr < target <= body[1]:
            continue
        region = [j for j in seq[n + 1:] if j.addr < target]
        if not region:
            continue
        ops = [j.op for j in region]
        if (any(o.startswith(("MUFU.EX2", "HGMMA", "HMMA", "BRA", "STG")) for o in ops)
                or not any(o.startswith("ISETP") for o in ops)):
            continue
        out.append((region[0].addr, region[-1].addr))
    return out


def count_body(ins: list[Ins], body: tuple[int, int], inner_trips: int = 1, skip=()) -> dict:
    """Per-thread instruction counts of one iteration of loop ``body``.

    Inner loops (nested backward branches) count ``inner_trips`` times; instructions in the
    address ranges ``skip`` (e.g. :func:`mask_regions`) not at all. Returns counts by class, the
    total, the opcodes of the tensor instructions, and ``mma_flops_per_warp``: tensor FLOPs one warp
    accounts for (HGMMA divided among the 4 warps of its warpgroup).
    """
    inner = [lp for lp in loops(ins) if _inside(lp, body)]
    top_inner = [lp for lp in inner if not any(_inside(lp, o) for o in inner)]
    by_class, ops = Counter(), Counter()
    flops = 0.0
    total = 0
    for i in ins:
        if not body[0] <= i.addr <= body[1] or any(a <= i.addr <= b for a, b in skip):
            continue
        w = inner_trips if any(lp[0] <= i.addr <= lp[1] for lp in top_inner) else 1
        c = classify(i.op)
        by_class[c] += w
        total += w
        if c == "tensor":
            ops[i.op] += w
            f = mma_flops(i.op)
            flops += w * (f / 4 if i.op.startswith("HGMMA") else f)
        elif c == "mufu":
            ops[i.op] += w
    return dict(total=total, by_class=dict(by_class), ops=dict(ops), mma_flops_per_warp=flops,
                inner_loops=len(top_inner), inner_trips=inner_trips if top_inner else 0,
                body=[hex(body[0]), hex(body[1])])


def tensor_kind(ins: list[Ins]) -> str:
    """'wgmma' (HGMMA), 'mma.sync' (HMMA / DMMA) or 'none' (FMA only)."""
    ops = {i.op.split(".")[0] for i in ins}
    if "HGMMA" in ops:
        return "wgmma"
    if ops & {"HMMA", "DMMA", "IMMA"}:
        return "mma.sync"
    return "none"


_LDSM = re.compile(r"^LDSM\.16\.(?:MT88|M88|M816|MT816)\.(\d)")


def ldsm_bytes(ins: list[Ins], body: tuple[int, int], inner_trips: int = 1) -> float:
    """Shared-memory bytes one warp reads through ``ldmatrix`` (LDSM) in one iteration of loop
    ``body``, inner loops ``inner_trips`` times: an x1 / x2 / x4 LDSM reads 1 / 2 / 4 8x8 matrices of
    16-bit values, 128 B each."""
    inner = [lp for lp in loops(ins) if _inside(lp, body)]
    top_inner = [lp for lp in inner if not any(_inside(lp, o) for o in inner)]
    total = 0.0
    for i in ins:
        if not body[0] <= i.addr <= body[1] or not i.op.startswith("LDSM"):
            continue
        m = _LDSM.match(i.op)
        n = int(m.group(1)) if m else 4
        w = inner_trips if any(lp[0] <= i.addr <= lp[1] for lp in top_inner) else 1
        total += w * 128 * n
    return total



def _is_commit(i: Ins) -> bool:
    """An HGMMA that commits its warpgroup's products as one group (``gsb0`` operand)."""
    return i.op.startswith("HGMMA") and "gsb0" in i.text


_DEPBAR = re.compile(r"^WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+|\d+)")


def wgmma_overlap(ins: list[Ins], body: tuple[int, int]) -> list[dict]:
    """The wgmma groups of one iteration of loop ``body`` and the instructions that issue while
    each is in flight: the overlap evidence of the kernel report's model.

    A group is the HGMMAs up to and including one that commits (``gsb0``); it is retired by the
    first ``WARPGROUP.DEPBAR.LE gsb0, N`` after its commit that leaves at most N groups pending
    (older ones first), in loop order, wrapping to the next iteration (the body is walked three
    times; the middle copy is measured, the first sets the groups pending on entry). The
    instructions **in flight** of a group are the non-tensor instructions between its commit and
    that wait: the warp issues them while the tensor cores compute the group. A group waited on
    right after its commit (what Triton emits for a product the next instructions consume) has
    none. Conservative: instructions of inner loops (the d-chunk loop) count once, not per trip,
    and a group inside an inner loop counts the FLOPs of one trip. Per thread (SASS per warp).

    Returns one dict per group committed in an iteration: ``commit`` and ``retire`` addresses (hex),
    ``flops_per_warp`` (HGMMA FLOPs / 4, as :func:`count_body`), ``in_flight`` (instructions).
    """
    seq = [i for i in ins if body[0] <= i.addr <= body[1]]
    pending: list[dict] = []        # groups committed, not yet retired (oldest first)
    groups: list[dict] = []         # groups committed in the measured (middle) copy
    flops = 0.0
    for copy in range(3):
        for i in seq:
            c = classify(i.op)
            if i.op.startswith("HGMMA"):
                flops += mma_flops(i.op) / 4
                if _is_commit(i):
                    g = dict(commit=hex(i.addr), retire=None, flops_per_warp=flops, in_flight=0, copy=copy)
                    pending.append(g)
                    if copy == 1:
                        groups.append(g)
                    flops = 0.0
                continue
            m = _DEPBAR.match(i.text)
            if m:
                keep = int(m.group(1), 0)
                while len(pending) > keep:
                    g = pending.pop(0)
                    if g["retire"] is None:
                        g["retire"] = hex(i.addr)
                continue
            if c != "tensor":
                for g in pending:
                    g["in_flight"] += 1
    per_iteration = sum(1 for i in seq if classify(i.op) != "tensor")
    for g in groups:
        g.pop("copy")
        g["in_flight"] = min(g["in_flight"], per_iteration)   # never retired in the loop: one iteration
    return groups
