// The CUDA dispatch key of the private ops (schemas in csrc/ops.cpp): the binding of
// csrc/cuda/lse_cuda.cpp and csrc/cuda/sigmoid_cuda.cpp behind the shared argument checks
// (csrc/common/register_impls.h, csrc/common/sigmoid_impls.h), and CLIP's CUDA-only G-block op
// (csrc/cuda/pair_gblock_cuda.cpp).
#include "../common/register_impls.h"
#include "../common/lse_impls.h"
#include "../common/pair_gblock_impls.h"
#include "../common/sigmoid_impls.h"

namespace infonce_kernels {

TORCH_LIBRARY_IMPL(infonce_kernels, CUDA, m) {
  OpImpls<lse_forward_cuda, lse_backward_cuda, lse_backward_paired_cuda>::register_all(m);
  SigmoidOpImpls<sigmoid_forward_cuda, sigmoid_backward_cuda>::register_all(m);
  m.impl("_lse_pair_gblock", &lse_pair_gblock_cuda);
}

}  // namespace infonce_kernels
