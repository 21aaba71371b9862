// The call sequence of the pairwise sigmoid op for one kernel family (included by
// sigmoid_launch_mma.cu and sigmoid_launch_simt.cu, one translation unit per family so that nvcc
// compiles them in parallel):
//   rows only:   row sweep kLossOnly;
//   gradients:   [max |g|, fp16 / bf16 with g], row sweep (kLossGrad or kRowGrad: dx and the
//                partials), column sweep kColGrad (dy), then the fixed-order sums of the
//                dscale / dbias partials (reduce.cu, in double: deterministic).
// Workspace: [0, 4) max |g| (float); from kWsHeader: the dscale partials (row blocks x feature
// chunks), then the dbias partials (row blocks), in the accumulation type.
// A Family provides A (the accumulation type) and launch<KIND, LBL>(Sweep<A>, stream).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"
#include "sigmoid_kernels.h"
#include "sigmoid_sweep.cuh"
#include "tile_sizes.cuh"

namespace infonce_cuda {

inline bool sigmoid_is16(DType t) { return t == DType::kFloat16 || t == DType::kBFloat16; }

// Rows per CTA and output features per chunk of each family.
inline int64_t sigmoid_block_rows(DType t) {
  return sigmoid_is16(t) ? kBM : 16 * (t == DType::kFloat64 ? kTmF64 : kTmF32);
}
inline int64_t sigmoid_feature_chunk(DType t) {
  return sigmoid_is16(t) ? kDV : 16 * (t == DType::kFloat64 ? kTmF64 : kTmF32);
}

// No pair is positive outside offset in (-rows, cols): clamping keeps every tile's delta an int.
inline int64_t sigmoid_clamp_offset(int64_t off, int64_t rows, int64_t cols) {
  return off < -rows - 1 ? -rows - 1 : (off > cols + 1 ? cols + 1 : off);
}

template <typename A>
Sweep<A> make_sweep(const SigmoidParams& p, bool row_sweep, A* loss, void* dout, A* dt_part, A* db_part,
                    const float* gmax) {
  Sweep<A> s{};
  s.own = row_sweep ? p.x : p.y;
  s.other = row_sweep ? p.y : p.x;
  s.scale = static_cast<const A*>(p.scale);
  s.bias = static_cast<const A*>(p.bias);
  s.own_labels = row_sweep ? p.row_labels : p.col_labels;
  s.other_labels = row_sweep ? p.col_labels : p.row_labels;
  s.g = static_cast<const A*>(p.grad);
  s.gmax = gmax;
  s.n_own = row_sweep ? p.M : p.N;
  s.n_other = row_sweep ? p.N : p.M;
  s.d = p.d;
  s.off = row_sweep ? sigmoid_clamp_offset(p.offset, p.M, p.N) : sigmoid_clamp_offset(-p.offset, p.N, p.M);
  s.vec = p.d % 8 == 0 && (reinterpret_cast<uintptr_t>(p.x) & 15u) == 0 && (reinterpret_cast<uintptr_t>(p.y) & 15u) == 0;
  s.loss = loss;
  s.dout = dout;
  s.dt_part = dt_part;
  s.db_part = db_part;
  return s;
}

template <typename Family, bool LBL>
cudaError_t sigmoid_calls(const SigmoidParams& p, cudaStream_t stream) {
  using A = typename Family::A;
  A* rows = static_cast<A*>(p.rows);
  if (p.dx == nullptr) return Family::template launch<kLossOnly, LBL>(make_sweep<A>(p, true, rows, nullptr, nullptr, nullptr, nullptr),
                                                               stream);

  char* ws = static_cast<char*>(p.workspace);
  const int64_t blocks = cdiv(p.M, sigmoid_block_rows(p.dtype)),
                chunks = cdiv(p.d, sigmoid_feature_chunk(p.dtype));
  A* dt_part = reinterpret_cast<A*>(ws + kWsHeader);
  A* db_part = dt_part + blocks * chunks;
  const float* gmax = nullptr;
  cudaError_t err = cudaSuccess;
  if (sigmoid_is16(p.dtype) && p.grad != nullptr) {
    gmax = reinterpret_cast<const float*>(ws);
    err = launch_absmax(static_cast<const float*>(p.grad), p.M, nullptr, 0, reinterpret_cast<float*>(ws), stream);
    if (err != cudaSuccess) return err;
  }
  const Sweep<A> row = make_sweep<A>(p, true, rows, p.dx, dt_part, db_part, nullptr);
  err = rows != nullptr ? Family::template launch<kLossGrad, LBL>(row, stream)
                        : Family::template launch<kRowGrad, LBL>(row, stream);
  if (err != cudaSuccess) return err;
  err = Family::template launch<kColGrad, LBL>(make_sweep<A>(p, false, nullptr, p.dy, nullptr, nullptr, gmax), stream);
  if (err != cudaSuccess) return err;
  err = launch_sum_partials(dt_part, blocks * chunks, static_cast<A*>(p.dscale), stream);
  if (err != cudaSuccess) return err;
  return launch_sum_partials(db_part, blocks, static_cast<A*>(p.dbias), stream);
}

template <typename Family>
cudaError_t sigmoid_calls(const SigmoidParams& p, cudaStream_t stream) {
  return p.row_labels != nullptr ? sigmoid_calls<Family, true>(p, stream) : sigmoid_calls<Family, false>(p, stream);
}

}  // namespace infonce_cuda
