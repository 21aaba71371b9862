// infonce_kernels — CUDA kernels for the masked, scaled row log-sum-exp and its backward: the
// public launchers (lse_kernels.h), which validate LseParams and dispatch on the dtype.
//
// Mathematics (docs/design.md, The primitive), never materialising an M x N matrix:
//
//   S_ij = <q_i, k_j>           (raw dot product; fp32 accumulation)
//   L_ij = s * S_ij
//   r_i  = log sum_{j : (i,j) not excluded} exp(L_ij)                         (forward)
//   P_ij = exp(L_ij - r_i) for non-excluded pairs else 0,   W_ij = g_i * P_ij
//   dq_i = s * sum_j W_ij k_j,   dk_j = s * sum_i W_ij q_i,   dscale = sum_ij W_ij S_ij
//   symmetric (k is q = z):  dz_a = s * sum_b (W_ab + W_ba) z_b,
//                            W_ab + W_ba = g_a P_ab + g_b P_ba  (needs only r_a, r_b)
//   paired (lse_bwd_paired; the keys are rows of a log-sum-exp too, with h, rho and their own
//   exclusions, which number the rows of q from row_offset):
//                            dq_a = s * sum_b (W_ab + V_ba) k_b,  V_ba = h_b exp(L_ab - rho_b)
//   The symmetric case is the paired one with k = q, (h, rho, lists, labels) = the row side's
//   and row_offset = 0: both run the same two-sided kernels (mode kSym below).
//
// Exclusion of pair (query row i, key j): csrc/common/exclusion.h, the one C++ definition, shared
// with the CPU kernels (its tile-local forms tile_index / label_excluded are used here):
//   j is in row i's list (exclude[i, 0..E)), OR
//   the label rule is on and row_labels[i] == key_labels[j] and positive[i] != j.
// The label rule is a template flag (LBL) of every main kernel: with LBL = false the kernels are
// exactly the label-free code (no loads, no compares, no extra registers or shared memory).
// With LBL = true each thread keeps its own rows' labels/positives in registers (loaded once; the
// fp32/fp64 backward keeps them in shared memory instead, see lse_bwd_simt_kernel) and each CTA
// stages the current column tile's labels in shared memory (loaded once per tile). The label test
// is folded into the mask with a bitwise AND (no extra branches in the unrolled element loops).
// Where the roles are transposed (kCol, and the W^T / V term of kSym) the excluding row is the
// column-side (Y) index b and the key is the row-side (X) index a, numbered from x_offset in the
// column side's lists and positive:
//   excluded(b, a) = a + off in excl[b] || (labels_Y[b] == key_labels_X[a] && pos_Y[b] != a + off)
// with (excl, labels_Y, pos_Y, key_labels_X, off) = (exclude, row_labels, positive, key_labels, 0)
// for kCol and the symmetric kSym, and (key_exclude, key_labels, key_positive, row_labels,
// row_offset) for the paired kSym.
//
// Every kernel works on a tile of rows ("X", the A operand) against a tile of columns ("Y"); a
// QuerySide holds one side's per-row (query) data: g, r, exclusion lists, labels, positives.
//   mode kRow: X = q, Y = k.  Row term, X rows' QuerySide (xq).          -> dq (and dscale)
//   mode kCol: X = k, Y = q.  Column term, Y rows' QuerySide (yq).       -> dk
//   mode kSym: X = q, Y = k.  Both terms (W + W^T, or W + V^T when paired), one pass per row
//              block -> dq / dz (and dscale); no atomics: every CTA owns its rows of the output.
//
// Files: tile_sizes.cuh (tile shapes), online_lse.cuh (the streaming log-sum-exp),
// kernel_args.cuh (QuerySide / Sides, the modes), mma_kernels.cuh + launch_mma.cu (fp16/bf16),
// simt_kernels.cuh + launch_simt.cu (fp32/fp64), reduce.cu (max |g|, the dscale sum).
// Two families:
//   * fp16 / bf16: tensor cores through mma.sync.m16n8k16 (sm_80+), fp32 accumulators, ldmatrix
//     from padded shared memory. CTA = 4 warps = 64 rows (16 per warp), key tiles of 64,
//     the QK product loops over d in chunks of 128, the backward output loops over d in chunks
//     of 128 on grid.y (each output chunk recomputes S and P: any d works, and d <= 128 costs
//     no recomputation).
//   * fp32 / fp64: plain FMA (SIMT) tiles, 256 threads, 16x16 threads with TMxTM micro tiles.
//     fp32 is exact fp32 (no TF32), matching torch's default fp32 matmul on CUDA.
//
// dscale: one partial per row-block CTA written to a workspace buffer, then summed by a single CTA
// in a fixed order (in double): deterministic, no atomics anywhere.
// All global offsets are int64.
#include "lse_kernels.h"

#include "launchers.h"
#include "tile_sizes.cuh"

namespace infonce_cuda {
namespace {

bool is_mma(DType dtype) { return dtype == DType::kFloat16 || dtype == DType::kBFloat16; }

bool valid_dtype(DType dtype) {
  return dtype == DType::kFloat16 || dtype == DType::kBFloat16 || dtype == DType::kFloat32 ||
         dtype == DType::kFloat64;
}

// A rule's three label pointers: all set (rule on) or all nullptr (off); E in {0, 1, 2}.
bool rule_valid(const infonce_kernels::ExclusionRule& r) {
  const int labels = (r.row_labels != nullptr) + (r.key_labels != nullptr);
  const bool needs_positive = labels == 2 || r.thresholded();
  return (labels == 0 || labels == 2) && (r.positive != nullptr) == needs_positive && r.E >= 0 && r.E <= 2 &&
         (r.E == 0 || r.lists != nullptr);
}

// Checks every launcher shares: sizes, dtype, the row side's rule.
bool common_valid(const LseParams& p) {
  return p.M >= 1 && p.N >= 1 && p.d >= 1 && p.d <= kMaxFeatureDim && valid_dtype(p.dtype) &&
         rule_valid(p.rows) && p.rows.key_offset == 0;
}

}  // namespace

cudaError_t lse_forward(const LseParams& p, cudaStream_t stream) {
  if (!common_valid(p) || (p.rows.thresholded() && p.dropped_out == nullptr)) return cudaErrorInvalidValue;
  return is_mma(p.dtype) ? forward_mma(p, stream) : forward_simt(p, stream);
}

size_t lse_backward_workspace_bytes(const LseParams& p) {
  switch (p.dtype) {
    case DType::kFloat16:
    case DType::kBFloat16: return kWsHeader + size_t(cdiv(p.M, kBM)) * sizeof(float);
    case DType::kFloat32: return kWsHeader + size_t(cdiv(p.M, 16 * kTmF32)) * sizeof(float);
    case DType::kFloat64: return kWsHeader + size_t(cdiv(p.M, 16 * kTmF64)) * sizeof(double);
  }
  return kWsHeader;
}

cudaError_t lse_backward(const LseParams& p, cudaStream_t stream) {
  if (!common_valid(p) || (p.symmetric && p.M != p.N)) return cudaErrorInvalidValue;
  return is_mma(p.dtype) ? backward_mma(p, stream) : backward_simt(p, stream);
}

cudaError_t lse_backward_paired(const LseParams& p, cudaStream_t stream) {
  if (!common_valid(p) || !rule_valid(p.keys) || p.keys.key_offset < 0) return cudaErrorInvalidValue;
  // Both sides use the label rule or neither.
  if (p.rows.labelled() != p.keys.labelled()) return cudaErrorInvalidValue;
  return is_mma(p.dtype) ? backward_paired_mma(p, stream) : backward_paired_simt(p, stream);
}

}  // namespace infonce_cuda
