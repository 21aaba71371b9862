// infonce_kernels — CUDA implementation of the pairwise sigmoid ops _sigmoid_fwd / _sigmoid_bwd
// (schemas and the maths in csrc/ops.cpp; the contract of every backend in docs/design.md).
// Thin binding, on arguments the shared checks (csrc/common/sigmoid_args.h) passed: the CUDA-only
// checks, then allocate the outputs and the workspace, set the device guard and launch the
// torch-free kernels (sigmoid_kernels.h) on the current stream.
#include "../common/sigmoid_impls.h"

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

// What the CUDA kernels need beyond the checks every dispatch key shares (sigmoid_args.h).
void check_cuda_args(const SigmoidArgs& a) {
  TORCH_CHECK(a.x.is_cuda(), kOp, ": x must be a CUDA tensor, got device ", a.x.device());
  sigmoid_dtype(a.x.scalar_type());
  TORCH_CHECK(a.x.size(1) <= infonce_cuda::kMaxFeatureDim, kOp, ": feature dimension d = ", a.x.size(1),
              " outside the cuda backend's range [1, ", infonce_cuda::kMaxFeatureDim, "]");
  for (const at::Tensor* t : {&a.x, &a.y, &a.row_labels, &a.col_labels, &a.grad}) {
    TORCH_CHECK(!t->defined() || t->is_contiguous(), kOp, ": x, y, the labels and grad must be contiguous");
  }
}

infonce_cuda::SigmoidParams params(const SigmoidArgs& a) {
  const at::Tensor &x = a.x, &y = a.y, &scale = a.scale, &bias = a.bias;
  infonce_cuda::SigmoidParams p;
  p.dtype = sigmoid_dtype(x.scalar_type());
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.scale = scale.data_ptr();
  p.bias = bias.data_ptr();
  p.M = x.size(0);
  p.N = y.size(0);
  p.d = x.size(1);
  if (a.labelled()) {
    p.row_labels = a.row_labels.data_ptr<int64_t>();
    p.col_labels = a.col_labels.data_ptr<int64_t>();
  }
  p.offset = a.offset;
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

std::vector<at::Tensor> sigmoid_forward_cuda(const SigmoidArgs& a, bool with_grad) {
  check_cuda_args(a);
  const c10::cuda::CUDAGuard guard(a.x.device());
  infonce_cuda::SigmoidParams p = params(a);
  at::Tensor rows = at::empty({a.M()}, a.scale.options());
  p.rows = rows.data_ptr();
  if (!with_grad) {
    launch(p, a.x);
    return {rows};
  }
  at::Tensor workspace;
  std::vector<at::Tensor> grads = gradient_outputs(p, a.x, a.y, a.scale, workspace);
  launch(p, a.x);
  return {rows, grads[0], grads[1], grads[2], grads[3]};
}

std::vector<at::Tensor> sigmoid_backward_cuda(const SigmoidArgs& a) {
  check_cuda_args(a);
  const c10::cuda::CUDAGuard guard(a.x.device());
  infonce_cuda::SigmoidParams p = params(a);
  p.grad = a.grad.data_ptr();
  at::Tensor workspace;
  std::vector<at::Tensor> grads = gradient_outputs(p, a.x, a.y, a.scale, workspace);
  launch(p, a.x);
  return grads;
}

}  // namespace infonce_kernels
