// The CUDA implementations of the pairwise sigmoid ops (schemas in csrc/ops.cpp), registered by
// register_sigmoid_cuda.cpp; defined in sigmoid_cuda.cpp.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace infonce_kernels {

// _sigmoid_fwd: (rows,) or, with_grad, (rows, dx, dy, dscale, dbias) for a unit upstream gradient.
std::vector<at::Tensor> sigmoid_forward_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                             const at::Tensor& bias, at::TensorList labels, int64_t offset,
                                             bool with_grad);

// _sigmoid_bwd: (dx, dy, dscale, dbias) for the upstream gradient grad (M,) of the loss rows.
std::vector<at::Tensor> sigmoid_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                              const at::Tensor& scale, const at::Tensor& bias, at::TensorList labels,
                                              int64_t offset);

}  // namespace infonce_kernels
