// Launches of the fp32 / fp64 pairwise sigmoid sweeps (sigmoid_simt.cuh): grid, and the call
// sequence of sigmoid_launch.cuh.
#include "sigmoid_launch.cuh"
#include "sigmoid_simt.cuh"

namespace infonce_cuda {
namespace {

template <typename T, int TM>
struct SimtFamily {
  using A = T;
  template <int KIND, bool LBL>
  static cudaError_t launch(const Sweep<T>& s, cudaStream_t stream) {
    if (s.n_own == 0) return cudaSuccess;  // an empty grid is a launch error
    const unsigned chunks = KIND == kLossOnly ? 1u : static_cast<unsigned>(cdiv(s.d, 16 * TM));
    sigmoid_sweep_simt_kernel<T, TM, KIND, LBL>
        <<<dim3(static_cast<unsigned>(cdiv(s.n_own, 16 * TM)), chunks), kSimtThreads, 0, stream>>>(s);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t sigmoid_run_simt(const SigmoidParams& p, cudaStream_t stream) {
  return p.dtype == DType::kFloat64 ? sigmoid_calls<SimtFamily<double, kTmF64>>(p, stream)
                                    : sigmoid_calls<SimtFamily<float, kTmF32>>(p, stream);
}

}  // namespace infonce_cuda
