// Launches of the fp16 / bf16 pairwise sigmoid sweeps (sigmoid_mma.cuh): grid, shared memory, and
// the call sequence of sigmoid_launch.cuh.
#include "sigmoid_launch.cuh"
#include "sigmoid_mma.cuh"

namespace infonce_cuda {
namespace {

template <typename Tag>
struct MmaFamily {
  using A = float;
  template <int KIND, bool LBL>
  static cudaError_t launch(const Sweep<float>& s, cudaStream_t stream) {
    if (s.n_own == 0) return cudaSuccess;  // an empty grid is a launch error
    const bool need_v = KIND != kLossOnly && s.d > kDK;
    const size_t smem = (need_v ? 3 : 2) * kTileElems * sizeof(uint16_t);  // 34,816 or 52,224 B
    auto kern = sigmoid_sweep_mma_kernel<Tag, KIND, LBL>;
    if (smem > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
    }
    const unsigned chunks = KIND == kLossOnly ? 1u : static_cast<unsigned>(cdiv(s.d, kDV));
    kern<<<dim3(static_cast<unsigned>(cdiv(s.n_own, kBM)), chunks), kMmaThreads, smem, stream>>>(s);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t sigmoid_run_mma(const SigmoidParams& p, cudaStream_t stream) {
  return p.dtype == DType::kFloat16 ? sigmoid_calls<MmaFamily<F16Tag>>(p, stream)
                                    : sigmoid_calls<MmaFamily<BF16Tag>>(p, stream);
}

}  // namespace infonce_cuda
