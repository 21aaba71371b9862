// infonce_kernels — CUDA kernel of CLIP's pair backward by G blocks (csrc/ops.cpp:
// _lse_pair_gblock; the schedule and its GEMMs: infonce_kernels/ops/pair_gemm.py).
//
// Plain C++ launcher API, no torch headers (compiles with plain nvcc, scripts/check_cuda_compile);
// the torch binding (pair_gblock_cuda.cpp) checks the arguments and passes the current stream.
//
// Maths: a (M, d), b (N, d) fp16 / bf16 row-major, s = *scale, l_ij = s <a_i, b_j>, r (M,) the
// row log-sum-exps of l, t (N,) the column ones, g_r (M,), g_t (N,) their upstream gradients,
// gm = *gmax > 0 (max |g|: G' = G / gm keeps a mean reduction's g ~ 1/B clear of fp16's
// subnormals). For the block rows [row0, row1) x columns [col0, col1):
//   G'_ij = (g_r_i exp(l_ij - r_i) + g_t_j exp(l_ij - t_j)) / gm
// written to gblk[(i - row0) * ldg + (j - col0)] in the input dtype, and per program one partial
// sum of G'_ij <a_i, b_j> to gs[program] (float). Every element of the block rounded up to whole
// tiles (kGBM rows x kGBN columns) is written: those outside [row0, row1) x [col0, col1) get 0.
// Programs: ceil((row1 - row0) / kGBM) row blocks x col_progs; program p takes row block
// p / col_progs and the column tiles p % col_progs, p % col_progs + col_progs, ... of the block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

#include "lse_kernels.h"  // DType

namespace infonce_cuda {

constexpr int kGBM = 128;  // rows of a G-kernel CTA: 4 warps x 32 (two m16 tiles per warp)
constexpr int kGBN = 64;   // columns of one of its tiles

struct PairGBlockParams {
  DType dtype = DType::kBFloat16;  // fp16 or bf16 only
  const void* a = nullptr;         // (M, d)
  const void* b = nullptr;         // (N, d)
  const float* scale = nullptr;    // one device scalar
  const float* r = nullptr;        // (M,)
  const float* t = nullptr;        // (N,)
  const float* g_r = nullptr;      // (M,)
  const float* g_t = nullptr;      // (N,)
  const float* gmax = nullptr;     // one device scalar, > 0 and finite
  int64_t M = 0, N = 0, d = 0;
  int64_t row0 = 0, row1 = 0, col0 = 0, col1 = 0;
  int64_t col_progs = 1;  // in [1, 65536]
  void* gblk = nullptr;  // input dtype, row stride ldg (even), 4-byte aligned; room for whole tiles
  int64_t ldg = 0;
  float* gs = nullptr;   // (pair_gblock_programs(p),)
};

// Programs (= partial sums written) of one launch.
inline int64_t pair_gblock_programs(const PairGBlockParams& p) {
  return (p.row1 - p.row0 + kGBM - 1) / kGBM * p.col_progs;
}

// Enqueues the G-kernel launch (nothing for an empty block); cudaErrorInvalidValue for a dtype
// other than fp16 / bf16, else cudaGetLastError() after the launch.
cudaError_t pair_gblock(const PairGBlockParams& p, cudaStream_t stream);

}  // namespace infonce_cuda
