// infonce_kernels — CUDA kernels for the masked, scaled row log-sum-exp and its backward
// (docs/design.md, The primitive).
//
// Plain C++ launcher API: one LseParams struct of raw device pointers and sizes, and a
// cudaStream_t. No torch headers, so that this header and the .cu sources compile with plain nvcc
// (scripts/check_cuda_compile). The torch binding (lse_cuda.cpp) validates arguments, allocates
// outputs/workspace, sets the device guard and passes the current stream.
//
// Conventions (docs/design.md, The primitive):
//   q (M,d), k (N,d) row-major contiguous, dtype T in {fp16, bf16, fp32, fp64}.
//   scale: pointer to ONE device scalar, float (double when T = fp64); read by the kernels.
//   rows: the exclusion rule of the rows of q against the keys k (csrc/common/exclusion.h):
//     lists (M,E) int64, E in {0,1,2}, -1 = none (nullptr when E == 0); row_labels (M,),
//     key_labels (N,) int64, both nullptr when the label rule is off (a mix returns
//     cudaErrorInvalidValue); threshold (M,) float (double when T = fp64), nullptr when the
//     threshold rule is off; positive (M,) int64, non-null exactly when one of the two rules is
//     on; key_offset 0. symmetric:
//     key_labels is expected to be row_labels, but the kernels read both as given (W^T_ij = W_ji
//     uses row_labels[j], key_labels[i] and positive[j]).
//   lse / grad: (M,) float (double when T = fp64).
//   dq (M,d), dk (N,d) in T; dscale: one device scalar, float (double when T = fp64).
//   symmetric: k is q (only q is read); dq receives the whole gradient s*(W+W^T)q and dk is unused.
// Every function enqueues work on `stream` and returns cudaGetLastError() (launch errors only).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

#include "../common/exclusion.h"

namespace infonce_cuda {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Largest supported feature dimension (grid.y = ceil(d / 128) for the fp16/bf16 backward and
// ceil(d / 64) (fp32) / ceil(d / 32) (fp64) must stay <= 65535). Any d >= 1 up to this works.
constexpr int64_t kMaxFeatureDim = int64_t(32) * 65535;

// The one parameter struct of the launchers; each reads the fields its op needs.
struct LseParams {
  DType dtype = DType::kFloat32;
  const void* q = nullptr;      // (M, d)
  const void* k = nullptr;      // (N, d); q itself when symmetric
  const void* scale = nullptr;  // one device scalar
  int64_t M = 0, N = 0, d = 0;
  bool symmetric = false;
  infonce_kernels::ExclusionRule rows;  // the rows of q against the keys k
  // Backward: the row side's upstream gradient and forward output, (M,).
  const void* grad = nullptr;
  const void* lse = nullptr;
  // lse_backward_paired: the keys as rows, (N,) each, and their rule (lists (N, E) and
  // positive (N,) number the rows of q from keys.key_offset = row_offset; keys.row_labels are
  // the key labels, keys.key_labels the row labels).
  const void* key_grad = nullptr;
  const void* key_lse = nullptr;
  infonce_kernels::ExclusionRule keys;
  // Outputs and scratch.
  void* lse_out = nullptr;    // forward: (M,)
  int32_t* dropped_out = nullptr;  // forward with the threshold rule: (M,) keys it dropped per row
  void* dq = nullptr;         // (M, d)
  void* dk = nullptr;         // (N, d); unused when symmetric
  void* dscale = nullptr;     // one device scalar
  void* workspace = nullptr;  // lse_backward_workspace_bytes(p), 256-byte aligned
};

// lse_fwd: writes p.lse_out.
cudaError_t lse_forward(const LseParams& p, cudaStream_t stream);

// Bytes of device scratch memory lse_backward / lse_backward_paired need (>= 1).
size_t lse_backward_workspace_bytes(const LseParams& p);

// lse_bwd: writes p.dq, p.dk (unless symmetric) and p.dscale.
cudaError_t lse_backward(const LseParams& p, cudaStream_t stream);

// lse_bwd_paired (csrc/ops.cpp): the gradient on q when the keys are rows of a log-sum-exp too:
//   dq_i = s sum_j (W_ij + V_ji) k_j,  V_ji = h_j exp(s <q_i, k_j> - rho_j),
//   dscale = sum_ij W_ij <q_i, k_j>  (the row side's W only),
// with h = key_grad, rho = key_lse and V_ji = 0 where key j, as a row, excludes row i (p.keys;
// entries outside [row_offset, row_offset + M) exclude nothing; keys.positive is non-null exactly
// when the label rule is on). q and k may alias. Writes p.dq and p.dscale. With k = q and the key
// side equal to the row side (row_offset 0) this is exactly the symmetric lse_backward.
cudaError_t lse_backward_paired(const LseParams& p, cudaStream_t stream);

}  // namespace infonce_cuda
