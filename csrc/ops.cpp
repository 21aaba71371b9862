// Schema of the fused log-sum-exp op, defined once for every backend.
//
//   _lse_fwd(q, k, scale, exclude, labels, symmetric) -> lse
//     labels: [] (no rule), [row_labels, key_labels, positive] (the label rule), or
//       [row_labels, key_labels, positive, threshold] (the threshold rule; row_labels and
//       key_labels empty when the label rule is off).
//     q (M, d), k (N, d): float16 / bfloat16 / float32 / float64, same dtype and device.
//     scale: 0-d tensor (float32, float64 for float64 inputs), s > 0.
//     exclude: (M, E) int64, E <= 2; row i never sees key exclude[i, e] (-1 = none).
//     row_labels (M,), key_labels (N,), positive (M,): int64, all three empty to switch the
//       label rule off. With them, row i also skips every key j with key_labels[j] ==
//       row_labels[i], except its designated positive j == positive[i] (-1 = none).
//     threshold (M,) float32 (float64 for float64), with positive (M,) int64: row i also drops
//       every key j with s <q_i, k_j> > threshold[i] and j != positive[i] (false-negative
//       filtering; +inf drops nothing).
//     symmetric: k is q (M == N); enables the one-pass symmetric backward.
//     lse (M,): r_i = log sum_{j not excluded} exp(s <q_i, k_j>), float32 (float64 for float64).
//
//   _lse_fwd_counted(same arguments) -> (lse, dropped)
//     dropped (M,) int32: per row, the keys the threshold rule dropped among those the list and
//     the label rule keep (zeros without a threshold), counted in the same forward sweep.
//
//   _lse_bwd(grad, q, k, scale, exclude, labels, symmetric, lse)
//     -> (dq, dk, dscale)
//     With W_ij = g_i exp(s <q_i, k_j> - r_i) on non-excluded pairs:
//       dq = s W k,  dk = s W^T q,  dscale = sum_ij W_ij <q_i, k_j>.
//     symmetric: dq = s (W + W^T) z is the whole gradient on z = q = k, dk is empty.
//
//   _lse_bwd_paired(grad, q, k, scale, exclude, labels, lse,
//                   key_side = [key_grad, key_lse, key_exclude(, key_positive(, key_threshold))],
//                   row_offset) -> (dq, dscale)
//     The gradient on q when the keys are rows of a log-sum-exp too (docs/design.md, The
//     primitive, and The distributed scheme):
//       dq_i = s sum_j (W_ij + V_ji) k_j,  V_ji = h_j exp(s <q_i, k_j> - rho_j)
//     with h = key_grad, rho = key_lse (N,), and V_ji = 0 where key j, as a row, excludes row i:
//     i + row_offset in key_exclude[j] (N, E), or, with the label rule, key_labels[j] ==
//     row_labels[i] and key_positive[j] != i + row_offset, or, with key_threshold (N,),
//     s <q_i, k_j> > key_threshold[j] and key_positive[j] != i + row_offset.
//     dscale = sum_ij W_ij <q_i, k_j>.
//     The symmetric backward is the case k = q; a rank's rows against all-gathered rows, and
//     the two directions of CLIP, are the others.
//
//   _sigmoid_fwd(x, y, scale, bias, labels = [row_labels, col_labels] or [], offset, with_grad)
//     The pairwise sigmoid (SigLIP) loss per row. x (M, d), y (N, d): float16 / bfloat16 /
//     float32 / float64, same dtype and device; scale t, bias b: 0-d (float32, float64 for
//     float64 inputs). l_ij = t <x_i, y_j> + b; z_ij = +1 when (i, j) is positive: row_labels[i]
//     == col_labels[j] with labels, else i + offset == j; -1 otherwise.
//       rows_i = sum_j softplus(-z_ij l_ij)   (M,), accumulation dtype
//     with_grad: [rows, dx, dy, dscale, dbias], the gradients for a unit upstream gradient on
//     every row, from the same sweep; else [rows].
//
//   _sigmoid_bwd(grad, x, y, scale, bias, labels, offset) -> [dx, dy, dscale, dbias]
//     G_ij = grad_i (sigmoid(l_ij) - [z_ij = 1]): dx = t G y, dy = t G^T x,
//     dscale = sum_ij G_ij <x_i, y_j>, dbias = sum_ij G_ij. dx, dy in the input dtype.
//
// Pair (i, j) is excluded by the rule of csrc/common/exclusion.h (the one C++ definition).
// Implementations register per dispatch key, one small file each: csrc/cpu/register_cpu.cpp and
// csrc/cuda/register_cuda.cpp, both through csrc/common/register_impls.h, which unpacks and checks
// the arguments once (csrc/common/lse_args.h).
#include <torch/library.h>

TORCH_LIBRARY(infonce_kernels, m) {
  // Private kernel ops: the public op is infonce_kernels::lse (Python, infonce_kernels/ops),
  // which validates its arguments and dispatches to these (or to the Triton/reference backends).
  // labels: [] (rules off), [row_labels, key_labels, positive] or [..., threshold];
  // key_side: [key_grad, key_lse, key_exclude] plus key_positive (labels or key threshold) plus
  // key_threshold.
  m.def("_lse_fwd(Tensor q, Tensor k, Tensor scale, Tensor exclude, Tensor[] labels, bool symmetric) -> Tensor");
  m.def(
      "_lse_fwd_counted(Tensor q, Tensor k, Tensor scale, Tensor exclude, Tensor[] labels, bool symmetric) "
      "-> (Tensor, Tensor)");
  m.def(
      "_lse_bwd(Tensor grad, Tensor q, Tensor k, Tensor scale, Tensor exclude, Tensor[] labels, "
      "bool symmetric, Tensor lse) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_lse_bwd_paired(Tensor grad, Tensor q, Tensor k, Tensor scale, Tensor exclude, Tensor[] labels, "
      "Tensor lse, Tensor[] key_side, int row_offset) -> (Tensor, Tensor)");
  // The pairwise sigmoid (SigLIP) op; labels: [] (diagonal rule with offset) or [row_labels, col_labels].
  m.def("_sigmoid_fwd(Tensor x, Tensor y, Tensor scale, Tensor bias, Tensor[] labels, int offset, bool with_grad) -> Tensor[]");
  m.def("_sigmoid_bwd(Tensor grad, Tensor x, Tensor y, Tensor scale, Tensor bias, Tensor[] labels, int offset) -> Tensor[]");
  // CLIP's pair backward by G blocks (CUDA only, csrc/common/pair_gblock_impls.h): G' of the block
  // [row0, row1) x [col0, col1) into gblk, per-program partial sums of G' S into gs.
  m.def(
      "_lse_pair_gblock(Tensor a, Tensor b, Tensor scale, Tensor r, Tensor t, Tensor g_r, Tensor g_t, Tensor gmax, "
      "Tensor(a!) gblk, Tensor(b!) gs, int row0, int row1, int col0, int col1, int col_progs) -> ()");
}

#ifdef INFONCE_PYTHON_MODULE
// setup.py builds this library as the Python module infonce_kernels._C: importing it runs the
// static registrations above. The module itself holds nothing.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
