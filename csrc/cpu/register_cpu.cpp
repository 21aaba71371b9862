// The CPU dispatch key of the private ops (schemas in csrc/ops.cpp): unpack and check the
// arguments once (csrc/common/lse_args.h), then run the kernels of csrc/cpu/lse_cpu.cpp.
#include <torch/library.h>

#include "lse_cpu.h"

namespace infonce_kernels {
namespace {

at::Tensor lse_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, const at::Tensor& exclude,
                   at::TensorList labels, bool symmetric) {
  return lse_forward_cpu(forward_args(q, k, scale, exclude, labels, symmetric));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_bwd(const at::Tensor& grad, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& scale,
                                                       const at::Tensor& exclude, at::TensorList labels,
                                                       bool symmetric, const at::Tensor& lse) {
  return lse_backward_cpu(backward_args(grad, q, k, scale, exclude, labels, symmetric, lse));
}

std::tuple<at::Tensor, at::Tensor> lse_bwd_paired(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& scale, const at::Tensor& exclude,
                                                  at::TensorList labels, const at::Tensor& lse,
                                                  at::TensorList key_side, int64_t row_offset) {
  return lse_backward_paired_cpu(paired_args(grad, q, k, scale, exclude, labels, lse, key_side, row_offset));
}

}  // namespace

TORCH_LIBRARY_IMPL(infonce_kernels, CPU, m) {
  m.impl("_lse_fwd", &lse_fwd);
  m.impl("_lse_bwd", &lse_bwd);
  m.impl("_lse_bwd_paired", &lse_bwd_paired);
}

}  // namespace infonce_kernels
