// The CUDA implementations of the private ops (csrc/ops.cpp), on checked arguments
// (csrc/common/lse_args.h); registered in csrc/cuda/register_cuda.cpp.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "../common/lse_args.h"

namespace infonce_kernels {

at::Tensor lse_forward_cuda(const LseArgs& args);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_backward_cuda(const LseArgs& args);
std::tuple<at::Tensor, at::Tensor> lse_backward_paired_cuda(const LseArgs& args);

}  // namespace infonce_kernels
