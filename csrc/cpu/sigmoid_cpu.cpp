// CPU kernels of _sigmoid_fwd / _sigmoid_bwd, the pairwise sigmoid (SigLIP) loss (schemas and
// maths in csrc/ops.cpp; docs/design.md, The pairwise sigmoid op; registered in
// csrc/cpu/register_cpu.cpp).
//
//   l_ij = t <x_i, y_j> + b,  rows_i = sum_j softplus(-z_ij l_ij),  G_ij = g_i (sigmoid(l_ij) - [z_ij = 1])
//   dx = t G y,  dy = t G^T x,  dt = sum_ij G_ij <x_i, y_j>,  db = sum_ij G_ij
//
// A (rows x cols) tile of dot products comes from BLAS (at::mm); the loss, G and the four
// gradient contributions are taken from that tile with ATen's vectorised ops while it sits in
// cache, so the extra memory is a few tiles per thread plus O((M + N) d): no M x N tensor.
// Every pair is first treated as a negative (softplus(l), sigmoid(l)); the positives (at most one
// per row under the diagonal rule, a mask under the label rule) are then corrected.
//
// The forward with gradients (with_grad) and the backward sweep every tile once and write both
// dx (owned by row blocks) and dy (owned by column blocks). With G row groups and G column
// groups, round k gives row group p the column group (p + k) mod G: within a round no two tasks
// share rows or columns, so dx and dy are written without atomics, without per-thread copies of
// dy and without recomputing a tile; the summation order does not depend on the thread count.
// Inputs in float16/bfloat16 are widened to float32 once (O((M + N) d)); float64 stays float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/sigmoid_impls.h"

namespace infonce_kernels {
namespace {

// A 64 x 512 float32 tile is 128 KiB: the dots, the logits and G stay in L2 together.
constexpr int64_t kRows = 64;
constexpr int64_t kCols = 512;
constexpr int64_t kGroups = 16;    // row groups = column groups of the gradient sweep, at most
constexpr int64_t kMinGroup = 16;  // rows (columns) per group, at least: a side of 64 rows still gives 4 groups

struct Span {
  int64_t begin;
  int64_t size;
  int64_t end() const { return begin + size; }
};

// Part p of [0, total) cut into `parts` near-equal contiguous pieces.
inline Span part(int64_t p, int64_t parts, int64_t total) {
  const int64_t begin = p * total / parts;
  return {begin, (p + 1) * total / parts - begin};
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// softplus(u) = max(u, 0) + log1p(exp(-|u|)), stable for every u.
inline double softplus(double u) { return std::max(u, 0.0) + std::log1p(std::exp(-std::abs(u))); }

struct Sweep {
  at::Tensor x, y;               // working copies: detached, accumulation dtype, contiguous
  double t = 1.0, b = 0.0;
  at::Tensor row_labels, col_labels;  // contiguous int64, undefined without the label rule
  int64_t offset = 0;
  at::Tensor grad;               // (M,) upstream gradient, undefined for a unit gradient
  // Outputs (accumulation dtype): rows (M,) when the loss is wanted, dx (M, d), dy (N, d) when
  // gradients are; dx and dy are t-free here (scaled by t once, at the end).
  at::Tensor rows, dx, dy;
  double softplus_threshold = 20.0;  // at::softplus returns u above it: log1p(exp(-u)) < eps * u

  bool labelled() const { return row_labels.defined(); }

  // One tile: rows R against columns C. Adds to rows (if defined), dx, dy (if defined) and the
  // caller's dt, db partials.
  template <typename scalar_t>
  void tile(Span R, Span C, double& dt, double& db) const {
    const at::Tensor xb = x.narrow(0, R.begin, R.size);
    const at::Tensor yb = y.narrow(0, C.begin, C.size);
    const at::Tensor dots = at::mm(xb, yb.t());
    at::Tensor l = dots.mul(t).add_(b);
    at::Tensor positive;  // label rule: (R, C) bool
    if (labelled()) {
      positive = at::eq(row_labels.narrow(0, R.begin, R.size).unsqueeze(1),
                        col_labels.narrow(0, C.begin, C.size).unsqueeze(0));
    }
    // The diagonal rule's positives in this tile: row ii meets column i + offset - C.begin.
    auto for_diagonal = [&](auto&& visit) {
      for (int64_t ii = 0; ii < R.size; ++ii) {
        const int64_t jj = R.begin + ii + offset - C.begin;
        if (jj >= 0 && jj < C.size) visit(ii * C.size + jj);
      }
    };
    if (rows.defined()) {
      at::Tensor loss;
      if (labelled()) {
        loss = at::softplus(at::where(positive, l.neg(), l), 1, softplus_threshold);
      } else {
        loss = at::softplus(l, 1, softplus_threshold);
        scalar_t* lp = l.data_ptr<scalar_t>();
        scalar_t* sp = loss.data_ptr<scalar_t>();
        for_diagonal([&](int64_t e) { sp[e] = static_cast<scalar_t>(softplus(-static_cast<double>(lp[e]))); });
      }
      rows.narrow(0, R.begin, R.size).add_(loss.sum(1));
    }
    if (!dx.defined()) return;
    at::Tensor G = l.sigmoid_();  // l is not needed any more
    if (labelled()) {
      G.sub_(positive.to(G.scalar_type()));
    } else {
      scalar_t* gp = G.data_ptr<scalar_t>();
      for_diagonal([&](int64_t e) { gp[e] -= scalar_t(1); });
    }
    if (grad.defined()) G.mul_(grad.narrow(0, R.begin, R.size).unsqueeze(1));
    dt += at::dot(G.view(-1), dots.view(-1)).item<double>();  // BLAS dot, no temporary
    db += G.sum().item<double>();
    dx.narrow(0, R.begin, R.size).addmm_(G, yb);
    dy.narrow(0, C.begin, C.size).addmm_(G.t(), xb);
  }

  // Every tile of the rows of R against the columns of C, in blocks of kRows x kCols.
  template <typename scalar_t>
  void region(Span R, Span C, double& dt, double& db) const {
    for (int64_t r = R.begin; r < R.end(); r += kRows) {
      for (int64_t c = C.begin; c < C.end(); c += kCols) {
        tile<scalar_t>({r, std::min(kRows, R.end() - r)}, {c, std::min(kCols, C.end() - c)}, dt, db);
      }
    }
  }

  // The loss alone: row blocks in parallel, each against every column.
  template <typename scalar_t>
  void loss_only() const {
    const int64_t M = x.size(0), N = y.size(0);
    at::parallel_for(0, ceil_div(M, kRows), 1, [&](int64_t b0, int64_t b1) {
      double unused_dt = 0.0, unused_db = 0.0;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r = blk * kRows;
        region<scalar_t>({r, std::min(kRows, M - r)}, {0, N}, unused_dt, unused_db);
      }
    });
  }

  // Loss (if rows is defined) and gradients, in G rounds of G disjoint (row group, column group)
  // tasks (see the file comment). Returns (dt, db) summed in a fixed order.
  template <typename scalar_t>
  std::pair<double, double> with_gradients() const {
    const int64_t M = x.size(0), N = y.size(0);
    // Enough groups to keep every thread busy, but none narrower than a column block where the
    // columns allow: tiny regions make many small BLAS calls (B = 1,024 took 16 x 16 regions of
    // 64 x 64). Depends on the shape only, so results do not depend on the thread count.
    const int64_t groups = std::max<int64_t>(
        1, std::min({kGroups, std::max<int64_t>(4, ceil_div(N, kCols)), M / kMinGroup, N / kMinGroup}));
    std::vector<double> dt_parts(groups * groups, 0.0), db_parts(groups * groups, 0.0);
    for (int64_t round = 0; round < groups; ++round) {
      at::parallel_for(0, groups, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t c = (p + round) % groups;
          region<scalar_t>(part(p, groups, M), part(c, groups, N), dt_parts[p * groups + round],
                           db_parts[p * groups + round]);
        }
      });
    }
    double dt = 0.0, db = 0.0;
    for (int64_t i = 0; i < groups * groups; ++i) {
      dt += dt_parts[i];
      db += db_parts[i];
    }
    return {dt, db};
  }
};

// The sweep's working copies. Detaching matters: at::parallel_for's worker threads do not
// inherit the caller's "below autograd" dispatch state, so tiles computed there from a tensor
// that requires grad would be recorded by autograd and kept alive (O(M N) memory).
Sweep make_sweep(const SigmoidArgs& a, const char* op) {
  TORCH_CHECK(a.x.device().is_cpu(), op, " (cpu): x must be a CPU tensor");
  const auto acc = sigmoid_accumulate_type(a.x.scalar_type());
  Sweep s;
  s.x = a.x.detach().to(acc).contiguous();
  s.y = a.y.detach().to(acc).contiguous();
  s.t = a.scale.item<double>();
  s.b = a.bias.item<double>();
  s.offset = a.offset;
  if (a.labelled()) {
    s.row_labels = a.row_labels.contiguous();
    s.col_labels = a.col_labels.contiguous();
  }
  if (a.grad.defined()) s.grad = a.grad.detach().contiguous();
  if (acc == at::kDouble) s.softplus_threshold = 40.0;
  return s;
}

// [dx, dy, dscale, dbias] from a finished gradient sweep: dx, dy scaled by t and cast to the
// input dtype, dscale and dbias 0-d in the accumulation dtype.
std::vector<at::Tensor> gradients(const Sweep& s, const SigmoidArgs& a, std::pair<double, double> dt_db) {
  return {s.dx.mul_(s.t).to(a.x.scalar_type()), s.dy.mul_(s.t).to(a.y.scalar_type()),
          at::scalar_tensor(dt_db.first, a.scale.options()), at::scalar_tensor(dt_db.second, a.bias.options())};
}

}  // namespace

std::vector<at::Tensor> sigmoid_forward_cpu(const SigmoidArgs& args, bool with_grad) {
  Sweep s = make_sweep(args, "sigmoid_fwd");
  s.rows = at::zeros({args.M()}, s.x.options());
  if (!with_grad) {
    AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "sigmoid_fwd_cpu", [&] { s.loss_only<scalar_t>(); });
    return {s.rows};
  }
  s.dx = at::zeros_like(s.x);
  s.dy = at::zeros_like(s.y);
  std::pair<double, double> dt_db;
  AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "sigmoid_fwd_cpu", [&] { dt_db = s.with_gradients<scalar_t>(); });
  std::vector<at::Tensor> out = gradients(s, args, dt_db);
  out.insert(out.begin(), s.rows);
  return out;
}

std::vector<at::Tensor> sigmoid_backward_cpu(const SigmoidArgs& args) {
  Sweep s = make_sweep(args, "sigmoid_bwd");
  s.dx = at::zeros_like(s.x);
  s.dy = at::zeros_like(s.y);
  std::pair<double, double> dt_db;
  AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "sigmoid_bwd_cpu", [&] { dt_db = s.with_gradients<scalar_t>(); });
  return gradients(s, args, dt_db);
}

}  // namespace infonce_kernels
