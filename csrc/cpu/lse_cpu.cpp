// CPU implementation of lse_fwd / lse_bwd (schema and math in csrc/ops.cpp).
//
// Work is split into row blocks run in parallel with at::parallel_for; each row block meets the
// keys one key block at a time. A (rows x cols) tile of logits is produced by BLAS (at::mm),
// then scaled, masked and exponentiated in place with ATen's vectorised ops, so the extra
// memory is one tile per thread plus O((M + N) d): the M x N matrix never exists.
// Inputs in float16/bfloat16 are widened to float32 once (O((M + N) d)); float64 stays float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "../op_checks.h"

namespace infonce_kernels {
namespace {

// A 64 x 1024 float32 tile is 256 KiB: it stays in L2 between the GEMM and the exp pass.
constexpr int64_t kRows = 64;
constexpr int64_t kKeys = 1024;

struct Span {
  int64_t begin;
  int64_t size;
};

inline Span block(int64_t index, int64_t block_size, int64_t total) {
  const int64_t begin = index * block_size;
  return {begin, std::min(block_size, total - begin)};
}

inline int64_t num_blocks(int64_t total, int64_t block_size) {
  return (total + block_size - 1) / block_size;
}

inline at::ScalarType accumulate_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The kernels' working copy of an input: detached, widened to the accumulation type, contiguous.
// Detaching matters: at::parallel_for's worker threads do not inherit the caller's "below
// autograd" dispatch state, so tiles computed there from a tensor that requires grad would be
// recorded by autograd and kept alive, O(M N) memory.
inline at::Tensor working_copy(const at::Tensor& t) {
  return t.detach().to(accumulate_type(t)).contiguous();
}

// The (row, key) pairs left out of a row's log-sum-exp: the explicit per-row lists, and, when
// row_labels is set, every key sharing the row's label except the row's designated positive.
// Keys are numbered from key_offset (the paired backward's key side, whose "keys" are rows of q
// numbered in a gathered batch); labels are looked up by local index.
struct Exclusions {
  const int64_t* lists;  // (rows, E), -1 = none
  int64_t E;
  const int64_t* row_labels;  // (rows,), nullptr when the label rule is off
  const int64_t* key_labels;  // (keys,)
  const int64_t* positive;    // (rows,), -1 = none
  int64_t key_offset;

  bool by_label(int64_t row, int64_t key) const {
    return row_labels[row] == key_labels[key] && positive[row] != key + key_offset;
  }
};

// Sets tile(i, j) = value on every excluded pair of a (rows x cols) row-major tile.
// Plain tiles hold query rows down and keys across: tile(i, j) is pair (rows.begin + i, cols.begin + j).
// Transposed tiles hold keys down and query rows across: tile(i, j) is pair (cols.begin + j, rows.begin + i);
// they serve dk and, in the symmetric backward, W^T_ij = W_ji (row j's exclusions).
template <typename T>
void mask_tile(T* tile, Span rows, Span cols, const Exclusions& ex, bool transposed, T value) {
  const Span qrows = transposed ? cols : rows;  // the rows whose lists apply
  const Span keys = transposed ? rows : cols;
  for (int64_t r = 0; r < qrows.size; ++r) {
    for (int64_t e = 0; e < ex.E; ++e) {
      const int64_t key = ex.lists[(qrows.begin + r) * ex.E + e] - ex.key_offset - keys.begin;
      if (key < 0 || key >= keys.size) continue;
      tile[transposed ? key * cols.size + r : r * cols.size + key] = value;
    }
  }
  if (ex.row_labels == nullptr) return;
  for (int64_t i = 0; i < rows.size; ++i) {
    for (int64_t j = 0; j < cols.size; ++j) {
      const bool out = transposed ? ex.by_label(cols.begin + j, rows.begin + i)
                                  : ex.by_label(rows.begin + i, cols.begin + j);
      if (out) tile[i * cols.size + j] = value;
    }
  }
}

Exclusions make_exclusions(const at::Tensor& exclude, const at::Tensor& row_labels,
                           const at::Tensor& key_labels, const at::Tensor& positive, bool labelled,
                           int64_t key_offset = 0) {
  return {exclude.data_ptr<int64_t>(), exclude.size(1),
          labelled ? row_labels.data_ptr<int64_t>() : nullptr,
          labelled ? key_labels.data_ptr<int64_t>() : nullptr,
          labelled ? positive.data_ptr<int64_t>() : nullptr, key_offset};
}

// The key side of a paired backward: each key j is itself a row with upstream gradient h_j,
// log-sum-exp rho_j and its own exclusions, whose keys are the rows of q.
struct KeySide {
  at::Tensor grad;  // (N,)
  at::Tensor lse;   // (N,)
  Exclusions ex;
};

// Rows of dq and the dscale partials, one row block at a time:
//   dq_i = s sum_j (W_ij + V_ji) k_j,  W_ij = g_i exp(L_ij - r_i) (row i's exclusions),
//   V_ji = h_j exp(L_ij - rho_j) (key j's exclusions; only with a key side),
//   dscale = sum_ij W_ij L_ij / s,  with L = (s q) k^T, the logits from the pre-scaled rows qs.
// Without a key side this is the dq pass of the general backward; with the key side equal to
// the row side (k is q) it is the one-pass symmetric backward dz = s (W + W^T) z.
template <typename scalar_t>
void dq_pass(const at::Tensor& qs, const at::Tensor& k, double s, const at::Tensor& g,
             const at::Tensor& r, const Exclusions& ex, const KeySide* key_side, at::Tensor& dq,
             std::vector<double>& dscale_parts) {
  const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t M = qs.size(0), N = k.size(0);
  at::parallel_for(0, num_blocks(M, kRows), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Span rows = block(b, kRows, M);
      const at::Tensor qb = qs.narrow(0, rows.begin, rows.size);
      const at::Tensor r_rows = r.narrow(0, rows.begin, rows.size).unsqueeze(1);
      const at::Tensor g_rows = g.narrow(0, rows.begin, rows.size).unsqueeze(1);
      at::Tensor acc = at::zeros({rows.size, qs.size(1)}, qs.options());
      double dscale = 0.0;
      for (int64_t c = 0; c < num_blocks(N, kKeys); ++c) {
        const Span cols = block(c, kKeys, N);
        const at::Tensor kb = k.narrow(0, cols.begin, cols.size);
        const at::Tensor logits = at::mm(qb, kb.t());
        at::Tensor w = logits.sub(r_rows);
        mask_tile(w.data_ptr<scalar_t>(), rows, cols, ex, false, neg_inf);
        w.exp_().mul_(g_rows);
        dscale += at::dot(w.view(-1), logits.view(-1)).item<double>();  // BLAS dot, no temporary
        if (key_side != nullptr) {
          // V_ji: the same logits, the keys' rho and h, the keys' exclusions (a transposed mask).
          at::Tensor v = logits.sub_(key_side->lse.narrow(0, cols.begin, cols.size).unsqueeze(0));
          mask_tile(v.data_ptr<scalar_t>(), rows, cols, key_side->ex, true, neg_inf);
          w.add_(v.exp_().mul_(key_side->grad.narrow(0, cols.begin, cols.size).unsqueeze(0)));
        }
        acc.addmm_(w, kb);
      }
      dq.narrow(0, rows.begin, rows.size).copy_(acc.mul_(s));
      dscale_parts[b] = dscale / s;
    }
  });
}

// Sum of dscale partials in block order: the result does not depend on the thread count.
at::Tensor ordered_sum(const std::vector<double>& partials, const at::Tensor& like) {
  double total = 0.0;
  for (double p : partials) total += p;
  return at::scalar_tensor(total, like.options());
}

at::Tensor lse_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& scale,
                       const at::Tensor& exclude_in, const at::Tensor& row_labels_in,
                       const at::Tensor& key_labels_in, const at::Tensor& positive_in, bool symmetric) {
  check_lse_inputs(q_in, k_in, scale, exclude_in, symmetric);
  const bool labelled = check_lse_labels(q_in, k_in, row_labels_in, key_labels_in, positive_in);
  TORCH_CHECK(q_in.device().is_cpu(), "lse_fwd (cpu): q must be a CPU tensor");
  const at::Tensor q = working_copy(q_in);
  const at::Tensor k = symmetric ? q : working_copy(k_in);
  const at::Tensor exclude = exclude_in.contiguous(), row_labels = row_labels_in.contiguous(),
                   key_labels = key_labels_in.contiguous(), positive = positive_in.contiguous();
  const Exclusions ex = make_exclusions(exclude, row_labels, key_labels, positive, labelled);
  const int64_t M = q.size(0), N = k.size(0);
  const at::Tensor qs = q.mul(scale.item<double>());  // pre-scaled rows: (s q) k^T are the logits
  at::Tensor out = at::empty({M}, q.options());

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "lse_fwd_cpu", [&] {
    const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
    at::parallel_for(0, num_blocks(M, kRows), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const Span rows = block(b, kRows, M);
        const at::Tensor qb = qs.narrow(0, rows.begin, rows.size);
        // Online log-sum-exp: running max m and running sum l of exp(L - m).
        at::Tensor m = at::full({rows.size}, neg_inf, q.options());
        at::Tensor l = at::zeros({rows.size}, q.options());
        for (int64_t c = 0; c < num_blocks(N, kKeys); ++c) {
          const Span cols = block(c, kKeys, N);
          at::Tensor t = at::mm(qb, k.narrow(0, cols.begin, cols.size).t());
          mask_tile(t.data_ptr<scalar_t>(), rows, cols, ex, false, neg_inf);
          const at::Tensor m_new = at::maximum(m, std::get<0>(t.max(1)));
          // Shift by 0 where m is infinite, keeping exp(inf - inf) = NaN out of the sums: a row
          // with every key so far excluded keeps m = -inf and l = 0 (r = -inf); a row whose
          // logits overflow to +inf gets l = +inf, so r = +inf as torch.logsumexp gives.
          const at::Tensor shift = m_new.masked_fill(m_new.isinf(), 0);
          l.mul_((m - shift).exp_()).add_(t.sub_(shift.unsqueeze(1)).exp_().sum(1));
          m = m_new;
        }
        out.narrow(0, rows.begin, rows.size).copy_(m + l.log());
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& scale, const at::Tensor& exclude_in, const at::Tensor& row_labels_in,
    const at::Tensor& key_labels_in, const at::Tensor& positive_in, bool symmetric,
    const at::Tensor& lse_in) {
  check_lse_inputs(q_in, k_in, scale, exclude_in, symmetric);
  const bool labelled = check_lse_labels(q_in, k_in, row_labels_in, key_labels_in, positive_in);
  check_lse_grad_inputs(grad_in, q_in, lse_in);
  TORCH_CHECK(q_in.device().is_cpu(), "lse_bwd (cpu): q must be a CPU tensor");
  const at::Tensor q = working_copy(q_in);
  const at::Tensor k = symmetric ? q : working_copy(k_in);
  const at::Tensor exclude = exclude_in.contiguous(), row_labels = row_labels_in.contiguous(),
                   key_labels = key_labels_in.contiguous(), positive = positive_in.contiguous();
  const Exclusions ex = make_exclusions(exclude, row_labels, key_labels, positive, labelled);
  const at::Tensor g = grad_in.detach().contiguous();
  const at::Tensor r = lse_in.detach().contiguous();
  const int64_t M = q.size(0), N = k.size(0);
  const double s = scale.item<double>();
  const int64_t row_blocks = num_blocks(M, kRows), key_blocks = num_blocks(N, kKeys);
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = symmetric ? at::empty({0}, q_in.options()) : at::empty_like(k);
  std::vector<double> dscale_parts(row_blocks, 0.0);

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "lse_bwd_cpu", [&] {
    // Symmetric: the key side is the row side itself.
    const KeySide self{g, r, ex};
    const at::Tensor qs = q.mul(s);  // pre-scaled rows: (s q) k^T are the logits
    dq_pass<scalar_t>(qs, k, s, g, r, ex, symmetric ? &self : nullptr, dq, dscale_parts);

    if (symmetric) return;
    // dk_j = s sum_i W_ij q_i, one key block at a time on transposed tiles (keys down, rows
    // across): each key block owns its rows of dk, so no atomics and no per-thread copies.
    at::parallel_for(0, key_blocks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Span keys = block(c, kKeys, N);
        const at::Tensor kb = k.narrow(0, keys.begin, keys.size);
        at::Tensor acc = at::zeros({keys.size, k.size(1)}, k.options());
        for (int64_t b = 0; b < row_blocks; ++b) {
          const Span rows = block(b, kRows, M);
          const at::Tensor qb = q.narrow(0, rows.begin, rows.size);
          at::Tensor wt = at::mm(kb, qs.narrow(0, rows.begin, rows.size).t())
                              .sub_(r.narrow(0, rows.begin, rows.size).unsqueeze(0));
          mask_tile(wt.data_ptr<scalar_t>(), keys, rows, ex, true, -std::numeric_limits<scalar_t>::infinity());
          wt.exp_().mul_(g.narrow(0, rows.begin, rows.size).unsqueeze(0));
          acc.addmm_(wt, qb);
        }
        dk.narrow(0, keys.begin, keys.size).copy_(acc.mul_(s));
      }
    });
  });

  return {dq.to(q_in.scalar_type()), symmetric ? dk : dk.to(k_in.scalar_type()),
          ordered_sum(dscale_parts, scale)};
}

std::tuple<at::Tensor, at::Tensor> lse_bwd_paired_cpu(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& scale, const at::Tensor& exclude_in, const at::Tensor& row_labels_in,
    const at::Tensor& key_labels_in, const at::Tensor& positive_in, const at::Tensor& lse_in,
    const at::Tensor& key_grad_in, const at::Tensor& key_lse_in, const at::Tensor& key_exclude_in,
    const at::Tensor& key_positive_in, int64_t row_offset) {
  check_lse_inputs(q_in, k_in, scale, exclude_in, false);
  const bool labelled = check_lse_labels(q_in, k_in, row_labels_in, key_labels_in, positive_in);
  check_lse_grad_inputs(grad_in, q_in, lse_in);
  check_key_side(k_in, key_grad_in, key_lse_in, key_exclude_in, key_positive_in, labelled, row_offset);
  TORCH_CHECK(q_in.device().is_cpu(), "lse_bwd_paired (cpu): q must be a CPU tensor");
  const at::Tensor q = working_copy(q_in);
  const at::Tensor k = working_copy(k_in);
  const at::Tensor exclude = exclude_in.contiguous(), row_labels = row_labels_in.contiguous(),
                   key_labels = key_labels_in.contiguous(), positive = positive_in.contiguous(),
                   key_exclude = key_exclude_in.contiguous(), key_positive = key_positive_in.contiguous();
  const Exclusions ex = make_exclusions(exclude, row_labels, key_labels, positive, labelled);
  // On the key side the roles swap: key j is the row, the rows of q (numbered from row_offset)
  // are its keys, and the labels are looked up the other way round.
  const KeySide keys{key_grad_in.detach().contiguous(), key_lse_in.detach().contiguous(),
                     make_exclusions(key_exclude, key_labels, row_labels, key_positive, labelled, row_offset)};
  at::Tensor dq = at::empty_like(q);
  std::vector<double> dscale_parts(num_blocks(q.size(0), kRows), 0.0);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "lse_bwd_paired_cpu", [&] {
    const double s = scale.item<double>();
    dq_pass<scalar_t>(q.mul(s), k, s, grad_in.detach().contiguous(), lse_in.detach().contiguous(), ex, &keys, dq,
                      dscale_parts);
  });
  return {dq.to(q_in.scalar_type()), ordered_sum(dscale_parts, scale)};
}

// The registered schemas (csrc/ops.cpp) pass the label rule and the paired key side as lists.
at::Tensor lse_fwd_cpu_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                       const at::Tensor& exclude, at::TensorList labels, bool symmetric) {
  const LabelTensors lab = unpack_labels(labels, q);
  return lse_fwd_cpu(q, k, scale, exclude, lab.row_labels, lab.key_labels, lab.positive, symmetric);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_bwd_cpu_op(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& exclude, at::TensorList labels, bool symmetric, const at::Tensor& lse) {
  const LabelTensors lab = unpack_labels(labels, q);
  return lse_bwd_cpu(grad, q, k, scale, exclude, lab.row_labels, lab.key_labels, lab.positive, symmetric, lse);
}

std::tuple<at::Tensor, at::Tensor> lse_bwd_paired_cpu_op(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& exclude, at::TensorList labels, const at::Tensor& lse, at::TensorList key_side,
    int64_t row_offset) {
  const LabelTensors lab = unpack_labels(labels, q);
  const KeySideTensors ks = unpack_key_side(key_side, k);
  return lse_bwd_paired_cpu(grad, q, k, scale, exclude, lab.row_labels, lab.key_labels, lab.positive, lse,
                           ks.grad, ks.lse, ks.exclude, ks.positive, row_offset);
}

}  // namespace

TORCH_LIBRARY_IMPL(infonce_kernels, CPU, m) {
  m.impl("_lse_fwd", &lse_fwd_cpu_op);
  m.impl("_lse_bwd", &lse_bwd_cpu_op);
  m.impl("_lse_bwd_paired", &lse_bwd_paired_cpu_op);
}

}  // namespace infonce_kernels
