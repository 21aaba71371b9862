// Launchers of the fp16 / bf16 tensor-core kernels (mma_kernels.cuh): grid shapes, shared memory,
// the label-rule and threshold-rule instantiations (LBL, THR) and the pass sequence of each backward.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"
#include "mma_kernels.cuh"

namespace infonce_cuda {
namespace {

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Dynamic shared memory above the 48 KB default needs an opt-in per kernel (sm_80: up to 163 KB,
// sm_90: 227 KB per CTA).
template <typename Kernel>
cudaError_t allow_smem(Kernel kern, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
}

template <typename Tag, bool LBL, bool THR>
cudaError_t fwd_mma(const LseParams& p, cudaStream_t stream) {
  // vec: cp.async of 16-B chunks needs 16-B aligned rows (d % 8 == 0) and bases
  const bool vec = p.d % 8 == 0 && aligned16(p.q) && aligned16(p.k);
  // 69,632 B (d <= kDK) or 104,448 B dynamic (+ 1,024 B static sKL with labels)
  const size_t smem = fwd_mma_smem(p.d <= kDK);
  const dim3 grid(static_cast<unsigned>(cdiv(p.M, kFwdBM)));
  const auto* q = static_cast<const uint16_t*>(p.q);
  const auto* k = static_cast<const uint16_t*>(p.k);
  const auto* scale = static_cast<const float*>(p.scale);
  auto* lse = static_cast<float*>(p.lse_out);
  if (!LBL && !THR && vec && p.d <= kDK) {  // the resident kernel: the other cases compiled out
    auto kern = lse_fwd_resident_mma_kernel<Tag>;
    cudaError_t err = allow_smem(kern, smem);
    if (err != cudaSuccess) return err;
    kern<<<grid, kMmaThreads, smem, stream>>>(q, k, scale, p.rows, p.M, p.N, p.d, lse);
    return cudaGetLastError();
  }
  auto kern = lse_fwd_mma_kernel<Tag, LBL, THR>;
  cudaError_t err = allow_smem(kern, smem);
  if (err != cudaSuccess) return err;
  kern<<<grid, kMmaThreads, smem, stream>>>(q, k, scale, p.rows, p.M, p.N, p.d, vec, lse, p.dropped_out);
  return cudaGetLastError();
}

// The threshold-rule instantiation of the forward (THR only when the rows have thresholds).
template <typename Tag, bool LBL>
cudaError_t fwd_mma_rules(const LseParams& p, cudaStream_t stream) {
  return p.rows.thresholded() ? fwd_mma<Tag, LBL, true>(p, stream) : fwd_mma<Tag, LBL, false>(p, stream);
}

// Whether a backward pass of X against Y runs the resident kernel (no label or threshold rule,
// d <= kDK, 16-B aligned rows), and its rows per CTA (= dscale partials per kResBM / kBM rows).
bool bwd_resident(bool lbl, const Sides<float>& sides, const void* X, const void* Y, int64_t d) {
  return !lbl && !has_threshold(sides) && d % 8 == 0 && aligned16(X) && aligned16(Y) && d <= kDK;
}
int64_t bwd_row_blocks(bool resident, int64_t nX) { return cdiv(nX, resident ? kResBM : kBM); }

// One backward pass: X rows (nX) against Y columns (nY), output dX (nX, d).
template <typename Tag, int MODE, bool LBL>
cudaError_t bwd_mma_launch(const void* X, const void* Y, int64_t nX, int64_t nY, const LseParams& p,
                           const Sides<float>& sides, const float* gmax, void* dX, float* partial,
                           cudaStream_t stream) {
  const int64_t d = p.d;
  const auto* x = static_cast<const uint16_t*>(X);
  const auto* y = static_cast<const uint16_t*>(Y);
  const auto* scale = static_cast<const float*>(p.scale);
  auto* dx = static_cast<typename Tag::T*>(dX);
  if (bwd_resident(LBL, sides, X, Y, d)) {  // the resident kernel: 32 rows per warp, one program per row block
    auto kern = lse_bwd_resident_mma_kernel<Tag, MODE>;
    const size_t smem = bwd_res_mma_smem();  // 52,224 B
    cudaError_t err = allow_smem(kern, smem);
    if (err != cudaSuccess) return err;
    kern<<<dim3(static_cast<unsigned>(bwd_row_blocks(true, nX))), kMmaThreads, smem, stream>>>(
        x, y, scale, sides, nX, nY, d, gmax, dx, partial);
    return cudaGetLastError();
  }
  const bool vec = d % 8 == 0 && aligned16(X) && aligned16(Y);
  const bool thr = has_threshold(sides);
  const size_t smem = bwd_mma_smem(d <= kDK);  // 52,224 B (d <= kDK) or 104,448 B
  const dim3 grid(static_cast<unsigned>(bwd_row_blocks(false, nX)), static_cast<unsigned>(cdiv(d, kDV)));
  auto kern = thr ? lse_bwd_mma_kernel<Tag, MODE, LBL, true> : lse_bwd_mma_kernel<Tag, MODE, LBL, false>;
  cudaError_t err = allow_smem(kern, smem);
  if (err != cudaSuccess) return err;
  kern<<<grid, kMmaThreads, smem, stream>>>(x, y, scale, sides, nX, nY, d, vec, gmax, dx, partial);
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
  const int64_t blocks = bwd_row_blocks(bwd_resident(LBL, sd, p.q, p.k, p.d), p.M);
  return launch_sum_partials(partial, blocks, static_cast<float*>(p.dscale), stream);
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
  const int64_t blocks = bwd_row_blocks(bwd_resident(LBL, row_term, p.q, p.k, p.d), p.M);
  return launch_sum_partials(partial, blocks, static_cast<float*>(p.dscale), stream);
}

template <typename Tag>
cudaError_t paired_mma(const LseParams& p, cudaStream_t stream) {
  return p.rows.labelled() ? two_sided_mma<Tag, true>(p, paired_sides<float>(p), stream)
                           : two_sided_mma<Tag, false>(p, paired_sides<float>(p), stream);
}

}  // namespace

cudaError_t forward_mma(const LseParams& p, cudaStream_t stream) {
  const bool lbl = p.rows.labelled();
  if (p.dtype == DType::kFloat16)
    return lbl ? fwd_mma_rules<F16Tag, true>(p, stream) : fwd_mma_rules<F16Tag, false>(p, stream);
  return lbl ? fwd_mma_rules<BF16Tag, true>(p, stream) : fwd_mma_rules<BF16Tag, false>(p, stream);
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
