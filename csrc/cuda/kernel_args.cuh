// The per-side arguments of the backward kernels (passed by value as kernel parameters) and the
// roles of a backward pass (docs/design.md, The primitive).
#pragma once

#include <cstdint>

#include "../common/exclusion.h"
#include "lse_kernels.h"

namespace infonce_cuda {

using infonce_kernels::label_excluded;
using infonce_kernels::threshold_dropped;
using infonce_kernels::tile_index;

// Every backward kernel works on a tile of rows ("X", the A operand) against a tile of columns
// ("Y"); a QuerySide holds one side's per-row (query) data.
//   kRow: X = q, Y = k.  Row term, X rows' QuerySide (xq).          -> dq (and dscale)
//   kCol: X = k, Y = q.  Column term, Y rows' QuerySide (yq).       -> dk
//   kSym: X = q, Y = k.  Both terms (W + W^T, or W + V^T when paired) -> dq / dz (and dscale)
enum Mode : int { kRow = 0, kCol = 1, kSym = 2 };


// One side's rows acting as queries (passed by value as a kernel parameter). A = float for the
// fp16 / bf16 / fp32 kernels, double for fp64.
//   grad, lse: (n,) upstream gradient and log-sum-exp of these rows;
//   exclude:   (n, E) lists of the keys each row leaves out, -1 = none (nullptr when E == 0);
//   labels, positive: (n,) the label rule (nullptr when it is off, or unused by the mode);
//     positive is also the threshold rule's;
//   threshold: (n,) the threshold rule (false-negative filtering; nullptr when it is off).
template <typename A>
struct QuerySide {
  const A* grad;
  const A* lse;
  const int64_t* exclude;
  const int64_t* labels;
  const int64_t* positive;
  int E;
  const A* threshold;
};

// The two sides of a backward as the kernels see them. rows: the rows of q as queries (grad,
// lse, exclude, row_labels, positive; keys numbered like k); keys: the rows of k as queries
// (paired: key_grad, key_lse, key_exclude, key_labels, key_positive; their keys are the rows of
// q numbered from row_offset). Symmetric: keys = rows, row_offset = 0. The label pointers are
// all nullptr when the rule is off. Inside a kernel: xq = rows, y_key_labels = key_labels,
// yq = keys, x_key_labels = row_labels, x_offset = row_offset (kCol passes the rows of q as
// `keys`, its Y side, and nothing as `rows`).
template <typename A>
struct Sides {
  QuerySide<A> rows;
  const int64_t* key_labels;  // (N,) labels of the rows of k as keys of the rows of q
  QuerySide<A> keys;
  const int64_t* row_labels;  // (M,) labels of the rows of q as keys of the rows of k
  int64_t row_offset;
};

// Whether either side has the threshold rule (the backward kernels' THR instantiation).
template <typename A>
bool has_threshold(const Sides<A>& s) {
  return s.rows.threshold != nullptr || s.keys.threshold != nullptr;
}

// One side's rows as queries, from the launch parameters (grad / lse typed A).
template <typename A>
QuerySide<A> query_side(const void* grad, const void* lse, const infonce_kernels::ExclusionRule& rule) {
  return {static_cast<const A*>(grad), static_cast<const A*>(lse), rule.lists, rule.row_labels, rule.positive,
          static_cast<int>(rule.E), static_cast<const A*>(rule.threshold)};
}

// Symmetric lse_backward: the key side is the row side (k is q, row_offset 0).
template <typename A>
Sides<A> symmetric_sides(const LseParams& p) {
  const QuerySide<A> rows = query_side<A>(p.grad, p.lse, p.rows);
  return {rows, p.rows.key_labels, rows, p.rows.key_labels, 0};
}

// lse_backward_paired: the key side's own gradient, log-sum-exp and rule (p.keys numbers the rows
// of q from its key_offset = row_offset; its row labels are the key labels and vice versa).
template <typename A>
Sides<A> paired_sides(const LseParams& p) {
  return {query_side<A>(p.grad, p.lse, p.rows), p.rows.key_labels, query_side<A>(p.key_grad, p.key_lse, p.keys),
          p.keys.key_labels, p.keys.key_offset};
}

}  // namespace infonce_cuda
