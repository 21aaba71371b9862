// Launchers of the fp32 / fp64 SIMT kernels (simt_kernels.cuh): grid shapes, the label-rule
// instantiation (LBL) and the pass sequence of each backward. Exact in T: no normalisation by
// max |g| (unlike the fp16/bf16 path).
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"
#include "simt_kernels.cuh"

namespace infonce_cuda {
namespace {

template <typename T, int TM, bool LBL>
cudaError_t fwd_simt(const LseParams& p, cudaStream_t stream) {
  lse_fwd_simt_kernel<T, TM, LBL><<<dim3(static_cast<unsigned>(cdiv(p.M, 16 * TM))), kSimtThreads, 0, stream>>>(
      static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.scale), p.rows, p.M, p.N,
      p.d, static_cast<T*>(p.lse_out), p.dropped_out);
  return cudaGetLastError();
}

// One backward pass: X rows (nX) against Y columns (nY), output dX (nX, d); grid.y = output
// feature chunks of 16 TM.
template <typename T, int TM, int MODE, bool LBL>
cudaError_t bwd_simt_launch(const void* X, const void* Y, int64_t nX, int64_t nY, const LseParams& p,
                            const Sides<T>& sides, void* dX, T* partial, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(cdiv(nX, 16 * TM)), static_cast<unsigned>(cdiv(p.d, 16 * TM)));
  auto kern = has_threshold(sides) ? lse_bwd_simt_kernel<T, TM, MODE, LBL, true>
                                   : lse_bwd_simt_kernel<T, TM, MODE, LBL, false>;
  kern<<<grid, kSimtThreads, 0, stream>>>(
      static_cast<const T*>(X), static_cast<const T*>(Y), static_cast<const T*>(p.scale), sides, nX, nY, p.d,
      static_cast<T*>(dX), partial);
  return cudaGetLastError();
}

// Two-sided (kSym): the symmetric backward and lse_bwd_paired.
template <typename T, int TM, bool LBL>
cudaError_t two_sided_simt(const LseParams& p, const Sides<T>& sd, cudaStream_t stream) {
  T* partial = reinterpret_cast<T*>(static_cast<char*>(p.workspace) + kWsHeader);
  cudaError_t err = bwd_simt_launch<T, TM, kSym, LBL>(p.q, p.k, p.M, p.N, p, sd, p.dq, partial, stream);
  if (err != cudaSuccess) return err;
  return launch_sum_partials(partial, cdiv(p.M, 16 * TM), static_cast<T*>(p.dscale), stream);
}

// lse_bwd. kCol swaps X and Y: its Y rows are the queries q (the Sides' key side), its X rows k.
template <typename T, int TM, bool LBL>
cudaError_t bwd_simt(const LseParams& p, cudaStream_t stream) {
  if (p.symmetric) return two_sided_simt<T, TM, LBL>(p, symmetric_sides<T>(p), stream);
  const QuerySide<T> rows = query_side<T>(p.grad, p.lse, p.rows);
  T* partial = reinterpret_cast<T*>(static_cast<char*>(p.workspace) + kWsHeader);
  const QuerySide<T> none{};
  const Sides<T> row_term{rows, p.rows.key_labels, none, nullptr, 0};
  const Sides<T> col_term{none, nullptr, rows, p.rows.key_labels, 0};
  cudaError_t err = bwd_simt_launch<T, TM, kRow, LBL>(p.q, p.k, p.M, p.N, p, row_term, p.dq, partial, stream);
  if (err != cudaSuccess) return err;
  err = bwd_simt_launch<T, TM, kCol, LBL>(p.k, p.q, p.N, p.M, p, col_term, p.dk, nullptr, stream);
  if (err != cudaSuccess) return err;
  return launch_sum_partials(partial, cdiv(p.M, 16 * TM), static_cast<T*>(p.dscale), stream);
}

template <typename T, int TM>
cudaError_t fwd_any(const LseParams& p, cudaStream_t stream) {
  return p.rows.labelled() ? fwd_simt<T, TM, true>(p, stream) : fwd_simt<T, TM, false>(p, stream);
}

template <typename T, int TM>
cudaError_t bwd_any(const LseParams& p, cudaStream_t stream) {
  return p.rows.labelled() ? bwd_simt<T, TM, true>(p, stream) : bwd_simt<T, TM, false>(p, stream);
}

template <typename T, int TM>
cudaError_t paired_any(const LseParams& p, cudaStream_t stream) {
  return p.rows.labelled() ? two_sided_simt<T, TM, true>(p, paired_sides<T>(p), stream)
                           : two_sided_simt<T, TM, false>(p, paired_sides<T>(p), stream);
}

}  // namespace

cudaError_t forward_simt(const LseParams& p, cudaStream_t stream) {
  return p.dtype == DType::kFloat64 ? fwd_any<double, kTmF64>(p, stream) : fwd_any<float, kTmF32>(p, stream);
}

cudaError_t backward_simt(const LseParams& p, cudaStream_t stream) {
  return p.dtype == DType::kFloat64 ? bwd_any<double, kTmF64>(p, stream) : bwd_any<float, kTmF32>(p, stream);
}

cudaError_t backward_paired_simt(const LseParams& p, cudaStream_t stream) {
  return p.dtype == DType::kFloat64 ? paired_any<double, kTmF64>(p, stream) : paired_any<float, kTmF32>(p, stream);
}

}  // namespace infonce_cuda
