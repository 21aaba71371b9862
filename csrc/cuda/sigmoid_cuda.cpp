// infonce_kernels — CUDA implementation of the pairwise sigmoid ops _sigmoid_fwd / _sigmoid_bwd
// (schemas and the maths in csrc/ops.cpp; the contract of every backend in docs/design.md).
// Thin binding: check the arguments (each error names the argument), allocate the outputs and the
// workspace, set the device guard and launch the torch-free kernels (sigmoid_kernels.h) on the
// current stream.
#include "sigmoid_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "sigmoid_kernels.h"

namespace infonce_kernels {
namespace {

constexpr const char* kOp = "infonce_kernels::_sigmoid (cuda)";

infonce_cuda::DType sigmoid_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return infonce_cuda::DType::kFloat16;
    case at::kBFloat16: return infonce_cuda::DType::kBFloat16;
    case at::kFloat: return infonce_cuda::DType::kFloat32;
    case at::kDouble: return infonce_cuda::DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, kOp, ": x must be float16, bfloat16, float32 or float64, got ", t);
  }
}

// x, y, scale, bias, labels (and grad when defined) as the kernels need them; returns the label
// pair (undefined tensors when the offset rule applies).
std::pair<at::Tensor, at::Tensor> check_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                             const at::Tensor& bias, at::TensorList labels, const at::Tensor* grad) {
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, kOp, ": x and y must be 2-D, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK_TYPE(y.scalar_type() == x.scalar_type(), kOp, ": y must have x's dtype ", x.scalar_type(), ", got ",
                   y.scalar_type());
  sigmoid_dtype(x.scalar_type());
  TORCH_CHECK(y.device() == x.device(), kOp, ": y must be on x's device ", x.device(), ", got ", y.device());
  TORCH_CHECK(y.size(1) == x.size(1), kOp, ": x and y must have the same feature dimension, got ", x.size(1),
              " and ", y.size(1));
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= infonce_cuda::kMaxFeatureDim, kOp, ": feature dimension d = ",
              x.size(1), " outside the cuda backend's range [1, ", infonce_cuda::kMaxFeatureDim, "]");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), kOp, ": x and y must be contiguous");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{scale, "scale"}, {bias, "bias"}}) {
    TORCH_CHECK(t.dim() == 0, kOp, ": ", name, " must be a 0-d tensor, got shape ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == acc, kOp, ": ", name, " must be ", acc, ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), kOp, ": ", name, " must be on x's device ", x.device(), ", got ",
                t.device());
  }
  if (grad != nullptr) {
    TORCH_CHECK(grad->dim() == 1 && grad->size(0) == x.size(0), kOp, ": grad must have shape (", x.size(0),
                ",), got ", grad->sizes());
    TORCH_CHECK_TYPE(grad->scalar_type() == acc, kOp, ": grad must be ", acc, ", got ", grad->scalar_type());
    TORCH_CHECK(grad->device() == x.device() && grad->is_contiguous(), kOp,
                ": grad must be contiguous on x's device ", x.device());
  }
  TORCH_CHECK(labels.empty() || labels.size() == 2, kOp,
              ": labels must be [] or [row_labels, col_labels], got ", labels.size(), " tensors");
  if (labels.empty()) return {};
  const int64_t n[2] = {x.size(0), y.size(0)};
  const char* names[2] = {"row_labels", "col_labels"};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& l = labels[i];
    TORCH_CHECK_TYPE(l.scalar_type() == at::kLong, kOp, ": ", names[i], " must be int64, got ", l.scalar_type());
    TORCH_CHECK(l.dim() == 1 && l.size(0) == n[i], kOp, ": ", names[i], " must have shape (", n[i], ",), got ",
                l.sizes());
    TORCH_CHECK(l.device() == x.device() && l.is_contiguous(), kOp, ": ", names[i],
                " must be contiguous on x's device ", x.device());
  }
  return {labels[0], labels[1]};
}

infonce_cuda::SigmoidParams params(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                   const at::Tensor& bias, const std::pair<at::Tensor, at::Tensor>& lab,
                                   int64_t offset) {
  infonce_cuda::SigmoidParams p;
  p.dtype = sigmoid_dtype(x.scalar_type());
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.scale = scale.data_ptr();
  p.bias = bias.data_ptr();
  p.M = x.size(0);
  p.N = y.size(0);
  p.d = x.size(1);
  if (lab.first.defined()) {
    p.row_labels = lab.first.data_ptr<int64_t>();
    p.col_labels = lab.second.data_ptr<int64_t>();
  }
  p.offset = offset;
  return p;
}

// Gradient outputs (dx, dy, dscale, dbias) into p; returns them with the workspace kept alive.
std::vector<at::Tensor> gradient_outputs(infonce_cuda::SigmoidParams& p, const at::Tensor& x, const at::Tensor& y,
                                         const at::Tensor& scale, at::Tensor& workspace) {
  // dy, dscale, dbias zero-filled: with M == 0 the kernels write nothing and the answer is 0
  std::vector<at::Tensor> out = {at::empty_like(x), at::zeros_like(y), at::zeros_like(scale), at::zeros_like(scale)};
  p.dx = out[0].data_ptr();
  p.dy = out[1].data_ptr();
  p.dscale = out[2].data_ptr();
  p.dbias = out[3].data_ptr();
  workspace = at::empty({static_cast<int64_t>(infonce_cuda::sigmoid_workspace_bytes(p))}, x.options().dtype(at::kByte));
  p.workspace = workspace.data_ptr();
  return out;
}

void launch(const infonce_cuda::SigmoidParams& p, const at::Tensor& x) {
  C10_CUDA_CHECK(infonce_cuda::sigmoid_run(p, at::cuda::getCurrentCUDAStream(x.get_device()).stream()));
}

}  // namespace

std::vector<at::Tensor> sigmoid_forward_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                             const at::Tensor& bias, at::TensorList labels, int64_t offset,
                                             bool with_grad) {
  const auto lab = check_args(x, y, scale, bias, labels, nullptr);
  const c10::cuda::CUDAGuard guard(x.device());
  infonce_cuda::SigmoidParams p = params(x, y, scale, bias, lab, offset);
  at::Tensor rows = at::empty({x.size(0)}, scale.options());
  p.rows = rows.data_ptr();
  if (!with_grad) {
    launch(p, x);
    return {rows};
  }
  at::Tensor workspace;
  std::vector<at::Tensor> grads = gradient_outputs(p, x, y, scale, workspace);
  launch(p, x);
  return {rows, grads[0], grads[1], grads[2], grads[3]};
}

std::vector<at::Tensor> sigmoid_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                              const at::Tensor& scale, const at::Tensor& bias, at::TensorList labels,
                                              int64_t offset) {
  const auto lab = check_args(x, y, scale, bias, labels, &grad);
  const c10::cuda::CUDAGuard guard(x.device());
  infonce_cuda::SigmoidParams p = params(x, y, scale, bias, lab, offset);
  p.grad = grad.data_ptr();
  at::Tensor workspace;
  std::vector<at::Tensor> grads = gradient_outputs(p, x, y, scale, workspace);
  launch(p, x);
  return grads;
}

}  // namespace infonce_kernels
