// infonce_kernels — CUDA implementation of the private ops (schemas in csrc/ops.cpp).
// Thin binding: on arguments already unpacked and checked by csrc/common/lse_args.h (shapes,
// dtypes, devices, the label tensors and the paired key side: the same checks as the CPU
// backend), add only what the CUDA kernels need on top (CUDA tensors, contiguous storage, since
// the kernels index raw pointers, and the feature-size limit), allocate outputs and workspace,
// set the device guard and launch the torch-free kernels (lse_kernels.h) on the current stream.
#include "../common/lse_impls.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "lse_kernels.h"

namespace infonce_kernels {
namespace {

infonce_cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return infonce_cuda::DType::kFloat16;
    case at::kBFloat16: return infonce_cuda::DType::kBFloat16;
    case at::kFloat: return infonce_cuda::DType::kFloat32;
    case at::kDouble: return infonce_cuda::DType::kFloat64;
    default: TORCH_CHECK(false, "infonce_kernels (cuda): unsupported q dtype ", t);
  }
}

void check_contiguous(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The CUDA-specific checks on top of lse_args.h's.
void check_cuda_args(const LseArgs& a, const char* op) {
  TORCH_CHECK(a.q.is_cuda(), op, ": q must be a CUDA tensor, got device ", a.q.device());
  TORCH_CHECK(a.q.size(1) <= infonce_cuda::kMaxFeatureDim, op, ": q's feature dimension d = ", a.q.size(1),
              " exceeds the cuda backend's limit ", infonce_cuda::kMaxFeatureDim);
  check_contiguous(a.q, "q", op);
  check_contiguous(a.k, "k", op);
  check_contiguous(a.exclude, "exclude", op);
  if (a.labelled) {
    check_contiguous(a.labels.row_labels, "row_labels", op);
    check_contiguous(a.labels.key_labels, "key_labels", op);
  }
  if (a.labelled || a.thresholded) check_contiguous(a.labels.positive, "positive", op);
  if (a.thresholded) check_contiguous(a.labels.threshold, "threshold", op);
  if (a.grad.defined()) {
    check_contiguous(a.grad, "grad", op);
    check_contiguous(a.lse, "lse", op);
  }
  if (a.paired) {
    check_contiguous(a.key_side.grad, "key_grad", op);
    check_contiguous(a.key_side.lse, "key_lse", op);
    check_contiguous(a.key_side.exclude, "key_exclude", op);
    if (a.labelled || a.key_thresholded) check_contiguous(a.key_side.positive, "key_positive", op);
    if (a.key_thresholded) check_contiguous(a.key_side.threshold, "key_threshold", op);
  }
}

// The launchers' LseParams from the op's arguments (inputs only; the caller sets the outputs).
infonce_cuda::LseParams launch_params(const LseArgs& a) {
  infonce_cuda::LseParams p;
  p.dtype = kernel_dtype(a.q.scalar_type());
  p.q = a.q.data_ptr();
  p.k = a.k.data_ptr();
  p.scale = a.scale.data_ptr();
  p.M = a.M();
  p.N = a.N();
  p.d = a.q.size(1);
  p.symmetric = a.symmetric;
  p.rows = a.row_rule();
  if (a.grad.defined()) {
    p.grad = a.grad.data_ptr();
    p.lse = a.lse.data_ptr();
  }
  if (a.paired) {
    p.key_grad = a.key_side.grad.data_ptr();
    p.key_lse = a.key_side.lse.data_ptr();
    p.keys = a.key_rule();
  }
  return p;
}

cudaStream_t current_stream(const at::Tensor& q) { return c10::cuda::getCurrentCUDAStream(q.get_device()).stream(); }

at::Tensor workspace_for(const infonce_cuda::LseParams& p, const at::Tensor& q) {
  const size_t bytes = infonce_cuda::lse_backward_workspace_bytes(p);
  return at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lse_forward_cuda(const LseArgs& a) {
  check_cuda_args(a, "infonce_kernels::_lse_fwd (cuda)");
  const c10::cuda::CUDAGuard guard(a.q.device());
  infonce_cuda::LseParams p = launch_params(a);
  at::Tensor lse = at::empty({a.M()}, a.scale.options());  // float32, float64 for float64 inputs
  at::Tensor dropped = at::zeros({a.M()}, a.q.options().dtype(at::kInt));  // the threshold rule's count
  p.lse_out = lse.data_ptr();
  if (a.thresholded) p.dropped_out = dropped.data_ptr<int32_t>();
  C10_CUDA_CHECK(infonce_cuda::lse_forward(p, current_stream(a.q)));
  return {lse, dropped};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_backward_cuda(const LseArgs& a) {
  check_cuda_args(a, "infonce_kernels::_lse_bwd (cuda)");
  const c10::cuda::CUDAGuard guard(a.q.device());
  infonce_cuda::LseParams p = launch_params(a);
  at::Tensor dq = at::empty_like(a.q);
  at::Tensor dk = a.symmetric ? a.q.new_empty({0}) : at::empty_like(a.k);
  at::Tensor dscale = at::empty({}, a.scale.options());
  at::Tensor workspace = workspace_for(p, a.q);
  p.dq = dq.data_ptr();
  p.dk = a.symmetric ? nullptr : dk.data_ptr();
  p.dscale = dscale.data_ptr();
  p.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(infonce_cuda::lse_backward(p, current_stream(a.q)));
  return std::make_tuple(dq, dk, dscale);
}

// The symmetric backward's two-sided kernels with the key side's own g / r / exclusions /
// positive and row_offset (lse_kernels.h, lse_backward_paired).
std::tuple<at::Tensor, at::Tensor> lse_backward_paired_cuda(const LseArgs& a) {
  check_cuda_args(a, "infonce_kernels::_lse_bwd_paired (cuda)");
  const c10::cuda::CUDAGuard guard(a.q.device());
  infonce_cuda::LseParams p = launch_params(a);
  at::Tensor dq = at::empty_like(a.q);
  at::Tensor dscale = at::empty({}, a.scale.options());
  at::Tensor workspace = workspace_for(p, a.q);
  p.dq = dq.data_ptr();
  p.dscale = dscale.data_ptr();
  p.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(infonce_cuda::lse_backward_paired(p, current_stream(a.q)));
  return std::make_tuple(dq, dscale);
}

}  // namespace infonce_kernels
