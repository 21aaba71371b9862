// Tile sizes and launch shapes of the CUDA kernels (docs/design.md, The performance model).
#pragma once

#include <cstddef>

namespace infonce_cuda {

// fp16 / bf16 tensor-core kernels (mma_kernels.cuh)
constexpr int kMmaThreads = 128;  // 4 warps
constexpr int kBM = 64;           // rows per CTA: 16 per warp
constexpr int kBN = 64;           // columns (keys) per tile
constexpr int kDK = 128;          // feature chunk of the S = X Y^T product
constexpr int kDV = 128;          // output feature chunk of the backward (grid.y)
constexpr int kLds = kDK + 8;     // smem row stride in 16-bit elements: 272 B, 16-B aligned rows,
                                  // 17 x 16 B apart -> the 8 rows of one ldmatrix phase hit 8
                                  // distinct bank groups (conflict free)
constexpr int kTileElems = 64 * kLds;  // one 64 x kDK tile (kBM == kBN == 64)
static_assert(kBM == 64 && kBN == 64, "tile loaders assume 64-row tiles");
static_assert(kDV == kDK, "when d <= kDK the key tile doubles as the value tile");


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
