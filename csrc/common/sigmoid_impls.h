// The implementations of the pairwise sigmoid ops (schemas and maths in csrc/ops.cpp), one pair
// per dispatch key, on arguments checked once (sigmoid_args.h), and the op bodies each dispatch
// key registers (SigmoidOpImpls::register_all: one line per registration file).
//   forward:  [rows] or, with_grad, [rows, dx, dy, dscale, dbias] for a unit upstream gradient
//   backward: [dx, dy, dscale, dbias] for the upstream gradient args.grad
// CPU: csrc/cpu/sigmoid_cpu.cpp. CUDA: csrc/cuda/sigmoid_cuda.cpp, built only with the CUDA sources.
#pragma once
#include <torch/library.h>

#include <vector>

#include "sigmoid_args.h"

namespace infonce_kernels {

std::vector<at::Tensor> sigmoid_forward_cpu(const SigmoidArgs& args, bool with_grad);
std::vector<at::Tensor> sigmoid_backward_cpu(const SigmoidArgs& args);
std::vector<at::Tensor> sigmoid_forward_cuda(const SigmoidArgs& args, bool with_grad);
std::vector<at::Tensor> sigmoid_backward_cuda(const SigmoidArgs& args);

using SigmoidForwardImpl = std::vector<at::Tensor> (*)(const SigmoidArgs&, bool);
using SigmoidBackwardImpl = std::vector<at::Tensor> (*)(const SigmoidArgs&);

template <SigmoidForwardImpl Forward, SigmoidBackwardImpl Backward>
struct SigmoidOpImpls {
  static std::vector<at::Tensor> fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                     const at::Tensor& bias, at::TensorList labels, int64_t offset, bool with_grad) {
    return Forward(sigmoid_forward_args(x, y, scale, bias, labels, offset), with_grad);
  }

  static std::vector<at::Tensor> bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                     const at::Tensor& scale, const at::Tensor& bias, at::TensorList labels,
                                     int64_t offset) {
    return Backward(sigmoid_backward_args(grad, x, y, scale, bias, labels, offset));
  }

  static void register_all(torch::Library& m) {
    m.impl("_sigmoid_fwd", &fwd);
    m.impl("_sigmoid_bwd", &bwd);
  }
};

}  // namespace infonce_kernels
