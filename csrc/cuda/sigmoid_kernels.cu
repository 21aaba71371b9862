// The public launcher of the pairwise sigmoid kernels (sigmoid_kernels.h): validate
// SigmoidParams, size the workspace, dispatch on the dtype (fp16 / bf16: sigmoid_launch_mma.cu,
// tensor cores; fp32 / fp64: sigmoid_launch_simt.cu, plain FMA). The call sequence:
// sigmoid_launch.cuh.
#include <cuda_runtime.h>

#include <cstdint>

#include "sigmoid_launch.cuh"

namespace infonce_cuda {

cudaError_t sigmoid_run_mma(const SigmoidParams& p, cudaStream_t stream);
cudaError_t sigmoid_run_simt(const SigmoidParams& p, cudaStream_t stream);

size_t sigmoid_workspace_bytes(const SigmoidParams& p) {
  const int64_t blocks = cdiv(p.M, sigmoid_block_rows(p.dtype)), chunks = cdiv(p.d, sigmoid_feature_chunk(p.dtype));
  const size_t acc = p.dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  return kWsHeader + static_cast<size_t>(blocks * (chunks + 1)) * acc;
}

cudaError_t sigmoid_run(const SigmoidParams& p, cudaStream_t stream) {
  const bool grads = p.dx != nullptr;
  if (p.x == nullptr || p.y == nullptr || p.scale == nullptr || p.bias == nullptr || p.M < 0 || p.N < 0 ||
      p.d < 1 || p.d > kMaxFeatureDim || (p.row_labels == nullptr) != (p.col_labels == nullptr) ||
      (grads && (p.dy == nullptr || p.dscale == nullptr || p.dbias == nullptr || p.workspace == nullptr)) ||
      (!grads && p.rows == nullptr))
    return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;  // nothing to write (the binding zero-fills dy, dscale, dbias)
  return sigmoid_is16(p.dtype) ? sigmoid_run_mma(p, stream) : sigmoid_run_simt(p, stream);
}

}  // namespace infonce_cuda
