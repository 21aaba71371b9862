// The arguments of the three private ops (csrc/ops.cpp) as one struct, unpacked from the schemas'
// lists and checked once (csrc/op_checks.h) for every backend: the CPU implementation takes it as
// is, the CUDA binding turns it into the launchers' LseParams (csrc/cuda/lse_kernels.h).
#pragma once
#include <ATen/ATen.h>

#include "../op_checks.h"
#include "exclusion.h"

namespace infonce_kernels {

struct LseArgs {
  at::Tensor q, k, scale;  // (M, d), (N, d) (k is q when symmetric), 0-d
  at::Tensor exclude;      // (M, E) int64
  LabelTensors labels;     // the label rule's and the threshold rule's tensors, empty when off
  bool labelled = false;
  bool thresholded = false;  // the rows' threshold rule (labels.threshold (M,), labels.positive)
  bool symmetric = false;
  // Backward: the upstream gradient and the forward's output, (M,) each.
  at::Tensor grad, lse;
  // Paired backward: the keys as rows (grad, lse, exclude, positive) and the first index of the
  // rows of q in the key side's numbering.
  bool paired = false;
  KeySideTensors key_side;
  bool key_thresholded = false;  // the key side's threshold rule (key_side.threshold (N,))
  int64_t row_offset = 0;

  int64_t M() const { return q.size(0); }
  int64_t N() const { return k.size(0); }

  // The rule of the rows of q against the keys k, on `ex` and the label tensors as given (make
  // them contiguous first when the pointers index raw memory).
  ExclusionRule row_rule() const {
    return rule(exclude, labels.row_labels, labels.key_labels, labels.positive, thresholded ? labels.threshold : none(),
                0);
  }
  // The key side's rule (paired): key j is the row, the rows of q (from row_offset) its keys.
  ExclusionRule key_rule() const {
    return rule(key_side.exclude, labels.key_labels, labels.row_labels, key_side.positive,
                key_thresholded ? key_side.threshold : none(), row_offset);
  }

 private:
  static at::Tensor none() { return at::Tensor(); }

  // `thr` undefined: no threshold rule.
  ExclusionRule rule(const at::Tensor& lists, const at::Tensor& rl, const at::Tensor& kl,
                     const at::Tensor& pos, const at::Tensor& thr, int64_t offset) const {
    ExclusionRule r;
    r.lists = lists.numel() > 0 ? lists.data_ptr<int64_t>() : nullptr;
    r.E = lists.size(1);
    if (labelled) {
      r.row_labels = rl.data_ptr<int64_t>();
      r.key_labels = kl.data_ptr<int64_t>();
    }
    if (labelled || thr.defined()) r.positive = pos.data_ptr<int64_t>();
    if (thr.defined()) r.threshold = thr.data_ptr();
    r.key_offset = offset;
    return r;
  }
};

// _lse_fwd's arguments, checked.
inline LseArgs forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                            const at::Tensor& exclude, at::TensorList labels, bool symmetric) {
  check_lse_inputs(q, k, scale, exclude, symmetric);
  LseArgs a;
  a.q = q;
  a.k = symmetric ? q : k;
  a.scale = scale;
  a.exclude = exclude;
  a.labels = unpack_labels(labels, q);
  a.thresholded = check_lse_threshold(q, a.labels.positive, a.labels.threshold);
  a.labelled = check_lse_labels(q, k, a.labels.row_labels, a.labels.key_labels, a.labels.positive, a.thresholded);
  a.symmetric = symmetric;
  return a;
}

// _lse_bwd's arguments, checked.
inline LseArgs backward_args(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& scale, const at::Tensor& exclude, at::TensorList labels,
                             bool symmetric, const at::Tensor& lse) {
  LseArgs a = forward_args(q, k, scale, exclude, labels, symmetric);
  check_lse_grad_inputs(grad, q, lse);
  a.grad = grad;
  a.lse = lse;
  return a;
}

// _lse_bwd_paired's arguments, checked.
inline LseArgs paired_args(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& scale, const at::Tensor& exclude, at::TensorList labels,
                           const at::Tensor& lse, at::TensorList key_side, int64_t row_offset) {
  LseArgs a = backward_args(grad, q, k, scale, exclude, labels, false, lse);
  a.paired = true;
  a.key_side = unpack_key_side(key_side, k);
  a.row_offset = row_offset;
  const KeySideTensors& ks = a.key_side;
  a.key_thresholded = check_lse_threshold(k, ks.positive, ks.threshold, "lse_bwd_paired", "key_threshold",
                                          "key_positive");
  check_key_side(k, ks.grad, ks.lse, ks.exclude, ks.positive, a.labelled, row_offset, a.key_thresholded);
  return a;
}

}  // namespace infonce_kernels
