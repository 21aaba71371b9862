// The arguments of the pairwise sigmoid ops _sigmoid_fwd / _sigmoid_bwd (schemas in csrc/ops.cpp),
// unpacked from the schemas' lists and checked once for every dispatch key. Every message names
// the argument, so a caller that bypasses the Python front end (which validates first, with
// ValueError/TypeError) never reaches a kernel with bad input.
#pragma once
#include <ATen/ATen.h>

namespace infonce_kernels {

struct SigmoidArgs {
  at::Tensor x, y;          // (M, d), (N, d), one floating dtype
  at::Tensor scale, bias;   // 0-d, float32 (float64 for float64 inputs)
  at::Tensor row_labels;    // (M,) int64, or undefined without the label rule
  at::Tensor col_labels;    // (N,) int64, or undefined
  int64_t offset = 0;       // diagonal rule: pair (i, j) is positive when i + offset == j
  at::Tensor grad;          // backward only: (M,) upstream gradient, accumulation dtype

  bool labelled() const { return row_labels.defined(); }
  int64_t M() const { return x.size(0); }
  int64_t N() const { return y.size(0); }
};

inline at::ScalarType sigmoid_accumulate_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// _sigmoid_fwd's arguments, checked.
inline SigmoidArgs sigmoid_forward_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                        const at::Tensor& bias, at::TensorList labels, int64_t offset) {
  TORCH_CHECK(x.dim() == 2, "sigmoid: x must be 2-D (M, d), got ", x.dim(), "-D");
  TORCH_CHECK(y.dim() == 2, "sigmoid: y must be 2-D (N, d), got ", y.dim(), "-D");
  TORCH_CHECK(x.size(0) > 0 && y.size(0) > 0, "sigmoid: x and y need at least one row");
  TORCH_CHECK(x.size(1) == y.size(1) && x.size(1) > 0, "sigmoid: x and y must have the same positive feature size");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "sigmoid: x must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(y.scalar_type() == st, "sigmoid: x and y must have the same dtype");
  TORCH_CHECK(y.device() == x.device(), "sigmoid: x and y must be on the same device");
  const auto acc = sigmoid_accumulate_type(st);
  for (const at::Tensor* t : {&scale, &bias}) {
    TORCH_CHECK(t->dim() == 0 && t->scalar_type() == acc && t->device() == x.device(),
                "sigmoid: scale and bias must be 0-d tensors on the device of x, float64 for float64 inputs "
                "and float32 otherwise");
  }
  SigmoidArgs a;
  a.x = x;
  a.y = y;
  a.scale = scale;
  a.bias = bias;
  a.offset = offset;
  TORCH_CHECK(labels.empty() || labels.size() == 2,
              "sigmoid: labels must be [] or [row_labels, col_labels], got ", labels.size(), " tensors");
  if (labels.size() == 2) {
    TORCH_CHECK(labels[0].dim() == 1 && labels[0].size(0) == x.size(0),
                "sigmoid: row_labels must have shape (M,) = (", x.size(0), ",)");
    TORCH_CHECK(labels[1].dim() == 1 && labels[1].size(0) == y.size(0),
                "sigmoid: col_labels must have shape (N,) = (", y.size(0), ",)");
    for (const at::Tensor& t : labels) {
      TORCH_CHECK(t.scalar_type() == at::kLong && t.device() == x.device(),
                  "sigmoid: row_labels and col_labels must be int64 on the device of x");
    }
    a.row_labels = labels[0];
    a.col_labels = labels[1];
  }
  return a;
}

// _sigmoid_bwd's arguments, checked.
inline SigmoidArgs sigmoid_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                         const at::Tensor& scale, const at::Tensor& bias, at::TensorList labels,
                                         int64_t offset) {
  SigmoidArgs a = sigmoid_forward_args(x, y, scale, bias, labels, offset);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == x.size(0) &&
                  grad.scalar_type() == sigmoid_accumulate_type(x.scalar_type()) && grad.device() == x.device(),
              "sigmoid_bwd: grad must have shape (M,), the accumulation dtype and the device of x");
  a.grad = grad;
  return a;
}

}  // namespace infonce_kernels
