// Argument checks shared by the CPU and CUDA implementations of lse_fwd / lse_bwd.
// Every message names the argument, so a caller that bypasses the Python front end
// (which validates first, with ValueError/TypeError) still never reaches a kernel with bad input.
#pragma once
#include <ATen/ATen.h>

namespace infonce_kernels {

inline void check_lse_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, const at::Tensor& exclude,
    bool symmetric) {
  TORCH_CHECK(q.dim() == 2, "lse: q must be 2-D (M, d), got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 2, "lse: k must be 2-D (N, d), got ", k.dim(), "-D");
  TORCH_CHECK(q.size(0) > 0 && k.size(0) > 0, "lse: q and k need at least one row");
  TORCH_CHECK(q.size(1) == k.size(1), "lse: q and k must have the same feature size, got ",
              q.size(1), " and ", k.size(1));
  TORCH_CHECK(q.size(1) > 0, "lse: the feature size d must be positive");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "lse: q and k must have the same dtype");
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "lse: q must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(q.device() == k.device(), "lse: q and k must be on the same device");
  TORCH_CHECK(scale.numel() == 1 && scale.dim() == 0, "lse: scale must be a 0-d tensor");
  TORCH_CHECK(scale.scalar_type() == (st == at::kDouble ? at::kDouble : at::kFloat),
              "lse: scale must be float64 for float64 inputs and float32 otherwise");
  TORCH_CHECK(scale.device() == q.device(), "lse: scale must be on the device of q");
  TORCH_CHECK(exclude.scalar_type() == at::kLong, "lse: exclude must be int64");
  TORCH_CHECK(exclude.dim() == 2 && exclude.size(0) == q.size(0) && exclude.size(1) <= 2,
              "lse: exclude must have shape (M, E) with E <= 2");
  TORCH_CHECK(exclude.device() == q.device(), "lse: exclude must be on the device of q");
  TORCH_CHECK(!symmetric || q.is_same(k), "lse: symmetric=True requires k to be q");
}

// The label rule's three tensors: all empty (rule off), or (M,), (N,), (M,) int64 on q's device.
// With the threshold rule on, positive alone may be given (labels empty): check_lse_threshold.
inline bool check_lse_labels(const at::Tensor& q, const at::Tensor& k, const at::Tensor& row_labels,
                             const at::Tensor& key_labels, const at::Tensor& positive, bool thresholded = false) {
  const bool off = row_labels.numel() == 0 && key_labels.numel() == 0 && (thresholded || positive.numel() == 0);
  if (off) return false;
  TORCH_CHECK(row_labels.dim() == 1 && row_labels.size(0) == q.size(0),
              "lse: row_labels must have shape (M,) = (", q.size(0), ",)");
  TORCH_CHECK(key_labels.dim() == 1 && key_labels.size(0) == k.size(0),
              "lse: key_labels must have shape (N,) = (", k.size(0), ",)");
  TORCH_CHECK(positive.dim() == 1 && positive.size(0) == q.size(0),
              "lse: positive must have shape (M,) = (", q.size(0), ",)");
  for (const at::Tensor* t : {&row_labels, &key_labels, &positive}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, "lse: row_labels, key_labels and positive must be int64");
    TORCH_CHECK(t->device() == q.device(), "lse: row_labels, key_labels and positive must be on the device of q");
  }
  return true;
}

// The threshold rule's tensors: threshold empty (rule off), or (M,) of the accumulation type on
// q's device, and then positive (M,) int64 on q's device (with or without the label rule).
inline bool check_lse_threshold(const at::Tensor& q, const at::Tensor& positive, const at::Tensor& threshold,
                                const char* op = "lse", const char* name = "threshold",
                                const char* positive_name = "positive") {
  if (threshold.numel() == 0) return false;
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == q.size(0), op, ": ", name, " must have shape (",
              q.size(0), ",), one entry per row");
  TORCH_CHECK(threshold.scalar_type() == acc, op, ": ", name, " must be float64 for float64 inputs and float32 "
              "otherwise");
  TORCH_CHECK(threshold.device() == q.device(), op, ": ", name, " must be on the device of its rows");
  TORCH_CHECK(positive.dim() == 1 && positive.size(0) == q.size(0) && positive.scalar_type() == at::kLong,
              op, ": the threshold rule needs ", positive_name, " int64 of shape (", q.size(0), ",)");
  TORCH_CHECK(positive.device() == q.device(), op, ": ", positive_name, " must be on the device of its rows");
  return true;
}

// The schema's `Tensor[] labels`: [] (both rules off), [row_labels, key_labels, positive] (the
// label rule) or [row_labels, key_labels, positive, threshold] (the threshold rule, with
// row_labels and key_labels empty when the label rule is off); the missing ones are empty
// tensors on the device of `like`.
struct LabelTensors {
  at::Tensor row_labels, key_labels, positive, threshold;
};
inline LabelTensors unpack_labels(at::TensorList labels, const at::Tensor& like) {
  TORCH_CHECK(labels.empty() || labels.size() == 3 || labels.size() == 4,
              "lse: labels must be [], [row_labels, key_labels, positive] or [row_labels, key_labels, positive, "
              "threshold], got ", labels.size(), " tensors");
  const at::Tensor none = at::empty({0}, like.options().dtype(at::kLong));
  if (labels.empty()) return {none, none, none, none};
  return {labels[0], labels[1], labels[2], labels.size() == 4 ? labels[3] : none};
}

// The schema's `Tensor[] key_side` of _lse_bwd_paired: [key_grad, key_lse, key_exclude], plus
// key_positive when the label rule or the key side's threshold rule is on, plus key_threshold
// for the latter (missing ones empty).
struct KeySideTensors {
  at::Tensor grad, lse, exclude, positive, threshold;
};
inline KeySideTensors unpack_key_side(at::TensorList key_side, const at::Tensor& like) {
  TORCH_CHECK(key_side.size() >= 3 && key_side.size() <= 5,
              "lse_bwd_paired: key_side must be [key_grad, key_lse, key_exclude] plus key_positive with labels or "
              "a key threshold, plus key_threshold");
  const at::Tensor none = at::empty({0}, like.options().dtype(at::kLong));
  return {key_side[0], key_side[1], key_side[2], key_side.size() >= 4 ? key_side[3] : none,
          key_side.size() == 5 ? key_side[4] : none};
}

inline void check_lse_grad_inputs(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& lse) {
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == q.size(0) && lse.scalar_type() == acc,
              "lse_bwd: lse must be the (M,) output of lse_fwd");
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == q.size(0) && grad.scalar_type() == acc,
              "lse_bwd: grad must have shape (M,) and the dtype of lse");
  TORCH_CHECK(grad.device() == q.device() && lse.device() == q.device(),
              "lse_bwd: grad and lse must be on the device of q");
}

// The key side of lse_bwd_paired: per-key upstream gradient and log-sum-exp (N,), the keys' own
// exclusion lists (N, E) in the numbering of the rows of q (offset by row_offset), and, with the
// label rule, the keys' designated positives (N,).
inline void check_key_side(const at::Tensor& k, const at::Tensor& key_grad, const at::Tensor& key_lse,
                           const at::Tensor& key_exclude, const at::Tensor& key_positive, bool labelled,
                           int64_t row_offset, bool thresholded = false) {
  const auto acc = k.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = k.size(0);
  TORCH_CHECK(key_grad.dim() == 1 && key_grad.size(0) == N && key_grad.scalar_type() == acc,
              "lse_bwd_paired: key_grad must have shape (N,) and the dtype of lse");
  TORCH_CHECK(key_lse.dim() == 1 && key_lse.size(0) == N && key_lse.scalar_type() == acc,
              "lse_bwd_paired: key_lse must have shape (N,) and the dtype of lse");
  TORCH_CHECK(key_exclude.scalar_type() == at::kLong && key_exclude.dim() == 2 &&
                  key_exclude.size(0) == N && key_exclude.size(1) <= 2,
              "lse_bwd_paired: key_exclude must be int64 of shape (N, E) with E <= 2");
  const bool positive = labelled || thresholded;
  TORCH_CHECK(positive ? (key_positive.dim() == 1 && key_positive.size(0) == N) : key_positive.numel() == 0,
              "lse_bwd_paired: key_positive must have shape (N,) with the label rule or a key threshold and be "
              "empty without");
  TORCH_CHECK(!positive || key_positive.scalar_type() == at::kLong, "lse_bwd_paired: key_positive must be int64");
  TORCH_CHECK(row_offset >= 0, "lse_bwd_paired: row_offset must be >= 0");
  for (const at::Tensor* t : {&key_grad, &key_lse, &key_exclude, &key_positive}) {
    TORCH_CHECK(t->device() == k.device(), "lse_bwd_paired: the key-side tensors must be on the device of k");
  }
}

}  // namespace infonce_kernels
