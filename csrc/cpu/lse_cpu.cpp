// CPU kernels of _lse_fwd / _lse_bwd / _lse_bwd_paired (schemas and maths in csrc/ops.cpp;
// registered in csrc/cpu/register_cpu.cpp).
//
// Work is split into row blocks run in parallel with at::parallel_for; each row block meets the
// keys one key block at a time. A (rows x cols) tile of logits is produced by BLAS (at::mm),
// then scaled, masked and exponentiated in place with ATen's vectorised ops, so the extra
// memory is one tile per thread plus O((M + N) d): the M x N matrix never exists.
// Inputs in float16/bfloat16 are widened to float32 once (O((M + N) d)); float64 stays float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/lse_impls.h"

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

// Sets tile(i, j) = value on every excluded pair (csrc/common/exclusion.h) of a (rows x cols)
// row-major tile. Plain tiles hold query rows down and keys across: tile(i, j) is pair
// (rows.begin + i, cols.begin + j). Transposed tiles hold keys down and query rows across:
// tile(i, j) is pair (cols.begin + j, rows.begin + i); they serve dk and, in the symmetric
// backward, W^T_ij = W_ji (row j's exclusions). `logits` (same layout; may be `tile` itself) are
// the pairs' logits, read by the threshold rule; `dropped` (nullptr: not counted) receives, per
// row (absolute index), the keys the threshold rule dropped among those the other rules keep.
template <typename T>
void mask_tile(T* tile, const T* logits, Span rows, Span cols, const ExclusionRule& ex, bool transposed, T value,
               int32_t* dropped = nullptr) {
  if (ex.labelled() || ex.thresholded()) {  // every pair is tested
    for (int64_t i = 0; i < rows.size; ++i) {
      for (int64_t j = 0; j < cols.size; ++j) {
        const int64_t row = transposed ? cols.begin + j : rows.begin + i;
        const int64_t key = transposed ? rows.begin + i : cols.begin + j;
        const int64_t at = i * cols.size + j;
        if (ex.excluded(row, key)) {
          tile[at] = value;
        } else if (ex.thresholded() && ex.dropped(row, key, logits[at])) {
          tile[at] = value;
          if (dropped != nullptr) ++dropped[row];
        }
      }
    }
    return;
  }
  // Lists only: visit each row's (at most two) entries instead of every pair.
  const Span qrows = transposed ? cols : rows;  // the rows whose lists apply
  const Span keys = transposed ? rows : cols;
  for (int64_t r = 0; r < qrows.size; ++r) {
    for (int64_t e = 0; e < ex.E; ++e) {
      const int64_t key = ex.lists[(qrows.begin + r) * ex.E + e] - ex.key_offset - keys.begin;
      if (key < 0 || key >= keys.size) continue;
      tile[transposed ? key * cols.size + r : r * cols.size + key] = value;
    }
  }
}

// The key side of a paired backward: each key j is itself a row with upstream gradient h_j,
// log-sum-exp rho_j and its own exclusions, whose keys are the rows of q.
struct KeySide {
  at::Tensor grad;  // (N,)
  at::Tensor lse;   // (N,)
  ExclusionRule ex;
};

// Rows of dq and the dscale partials, one row block at a time:
//   dq_i = s sum_j (W_ij + V_ji) k_j,  W_ij = g_i exp(L_ij - r_i) (row i's exclusions),
//   V_ji = h_j exp(L_ij - rho_j) (key j's exclusions; only with a key side),
//   dscale = sum_ij W_ij L_ij / s,  with L = (s q) k^T, the logits from the pre-scaled rows qs.
// Without a key side this is the dq pass of the general backward; with the key side equal to
// the row side (k is q) it is the one-pass symmetric backward dz = s (W + W^T) z.
template <typename scalar_t>
void dq_pass(const at::Tensor& qs, const at::Tensor& k, double s, const at::Tensor& g,
             const at::Tensor& r, const ExclusionRule& ex, const KeySide* key_side, at::Tensor& dq,
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
        const scalar_t* l = logits.data_ptr<scalar_t>();
        at::Tensor w = logits.sub(r_rows);
        mask_tile(w.data_ptr<scalar_t>(), l, rows, cols, ex, false, neg_inf);
        w.exp_().mul_(g_rows);
        dscale += at::dot(w.view(-1), logits.view(-1)).item<double>();  // BLAS dot, no temporary
        if (key_side != nullptr) {
          // V_ji: the same logits, the keys' rho and h, the keys' exclusions (a transposed mask).
          at::Tensor v = logits.sub(key_side->lse.narrow(0, cols.begin, cols.size).unsqueeze(0));
          mask_tile(v.data_ptr<scalar_t>(), l, rows, cols, key_side->ex, true, neg_inf);
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

// A CPU-side copy of the arguments: q and k widened and contiguous (working_copy), the index
// tensors contiguous (the exclusion rule reads raw pointers).
LseArgs cpu_args(const LseArgs& in, const char* op) {
  TORCH_CHECK(in.q.device().is_cpu(), op, " (cpu): q must be a CPU tensor");
  LseArgs a = in;
  a.q = working_copy(in.q);
  a.k = in.symmetric ? a.q : working_copy(in.k);
  a.exclude = in.exclude.contiguous();
  a.labels = {in.labels.row_labels.contiguous(), in.labels.key_labels.contiguous(),
              in.labels.positive.contiguous(), in.labels.threshold.contiguous()};
  if (in.grad.defined()) {
    a.grad = in.grad.detach().contiguous();
    a.lse = in.lse.detach().contiguous();
  }
  if (in.paired) {
    const KeySideTensors& ks = in.key_side;
    a.key_side = {ks.grad.detach().contiguous(), ks.lse.detach().contiguous(), ks.exclude.contiguous(),
                  ks.positive.contiguous(), ks.threshold.contiguous()};
  }
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lse_forward_cpu(const LseArgs& args) {
  const LseArgs a = cpu_args(args, "lse_fwd");
  const ExclusionRule ex = a.row_rule();
  const at::Tensor& q = a.q;
  const at::Tensor& k = a.k;
  const int64_t M = a.M(), N = a.N();
  const at::Tensor qs = q.mul(a.scale.item<double>());  // pre-scaled rows: (s q) k^T are the logits
  at::Tensor out = at::empty({M}, q.options());
  at::Tensor dropped = at::zeros({M}, q.options().dtype(at::kInt));
  int32_t* counts = ex.thresholded() ? dropped.data_ptr<int32_t>() : nullptr;

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
          mask_tile(t.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), rows, cols, ex, false, neg_inf, counts);
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
  return {out, dropped};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_backward_cpu(const LseArgs& args) {
  const LseArgs a = cpu_args(args, "lse_bwd");
  const ExclusionRule ex = a.row_rule();
  const at::Tensor& q = a.q;
  const at::Tensor& k = a.k;
  const at::Tensor& g = a.grad;
  const at::Tensor& r = a.lse;
  const bool symmetric = a.symmetric;
  const int64_t M = a.M(), N = a.N();
  const double s = a.scale.item<double>();
  const int64_t row_blocks = num_blocks(M, kRows), key_blocks = num_blocks(N, kKeys);
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = symmetric ? at::empty({0}, args.q.options()) : at::empty_like(k);
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
          const at::Tensor logits = at::mm(kb, qs.narrow(0, rows.begin, rows.size).t());
          at::Tensor wt = logits.sub(r.narrow(0, rows.begin, rows.size).unsqueeze(0));
          mask_tile(wt.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), keys, rows, ex, true,
                    -std::numeric_limits<scalar_t>::infinity());
          wt.exp_().mul_(g.narrow(0, rows.begin, rows.size).unsqueeze(0));
          acc.addmm_(wt, qb);
        }
        dk.narrow(0, keys.begin, keys.size).copy_(acc.mul_(s));
      }
    });
  });

  return {dq.to(args.q.scalar_type()), symmetric ? dk : dk.to(args.k.scalar_type()),
          ordered_sum(dscale_parts, a.scale)};
}

std::tuple<at::Tensor, at::Tensor> lse_backward_paired_cpu(const LseArgs& args) {
  const LseArgs a = cpu_args(args, "lse_bwd_paired");
  const ExclusionRule ex = a.row_rule();
  // On the key side the roles swap: key j is the row, the rows of q (numbered from row_offset)
  // are its keys, and the labels are looked up the other way round.
  const KeySide keys{a.key_side.grad, a.key_side.lse, a.key_rule()};
  at::Tensor dq = at::empty_like(a.q);
  std::vector<double> dscale_parts(num_blocks(a.M(), kRows), 0.0);
  AT_DISPATCH_FLOATING_TYPES(a.q.scalar_type(), "lse_bwd_paired_cpu", [&] {
    const double s = a.scale.item<double>();
    dq_pass<scalar_t>(a.q.mul(s), a.k, s, a.grad, a.lse, ex, &keys, dq, dscale_parts);
  });
  return {dq.to(args.q.scalar_type()), ordered_sum(dscale_parts, a.scale)};
}

}  // namespace infonce_kernels
