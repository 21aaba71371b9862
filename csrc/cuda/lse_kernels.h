// infonce_kernels — CUDA kernels for the masked, scaled row log-sum-exp (DESIGN.md §1).
//
// Plain C++ launcher API: raw device pointers, sizes and a cudaStream_t. No torch headers, so
// that this header and lse_kernels.cu compile with plain nvcc (scripts/check_cuda_compile).
// The torch binding (lse_cuda.cpp) validates arguments, allocates outputs/workspace, sets the
// device guard and passes the current stream.
//
// Conventions (see /work/notes/contract.md):
//   q (M,d), k (N,d) row-major contiguous, dtype T in {fp16, bf16, fp32, fp64}.
//   scale: pointer to ONE device scalar, float (double when T = fp64); read by the kernels.
//   exclude: (M,E) int64 row-major, E in {0,1,2}, -1 = none (may be nullptr when E == 0).
//   row_labels (M,), key_labels (N,), positive (M,): int64, the label rule; all three nullptr
//     when it is off (a mix of nullptr and non-null returns cudaErrorInvalidValue). With them,
//     pair (i, j) is also excluded when row_labels[i] == key_labels[j] and positive[i] != j
//     (positive -1 = none). symmetric: key_labels is expected to be row_labels, but the kernels
//     read both as given (W^T_ij = W_ji uses row_labels[j], key_labels[i] and positive[j]).
//   lse / grad: (M,) float (double when T = fp64).
//   dq (M,d), dk (N,d) in T; dscale: one device scalar, float (double when T = fp64).
//   symmetric: k is q (only q is read); dq receives the whole gradient s*(W+W^T)q and dk is unused.
// Every function enqueues work on `stream` and returns cudaGetLastError() (launch errors only).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace infonce_cuda {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Largest supported feature dimension (grid.y = ceil(d / 128) for the fp16/bf16 backward and
// ceil(d / 64) (fp32) / ceil(d / 32) (fp64) must stay <= 65535). Any d >= 1 up to this works.
constexpr int64_t kMaxFeatureDim = int64_t(32) * 65535;

cudaError_t lse_forward(DType dtype, const void* q, const void* k, const void* scale,
                        const int64_t* exclude, const int64_t* row_labels,
                        const int64_t* key_labels, const int64_t* positive, int64_t M, int64_t N,
                        int64_t d, int64_t E, void* lse, cudaStream_t stream);

// Bytes of device scratch memory lse_backward needs (>= 1; 256-byte aligned pointer expected).
size_t lse_backward_workspace_bytes(DType dtype, int64_t M, int64_t N, int64_t d, bool symmetric);

cudaError_t lse_backward(DType dtype, const void* grad, const void* q, const void* k,
                         const void* scale, const int64_t* exclude, const int64_t* row_labels,
                         const int64_t* key_labels, const int64_t* positive, int64_t M, int64_t N,
                         int64_t d, int64_t E, bool symmetric, const void* lse, void* dq, void* dk,
                         void* dscale, void* workspace, cudaStream_t stream);

// lse_bwd_paired (csrc/ops.cpp): the gradient on q when the keys are rows of a log-sum-exp too:
//   dq_i = s sum_j (W_ij + V_ji) k_j,  V_ji = h_j exp(s <q_i, k_j> - rho_j),
//   dscale = sum_ij W_ij <q_i, k_j>  (the row side's W only).
// q (M,d) and k (N,d) (read only; they may alias); grad, lse, exclude (M,E), row_labels,
// key_labels, positive: the row side as in lse_backward. The key side: key_grad = h and
// key_lse = rho (N,) float (double when T = fp64); key_exclude (N, key_E), key_E in {0,1,2}
// (nullptr when key_E == 0) and key_positive (N,) number the rows of q from row_offset >= 0
// (row i is i + row_offset; entries outside [row_offset, row_offset + M) exclude nothing);
// key_positive is non-null exactly when the label rule is on. With labels, V_ji = 0 where
// key_labels[j] == row_labels[i] && key_positive[j] != i + row_offset.
// dq (M,d) in T; dscale: one device scalar. Workspace: lse_backward_workspace_bytes(dtype, M, N,
// d, true). With k = q and the key side equal to the row side (row_offset 0) this is exactly the
// symmetric lse_backward.
cudaError_t lse_backward_paired(DType dtype, const void* grad, const void* q, const void* k,
                                const void* scale, const int64_t* exclude,
                                const int64_t* row_labels, const int64_t* key_labels,
                                const int64_t* positive, int64_t M, int64_t N, int64_t d,
                                int64_t E, const void* lse, const void* key_grad,
                                const void* key_lse, const int64_t* key_exclude,
                                const int64_t* key_positive, int64_t key_E, int64_t row_offset,
                                void* dq, void* dscale, void* workspace, cudaStream_t stream);

}  // namespace infonce_cuda
