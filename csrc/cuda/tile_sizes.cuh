// Tile sizes and launch shapes of the CUDA kernels (docs/design.md, The performance model).
#pragma once

#include <cstddef>

namespace infonce_cuda {

// fp16 / bf16 tensor-core kernels (mma_kernels.cuh)
constexpr int kMmaThreads = 128;  // 4 warps
constexpr int kFwdMTiles = 2;     // forward: m16 tiles per warp -> 32 rows per warp
constexpr int kFwdBM = 128;       // forward rows per CTA: 4 warps x 16 x kFwdMTiles
constexpr int kBM = 64;           // backward rows per CTA: 16 per warp (one m16 tile)
constexpr int kBN = 64;           // columns (keys) per tile
constexpr int kDK = 128;          // feature chunk of the S = X Y^T product
constexpr int kDV = 128;          // output feature chunk of the backward (grid.y)
constexpr int kLds = kDK + 8;     // smem row stride in 16-bit elements: 272 B, 16-B aligned rows,
                                  // 17 x 16 B apart -> the 8 rows of one ldmatrix phase hit 8
                                  // distinct bank groups (conflict free)
constexpr int kTileElems = 64 * kLds;        // one 64 x kDK tile (kBM == kBN == 64)
constexpr int kFwdXElems = kFwdBM * kLds;    // the forward's 128 x kDK row tile
constexpr int kStages = 2;        // cp.async ring depth of the key (and row / value) tiles
// The resident backward (lse_bwd_resident_mma_kernel: rule-free, d <= kDK, 16-B aligned rows):
// 4 warps x 32 rows (two m16 tiles per warp, every B fragment read once for both) and key tiles
// of 32, so that S (2 x 4 m16n8 tiles: 32 fp32) and the output (2 x 16: 128 fp32) fit the 255
// registers; the same 4096 entries per CTA tile as kBM x kBN.
constexpr int kResBM = 128;       // rows per CTA
constexpr int kResBN = 32;        // keys per tile
constexpr int kResMTiles = kResBM / (4 * 16);  // m16 tiles per warp: 2
static_assert(kBM == 64 && kBN == 64, "tile loaders and the column info assume 64-row tiles");
static_assert(kFwdBM == 4 * 16 * kFwdMTiles, "forward: 4 warps of kFwdMTiles m16 tiles");
static_assert(kDV == kDK, "when d <= kDK the key tile doubles as the value tile");
static_assert(kResMTiles == 2 && kResBN % 16 == 0 && kResBN <= 32, "resident backward: 32 rows per warp, "
              "whole k16 steps of keys, one column per thread of warp 0");

// Dynamic shared memory of the tensor-core kernels (bytes); the launchers opt in above 48 KB.
//   forward:  X (1 buffer when d <= kDK: resident; else kStages) + Y (kStages)
//   backward: X (1 or kStages, as above) + Y (kStages) + V (kStages, only when d > kDK)
constexpr size_t fwd_mma_smem(bool x_resident) {
  return ((x_resident ? 1 : kStages) * size_t(kFwdXElems) + kStages * size_t(kTileElems)) * 2;
}
constexpr size_t bwd_mma_smem(bool x_resident) {
  return ((x_resident ? 1 : kStages) + kStages + (x_resident ? 0 : kStages)) * size_t(kTileElems) * 2;
}
//   resident backward: X (kResBM rows) + Y (kStages x kResBN rows; the key tile is the value tile)
constexpr size_t bwd_res_mma_smem() { return (size_t(kResBM) + kStages * size_t(kResBN)) * kLds * 2; }

// fp32 / fp64 SIMT kernels (simt_kernels.cuh): 16 x 16 threads with TM x TM micro tiles
constexpr int kSimtThreads = 256;  // 16 x 16
constexpr int kKC = 16;            // feature chunk of the S product
constexpr int kTmF32 = 4;          // 64 x 64 tiles, 42 KB static smem in the backward
constexpr int kTmF64 = 2;          // 32 x 32 tiles (fp64 halves the smem budget), 26 KB

// The reductions (reduce.cu) and the backward's workspace
constexpr int kRedThreads = 256;
constexpr size_t kWsHeader = 256;  // [0, 4): gmax (fp16/bf16 path); partials start at 256

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace infonce_cuda
