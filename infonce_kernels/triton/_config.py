"""Tile sizes for the Triton kernels, chosen per GPU generation.

No ``import triton`` here: this module is pure Python so that it can be
imported (and unit-tested) on machines without Triton.

Vocabulary (shapes of one program's work):

* ``BLOCK_M``  rows of ``q`` handled by one program            (BLOCK_M, d)
* ``BLOCK_N``  keys consumed per inner-loop iteration           (BLOCK_N, d)
* ``BLOCK_D``  chunk of the feature dimension for ``q k^T``;    when
  ``SINGLE_D`` the whole (padded) d fits in one chunk and the operand tiles
  are loaded once and reused for both dots of the backward.
* ``BLOCK_DO`` chunk of the *output* feature dimension of the backward
  (``dq``/``dk``/``dz`` accumulators are (BLOCK_M, BLOCK_DO) fp32 registers);
  the backward grid gets a second axis of ``cdiv(d, BLOCK_DO)`` programs, each
  recomputing the score tile (only when d > BLOCK_DO: d > 256 for 16-bit without
  the label rule on sm_90, d > 128 with it or below sm_90, d > 64 for fp32).

Defaults are chosen by ``torch.cuda.get_device_capability`` (sm80: A100,
sm90: H100/H200; other capabilities get the sm80 settings) and by the
input dtype (fp32 tiles take twice the shared memory of 16-bit ones, fp64
four times). Under ``TRITON_INTERPRET=1`` tiles are small (16) so that tests
exercise the masking and multi-block paths on tiny inputs.

Autotuning is off by default (it costs seconds per new shape); set
``INFONCE_TRITON_AUTOTUNE=1`` to let ``triton.autotune`` pick among the six
:func:`autotune_configs` of a kernel per (d, dtype, exclusion width, label rule) and shape
bucket (:func:`shape_bucket`: M and N rounded up to powers of two).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

#: Tiles used under the interpreter (documented so tests can probe tile +- 1).
INTERPRET_BLOCK = 16
#: Largest d chunk under the interpreter.
INTERPRET_BLOCK_D = 32
#: Most row groups / key splits of the one-pass pair forward (``pair_splits``): 16 on a GPU
#: (at most 256 programs, a scratch of at most 2 x 16 (M + N) accumulator values); 2 under the
#: interpreter, so that tiny test inputs give programs of several row blocks and key tiles.
PAIR_SPLITS = 16
INTERPRET_PAIR_SPLITS = 2


@dataclass(frozen=True)
class TileConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    BLOCK_DO: int
    SINGLE_D: bool
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        """Keyword arguments for a kernel launch (constexprs + launch options)."""
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_D=self.BLOCK_D,
                    BLOCK_DO=self.BLOCK_DO, SINGLE_D=self.SINGLE_D,
                    num_warps=self.num_warps, num_stages=self.num_stages)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def autotune_enabled() -> bool:
    """``INFONCE_TRITON_AUTOTUNE=1`` (read at every call; never under the interpreter)."""
    return os.environ.get("INFONCE_TRITON_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on") \
        and not interpret_mode()


def interpret_mode() -> bool:
    """Whether Triton currently runs kernels in the interpreter (``TRITON_INTERPRET``)."""
    try:
        from triton import knobs  # noqa: PLC0415  (triton >= 3.4)
        return bool(knobs.runtime.interpret)
    except Exception:  # pragma: no cover - old triton or no triton
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def exact_fp32(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is fp32 on the exact FMA path (``tl.dot`` input precision "ieee":
    ``torch.get_float32_matmul_precision() == "highest"``; else tf32 tensor cores)."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def _capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def _max_block_d(dtype: torch.dtype) -> int:
    # Shared memory per stage grows with the element size: keep the operand
    # tiles of one stage near 16-32 KiB.
    return {torch.float16: 128, torch.bfloat16: 128, torch.float32: 64, torch.float64: 32}[dtype]


def _split_d(d: int, max_bd: int, max_bdo: int = 0) -> tuple[int, int, bool]:
    """(BLOCK_D, BLOCK_DO, SINGLE_D) for feature dimension d."""
    bd = max(16, next_pow2(d))
    if bd <= max_bd:
        return bd, bd, True
    return max_bd, min(bd, max(max_bd, max_bdo)), False


def forward_config(device: torch.device, dtype: torch.dtype, M: int, N: int, d: int) -> TileConfig:
    """Tiles of the forward (row-block LSE) kernel."""
    if interpret_mode():
        bd, bdo, single = _split_d(d, INTERPRET_BLOCK_D)
        return TileConfig(INTERPRET_BLOCK, INTERPRET_BLOCK, bd, bdo, single, 4, 1)
    cap = _capability(device)
    bd, bdo, single = _split_d(d, _max_block_d(dtype))
    wide = dtype in (torch.float16, torch.bfloat16)
    # (ptxas -v, triton 3.9, d=128, E=2: these tiles compile without spills)
    if cap >= (9, 0):
        cfg = TileConfig(128, 128 if (wide and single) else 64, bd, bdo, single, 8, 3) if wide \
            else TileConfig(64, 64, bd, bdo, single, 8, 2)
    else:  # sm80 / sm86 / sm89 and anything else
        cfg = TileConfig(128, 64, bd, bdo, single, 8 if wide else 4, 3 if wide else 2)
    if dtype == torch.float64:
        cfg = replace(cfg, BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
    return cfg


def backward_config(device: torch.device, dtype: torch.dtype, M: int, N: int, d: int,
                    labels: bool = False, paired: bool = False) -> TileConfig:
    """Tiles of the three backward kernels (dq rows, dk keys, symmetric dz rows).

    The backward keeps a (BLOCK_M, BLOCK_DO) fp32 accumulator and does two chained dots per
    tile. For chained dots Triton lays all warps along M (16 rows each, a wgmma warpgroup 64):
    BLOCK_M must be at least 16 x num_warps, or warps recompute the same score tile and
    exponentials (64 rows on 8 warps did every tile twice). Hence 128 rows on 8 warps.

    d > 128 (16-bit): the whole output of a tile up to d = 256 in one program (BLOCK_DO = 256, a
    128 x 256 fp32 accumulator, with 32-key tiles to leave it the registers), so the score tile
    and its exponentials are computed once per tile; beyond 256, one program per 256 output
    features. The label rule holds two more key vectors (int64 labels): 32-key tiles and
    128-wide output chunks keep it free of spills (ptxas -v, triton 3.9, sm_90). The paired kernel
    (``paired``) takes 32-key tiles too: its per-tile branch around the exclusion mask (interior
    tiles skip it) spills 48 B with 64-key tiles at d = 128 (ptxas -v, triton 3.9, sm_90).

    Those 128-row tiles are for sm_90's tensor cores. Exact fp32 ("ieee": FMA products, no
    tensor cores) and capabilities below sm_90 keep 64 x 64 tiles on 8 warps, with output
    chunks of at most the d chunk: 128 rows spill there (fp32 ieee d=64 on sm_90 up to 16 KB,
    ``_dq_paired`` bf16 d=128 on sm_80 216 B; ptxas -v, triton 3.9).
    """
    if interpret_mode():
        bd, bdo, single = _split_d(d, INTERPRET_BLOCK_D, 2 * INTERPRET_BLOCK_D)
        return TileConfig(INTERPRET_BLOCK, INTERPRET_BLOCK, bd, bdo, single, 4, 1)
    wide = dtype in (torch.float16, torch.bfloat16)
    # BLOCK_D must equal the forward's: the backward's score tiles then accumulate over d in
    # the same order as the forward's, so P rows sum to 1 against the stored LSE (to rounding:
    # the two kernels' products may use different instruction shapes).
    if exact_fp32(dtype) or _capability(device) < (9, 0):
        bd, bdo, single = _split_d(d, _max_block_d(dtype))
        cfg = TileConfig(64, 64, bd, bdo, single, 8, 2)
    else:
        bd, bdo, single = _split_d(d, _max_block_d(dtype), 256 if (wide and not labels) else 0)
        narrow = labels or paired or not single
        cfg = TileConfig(128, 32 if narrow else 64, bd, bdo, single, 8, 2)
    if dtype == torch.float64:
        cfg = replace(cfg, BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    return cfg


def pair_splits() -> int:
    """Most row groups and most key splits of the one-pass pair forward (``PAIR_SPLITS``)."""
    return INTERPRET_PAIR_SPLITS if interpret_mode() else PAIR_SPLITS


def dk_config(cfg: TileConfig) -> TileConfig:
    """Tiles of the dk kernel: its own block is BLOCK_N keys, its loop runs over BLOCK_M rows,
    i.e. the (keys, rows) tile of the other kernels transposed: the roles of the two block sizes
    swap, so that its own block is the 128 rows of its score tile (wgmma, no replicated warps)."""
    if interpret_mode() or cfg.BLOCK_M == cfg.BLOCK_N:
        return cfg
    return replace(cfg, BLOCK_M=cfg.BLOCK_N, BLOCK_N=cfg.BLOCK_M)


#: Candidates of ``INFONCE_TRITON_AUTOTUNE=1`` per kernel kind, (BLOCK_M, BLOCK_N, num_warps,
#: num_stages): every one keeps BLOCK_M >= 16 x num_warps (no warp recomputes another's rows of a
#: chained-dot kernel) and the forward's wide tiles; six each, so a new shape bucket tunes in
#: seconds, not minutes. The dk kernel's own block is its BLOCK_N (its tiles are transposed).
AUTOTUNE_CANDIDATES = {
    "forward": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 3),
                (128, 64, 8, 2)],
    "backward": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 3),
                 (64, 64, 4, 3)],
}


def autotune_configs(kind: str) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for ``INFONCE_TRITON_AUTOTUNE=1``:
    ``kind`` is "forward", "backward" (dq and paired kernels) or "dk" (the backward's, with the
    two block sizes swapped). BLOCK_D/BLOCK_DO/SINGLE_D stay fixed by d and dtype."""
    if kind == "dk":
        return [(bn, bm, w, st) for bm, bn, w, st in AUTOTUNE_CANDIDATES["backward"]]
    return list(AUTOTUNE_CANDIDATES[kind])


def shape_bucket(M: int, N: int) -> tuple[int, int]:
    """The autotuning cache key of a launch's sizes: M and N rounded up to powers of two, so that
    every batch size of a bucket reuses one tuning (keys also hold d, E, the label rule and the
    dtype, which change the compiled kernel)."""
    return next_pow2(M), next_pow2(N)
