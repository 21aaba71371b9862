// The CPU kernels of the private ops (csrc/ops.cpp), on checked arguments (csrc/common/lse_args.h).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "../common/lse_args.h"

namespace infonce_kernels {

// _lse_fwd: (M,) r_i = log sum_{j not excluded} exp(s <q_i, k_j>).
at::Tensor lse_forward_cpu(const LseArgs& args);
// _lse_bwd: (dq, dk, dscale); dk is empty when symmetric (dq is then the whole gradient).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_backward_cpu(const LseArgs& args);
// _lse_bwd_paired: (dq, dscale).
std::tuple<at::Tensor, at::Tensor> lse_backward_paired_cpu(const LseArgs& args);

}  // namespace infonce_kernels
