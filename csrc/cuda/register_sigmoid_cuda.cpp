// The CUDA dispatch key of the pairwise sigmoid ops (schemas in csrc/ops.cpp): the binding of
// csrc/cuda/sigmoid_cuda.cpp.
#include <torch/library.h>

#include "sigmoid_cuda.h"

namespace infonce_kernels {

TORCH_LIBRARY_IMPL(infonce_kernels, CUDA, m) {
  m.impl("_sigmoid_fwd", &sigmoid_forward_cuda);
  m.impl("_sigmoid_bwd", &sigmoid_backward_cuda);
}

}  // namespace infonce_kernels
