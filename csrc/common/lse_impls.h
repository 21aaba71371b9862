// The implementations of the private ops (schemas in csrc/ops.cpp), one set per dispatch key, on
// arguments checked once (lse_args.h):
//   forward: (M,) r_i = log sum_{j not excluded} exp(s <q_i, k_j>), and the (M,) int32 count of
//            the keys the threshold rule dropped (zeros without it)     (_lse_fwd, _lse_fwd_counted)
//   backward: (dq, dk, dscale); dk is empty when symmetric, dq then the whole gradient  (_lse_bwd)
//   paired backward: (dq, dscale)                                                       (_lse_bwd_paired)
// CPU: csrc/cpu/lse_cpu.cpp. CUDA: csrc/cuda/lse_cuda.cpp, built only with the CUDA sources.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "lse_args.h"

namespace infonce_kernels {

std::tuple<at::Tensor, at::Tensor> lse_forward_cpu(const LseArgs& args);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_backward_cpu(const LseArgs& args);
std::tuple<at::Tensor, at::Tensor> lse_backward_paired_cpu(const LseArgs& args);

std::tuple<at::Tensor, at::Tensor> lse_forward_cuda(const LseArgs& args);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_backward_cuda(const LseArgs& args);
std::tuple<at::Tensor, at::Tensor> lse_backward_paired_cuda(const LseArgs& args);

}  // namespace infonce_kernels
