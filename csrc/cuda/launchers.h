// Internal entry points of the CUDA launchers, one per kernel family (dtype already dispatched
// by lse_kernels.cu, the arguments already validated there).
#pragma once

#include <cstdint>

#include "lse_kernels.h"

namespace infonce_cuda {

// fp16 / bf16, tensor cores (launch_mma.cu)
cudaError_t forward_mma(const LseParams& p, cudaStream_t stream);
cudaError_t backward_mma(const LseParams& p, cudaStream_t stream);
cudaError_t backward_paired_mma(const LseParams& p, cudaStream_t stream);

// fp32 / fp64, SIMT (launch_simt.cu)
cudaError_t forward_simt(const LseParams& p, cudaStream_t stream);
cudaError_t backward_simt(const LseParams& p, cudaStream_t stream);
cudaError_t backward_paired_simt(const LseParams& p, cudaStream_t stream);

// Reductions (reduce.cu): out = max(max_i |g_i|, max_j |h_j|) (nh = 0: g only), and the
// deterministic sum of n partials (fixed order, in double).
cudaError_t launch_absmax(const float* g, int64_t n, const float* h, int64_t nh, float* out, cudaStream_t stream);
template <typename T>
cudaError_t launch_sum_partials(const T* partial, int64_t n, T* out, cudaStream_t stream);

}  // namespace infonce_cuda
