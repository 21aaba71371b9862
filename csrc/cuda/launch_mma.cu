// Launchers of the fp16 / bf16 tensor-core kernels (mma_kernels.cuh): grid shapes, shared memory,
// the label-rule instantiation (LBL) and the pass sequence of each backward.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"
#include "mma_kernels.cuh"

namespace infonce_cuda {
namespace {

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename Tag, bool LBL>
cudaError_t fwd_mma(const LseParams& p, cudaStream_t stream) {
  const bool vec = p.d % 8 == 0 && aligned16(p.q) && aligned16(p.k);
  // 34,816 B dynamic (+ 512 B static sKL with labels): below the 48 KB default
  const size_t smem = 2 * kTileElems * sizeof(uint16_t);
  lse_fwd_mma_kernel<Tag, LBL><<<dim3(static_cast<unsigned>(cdiv(p.M, kBM))), kMmaThreads, smem, stream>>>(
      static_cast<const uint16_t*>(p.q), static_cast<const uint16_t*>(p.k), static_cast<const float*>(p.scale),
      p.rows, p.M, p.N, p.d, vec, static_cast<float*>(p.lse_out), p.dropped_out);
  return cudaGetLastError();
}

// One backward pass: X rows (nX) against Y columns (nY), output dX (nX, d).
template <typename Tag, int MODE, bool LBL>
cudaError_t bwd_mma_launch(const void* X, const void* Y, int64_t nX, int64_t nY, const LseParams& p,
                           const Sides<float>& sides, const float* gmax, void* dX, float* partial,
                           cudaStream_t stream) {
  const int64_t d = p.d;
  const bool vec = d % 8 == 0 && aligned16(X) && aligned16(Y);
  const bool need_v = d > kDK;
  const size_t smem = (need_v ? 3 : 2) * kTileElems * sizeof(uint16_t);  // 34,816 or 52,224 B
  auto kern = has_threshold(sides) ? lse_bwd_mma_kernel<Tag, MODE, LBL, true>
                                   : lse_bwd_mma_kernel<Tag, MODE, LBL, false>;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(cdiv(nX, kBM)), static_cast<unsigned>(cdiv(d, kDV)));
  kern<<<grid, kMmaThreads, smem, stream>>>(static_cast<const uint16_t*>(X), static_cast<const uint16_t*>(Y),
                                            static_cast<const float*>(p.scale), sides, nX, nY, d, vec, gmax,
                                            static_cast<typename Tag::T*>(dX), partial);
  return cudaGetLastError();
}

// Two-sided (kSym) dq = s (W + V^T) k and the row side's dscale: the symmetric backward (k is q,
// keys = rows) and lse_bwd_paired. gmax covers both sides' gradients (W' = (W + V^T) / gmax).
template <typename Tag, bool LBL>
cudaError_t two_sided_mma(const LseParams& p, const Sides<float>& sd, cudaStream_t stream) {
  float* gmax = static_cast<float*>(p.workspace);
  float* partial = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + kWsHeader);
  const bool same_grad = sd.keys.grad == sd.rows.grad && p.N <= p.M;  // symmetric: read g once
  cudaError_t err = launch_absmax(sd.rows.grad, p.M, sd.keys.grad, same_grad ? 0 : p.N, gmax, stream);
  if (err != cudaSuccess) return err;
  err = bwd_mma_launch<Tag, kSym, LBL>(p.q, p.k, p.M, p.N, p, sd, gmax, p.dq, partial, stream);
  if (err != cudaSuccess) return err;
  return launch_sum_partials(partial, cdiv(p.M, kBM), static_cast<float*>(p.dscale), stream);
}

// lse_bwd. kCol swaps X and Y: its Y rows are the queries q (passed as the Sides' key side), its
// X rows the keys k.
template <typename Tag, bool LBL>
cudaError_t bwd_mma(const LseParams& p, cudaStream_t stream) {
  if (p.symmetric) return two_sided_mma<Tag, LBL>(p, symmetric_sides<float>(p), stream);
  const QuerySide<float> rows = query_side<float>(p.grad, p.lse, p.rows);
  float* gmax = static_cast<float*>(p.workspace);
  float* partial = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + kWsHeader);
  const QuerySide<float> none{};
  const Sides<float> row_term{rows, p.rows.key_labels, none, nullptr, 0};
  const Sides<float> col_term{none, nullptr, rows, p.rows.key_labels, 0};
  cudaError_t err = bwd_mma_launch<Tag, kRow, LBL>(p.q, p.k, p.M, p.N, p, row_term, gmax, p.dq, partial, stream);
  if (err != cudaSuccess) return err;
  if ((err = launch_absmax(rows.grad, p.M, nullptr, 0, gmax, stream)) != cudaSuccess) return err;
  err = bwd_mma_launch<Tag, kCol, LBL>(p.k, p.q, p.N, p.M, p, col_term, gmax, p.dk, nullptr, stream);
  if (err != cudaSuccess) return err;
  return launch_sum_partials(partial, cdiv(p.M, kBM), static_cast<float*>(p.dscale), stream);
}

template <typename Tag>
cudaError_t paired_mma(const LseParams& p, cudaStream_t stream) {
  return p.rows.labelled() ? two_sided_mma<Tag, true>(p, paired_sides<float>(p), stream)
                           : two_sided_mma<Tag, false>(p, paired_sides<float>(p), stream);
}

}  // namespace

cudaError_t forward_mma(const LseParams& p, cudaStream_t stream) {
  const bool lbl = p.rows.labelled();
  if (p.dtype == DType::kFloat16) return lbl ? fwd_mma<F16Tag, true>(p, stream) : fwd_mma<F16Tag, false>(p, stream);
  return lbl ? fwd_mma<BF16Tag, true>(p, stream) : fwd_mma<BF16Tag, false>(p, stream);
}

cudaError_t backward_mma(const LseParams& p, cudaStream_t stream) {
  const bool lbl = p.rows.labelled();
  if (p.dtype == DType::kFloat16) return lbl ? bwd_mma<F16Tag, true>(p, stream) : bwd_mma<F16Tag, false>(p, stream);
  return lbl ? bwd_mma<BF16Tag, true>(p, stream) : bwd_mma<BF16Tag, false>(p, stream);
}

cudaError_t backward_paired_mma(const LseParams& p, cudaStream_t stream) {
  return p.dtype == DType::kFloat16 ? paired_mma<F16Tag>(p, stream) : paired_mma<BF16Tag>(p, stream);
}

}  // namespace infonce_cuda
