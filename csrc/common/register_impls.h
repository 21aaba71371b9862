// The op bodies every dispatch key registers for the private ops (schemas in csrc/ops.cpp): unpack
// and check the arguments once (lse_args.h), then call the backend's implementation on LseArgs.
// Each dispatch key's registration file (csrc/cpu/register_cpu.cpp, csrc/cuda/register_cuda.cpp)
// is then one line per op.
#pragma once
#include <torch/library.h>

#include <tuple>

#include "lse_args.h"

namespace infonce_kernels {

using ForwardImpl = std::tuple<at::Tensor, at::Tensor> (*)(const LseArgs&);
using BackwardImpl = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const LseArgs&);
using PairedImpl = std::tuple<at::Tensor, at::Tensor> (*)(const LseArgs&);

template <ForwardImpl Forward, BackwardImpl Backward, PairedImpl Paired>
struct OpImpls {
  static at::Tensor lse_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                            const at::Tensor& exclude, at::TensorList labels, bool symmetric) {
    return std::get<0>(Forward(forward_args(q, k, scale, exclude, labels, symmetric)));
  }

  static std::tuple<at::Tensor, at::Tensor> lse_fwd_counted(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& scale, const at::Tensor& exclude,
                                                            at::TensorList labels, bool symmetric) {
    return Forward(forward_args(q, k, scale, exclude, labels, symmetric));
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_bwd(const at::Tensor& grad, const at::Tensor& q,
                                                                const at::Tensor& k, const at::Tensor& scale,
                                                                const at::Tensor& exclude, at::TensorList labels,
                                                                bool symmetric, const at::Tensor& lse) {
    return Backward(backward_args(grad, q, k, scale, exclude, labels, symmetric, lse));
  }

  static std::tuple<at::Tensor, at::Tensor> lse_bwd_paired(const at::Tensor& grad, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& scale,
                                                           const at::Tensor& exclude, at::TensorList labels,
                                                           const at::Tensor& lse, at::TensorList key_side,
                                                           int64_t row_offset) {
    return Paired(paired_args(grad, q, k, scale, exclude, labels, lse, key_side, row_offset));
  }

  static void register_all(torch::Library& m) {
    m.impl("_lse_fwd", &lse_fwd);
    m.impl("_lse_fwd_counted", &lse_fwd_counted);
    m.impl("_lse_bwd", &lse_bwd);
    m.impl("_lse_bwd_paired", &lse_bwd_paired);
  }
};

}  // namespace infonce_kernels
