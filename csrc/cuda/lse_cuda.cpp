// infonce_kernels — CUDA implementation of the ops defined in csrc/ops.cpp:
//   lse_fwd(Tensor q, Tensor k, Tensor scale, Tensor exclude, Tensor row_labels,
//           Tensor key_labels, Tensor positive, bool symmetric) -> Tensor
//   lse_bwd(Tensor grad, Tensor q, Tensor k, Tensor scale, Tensor exclude, Tensor row_labels,
//           Tensor key_labels, Tensor positive, bool symmetric, Tensor lse)
//       -> (Tensor, Tensor, Tensor)
//   lse_bwd_paired(Tensor grad, Tensor q, Tensor k, Tensor scale, Tensor exclude,
//                  Tensor row_labels, Tensor key_labels, Tensor positive, Tensor lse,
//                  Tensor key_grad, Tensor key_lse, Tensor key_exclude, Tensor key_positive,
//                  int row_offset) -> (Tensor, Tensor)
// Thin binding: validate (every message names the argument), allocate outputs and workspace,
// set the device guard, launch the torch-free kernels (lse_kernels.cu) on the current stream.
// Shapes, dtypes, devices and the label tensors are checked by csrc/op_checks.h (shared with the
// CPU backend); this file adds only what the CUDA kernels need on top: CUDA tensors, contiguous
// storage (the kernels index raw pointers) and the feature-size limit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../op_checks.h"
#include "lse_kernels.h"

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

// dtype of scale, lse and grad: float64 for float64 inputs, else float32.
at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_contiguous(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Shared checks (op_checks.h) + the CUDA-specific ones. Returns whether the label rule is on.
bool check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& scale, const at::Tensor& exclude,
                  const at::Tensor& row_labels, const at::Tensor& key_labels,
                  const at::Tensor& positive, bool symmetric) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", q.device());
  infonce_kernels::check_lse_inputs(q, k, scale, exclude, symmetric);
  const bool labelled = infonce_kernels::check_lse_labels(q, k, row_labels, key_labels, positive);
  TORCH_CHECK(q.size(1) <= infonce_cuda::kMaxFeatureDim, op, ": q's feature dimension d = ",
              q.size(1), " exceeds the cuda backend's limit ", infonce_cuda::kMaxFeatureDim);
  check_contiguous(q, "q", op);
  check_contiguous(k, "k", op);
  check_contiguous(exclude, "exclude", op);
  if (labelled) {
    check_contiguous(row_labels, "row_labels", op);
    check_contiguous(key_labels, "key_labels", op);
    check_contiguous(positive, "positive", op);
  }
  return labelled;
}

const int64_t* exclude_ptr(const at::Tensor& exclude) {
  return exclude.numel() > 0 ? exclude.data_ptr<int64_t>() : nullptr;
}

// The label rule's three device pointers, all nullptr when it is off.
struct LabelPtrs {
  const int64_t* row = nullptr;
  const int64_t* key = nullptr;
  const int64_t* pos = nullptr;
};

LabelPtrs label_ptrs(bool labelled, const at::Tensor& row_labels, const at::Tensor& key_labels,
                     const at::Tensor& positive) {
  if (!labelled) return {};
  return {row_labels.data_ptr<int64_t>(), key_labels.data_ptr<int64_t>(),
          positive.data_ptr<int64_t>()};
}

at::Tensor lse_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                        const at::Tensor& exclude, const at::Tensor& row_labels,
                        const at::Tensor& key_labels, const at::Tensor& positive,
                        bool symmetric) {
  constexpr const char* op = "infonce_kernels::lse_fwd (cuda)";
  const bool labelled =
      check_inputs(op, q, k, scale, exclude, row_labels, key_labels, positive, symmetric);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor& kk = symmetric ? q : k;
  const int64_t M = q.size(0), N = kk.size(0), d = q.size(1), E = exclude.size(1);
  const LabelPtrs lab = label_ptrs(labelled, row_labels, key_labels, positive);
  at::Tensor lse = at::empty({M}, q.options().dtype(acc_dtype(q.scalar_type())));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  C10_CUDA_CHECK(infonce_cuda::lse_forward(kernel_dtype(q.scalar_type()), q.data_ptr(),
                                           kk.data_ptr(), scale.data_ptr(), exclude_ptr(exclude),
                                           lab.row, lab.key, lab.pos, M, N, d, E, lse.data_ptr(),
                                           stream));
  return lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& exclude, const at::Tensor& row_labels, const at::Tensor& key_labels,
    const at::Tensor& positive, bool symmetric, const at::Tensor& lse) {
  constexpr const char* op = "infonce_kernels::lse_bwd (cuda)";
  const bool labelled =
      check_inputs(op, q, k, scale, exclude, row_labels, key_labels, positive, symmetric);
  infonce_kernels::check_lse_grad_inputs(grad, q, lse);
  check_contiguous(grad, "grad", op);
  check_contiguous(lse, "lse", op);

  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor& kk = symmetric ? q : k;
  const int64_t M = q.size(0), N = kk.size(0), d = q.size(1), E = exclude.size(1);
  const auto dt = kernel_dtype(q.scalar_type());
  const LabelPtrs lab = label_ptrs(labelled, row_labels, key_labels, positive);

  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = symmetric ? q.new_empty({0}) : at::empty_like(k);
  at::Tensor dscale = at::empty({}, scale.options());
  const size_t ws_bytes = infonce_cuda::lse_backward_workspace_bytes(dt, M, N, d, symmetric);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  C10_CUDA_CHECK(infonce_cuda::lse_backward(
      dt, grad.data_ptr(), q.data_ptr(), kk.data_ptr(), scale.data_ptr(), exclude_ptr(exclude),
      lab.row, lab.key, lab.pos, M, N, d, E, symmetric, lse.data_ptr(), dq.data_ptr(),
      symmetric ? nullptr : dk.data_ptr(), dscale.data_ptr(), workspace.data_ptr(), stream));
  return std::make_tuple(dq, dk, dscale);
}

// The symmetric backward's two-sided kernels with the key side's own g / r / exclusions / positive
// and row_offset (lse_kernels.h, lse_backward_paired).
std::tuple<at::Tensor, at::Tensor> lse_bwd_paired_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& exclude, const at::Tensor& row_labels, const at::Tensor& key_labels,
    const at::Tensor& positive, const at::Tensor& lse, const at::Tensor& key_grad,
    const at::Tensor& key_lse, const at::Tensor& key_exclude, const at::Tensor& key_positive,
    int64_t row_offset) {
  constexpr const char* op = "infonce_kernels::lse_bwd_paired (cuda)";
  const bool labelled =
      check_inputs(op, q, k, scale, exclude, row_labels, key_labels, positive, false);
  infonce_kernels::check_lse_grad_inputs(grad, q, lse);
  infonce_kernels::check_key_side(k, key_grad, key_lse, key_exclude, key_positive, labelled,
                                  row_offset);
  check_contiguous(grad, "grad", op);
  check_contiguous(lse, "lse", op);
  check_contiguous(key_grad, "key_grad", op);
  check_contiguous(key_lse, "key_lse", op);
  check_contiguous(key_exclude, "key_exclude", op);
  if (labelled) check_contiguous(key_positive, "key_positive", op);

  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t M = q.size(0), N = k.size(0), d = q.size(1), E = exclude.size(1);
  const auto dt = kernel_dtype(q.scalar_type());
  const LabelPtrs lab = label_ptrs(labelled, row_labels, key_labels, positive);

  at::Tensor dq = at::empty_like(q);
  at::Tensor dscale = at::empty({}, scale.options());
  const size_t ws_bytes = infonce_cuda::lse_backward_workspace_bytes(dt, M, N, d, true);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  C10_CUDA_CHECK(infonce_cuda::lse_backward_paired(
      dt, grad.data_ptr(), q.data_ptr(), k.data_ptr(), scale.data_ptr(), exclude_ptr(exclude),
      lab.row, lab.key, lab.pos, M, N, d, E, lse.data_ptr(), key_grad.data_ptr(),
      key_lse.data_ptr(), exclude_ptr(key_exclude),
      labelled ? key_positive.data_ptr<int64_t>() : nullptr, key_exclude.size(1), row_offset,
      dq.data_ptr(), dscale.data_ptr(), workspace.data_ptr(), stream));
  return std::make_tuple(dq, dscale);
}

// The registered schemas (csrc/ops.cpp) pass the label rule and the paired key side as lists.
at::Tensor lse_fwd_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                       const at::Tensor& exclude, at::TensorList labels, bool symmetric) {
  const infonce_kernels::LabelTensors lab = infonce_kernels::unpack_labels(labels, q);
  return lse_fwd_cuda(q, k, scale, exclude, lab.row_labels, lab.key_labels, lab.positive, symmetric);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_bwd_cuda_op(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& exclude, at::TensorList labels, bool symmetric, const at::Tensor& lse) {
  const infonce_kernels::LabelTensors lab = infonce_kernels::unpack_labels(labels, q);
  return lse_bwd_cuda(grad, q, k, scale, exclude, lab.row_labels, lab.key_labels, lab.positive, symmetric, lse);
}

std::tuple<at::Tensor, at::Tensor> lse_bwd_paired_cuda_op(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& exclude, at::TensorList labels, const at::Tensor& lse, at::TensorList key_side,
    int64_t row_offset) {
  const infonce_kernels::LabelTensors lab = infonce_kernels::unpack_labels(labels, q);
  const infonce_kernels::KeySideTensors ks = infonce_kernels::unpack_key_side(key_side, k);
  return lse_bwd_paired_cuda(grad, q, k, scale, exclude, lab.row_labels, lab.key_labels, lab.positive, lse,
                           ks.grad, ks.lse, ks.exclude, ks.positive, row_offset);
}

}  // namespace

TORCH_LIBRARY_IMPL(infonce_kernels, CUDA, m) {
  m.impl("_lse_fwd", &lse_fwd_cuda_op);
  m.impl("_lse_bwd", &lse_bwd_cuda_op);
  m.impl("_lse_bwd_paired", &lse_bwd_paired_cuda_op);
}
