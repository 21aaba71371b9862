// One sweep of the pairwise sigmoid kernels as the kernels see it (a kernel parameter, by value),
// and the sweep kinds. A = the accumulation type (float; double for fp64 inputs).
//
//   row sweep:    own = x (n_own = M), other = y, offset as given; g indexed by own rows;
//                 writes loss rows (kLoss kinds), dout = dx, dt_part[blockIdx.x * gridDim.y +
//                 blockIdx.y] = this CTA's chunk of sum_i g_i <x_i, sum_j (G_ij / g_i) y_j> and
//                 db_part[blockIdx.x] (blockIdx.y == 0) = its sum of G_ij.
//   column sweep: own = y (n_own = N), other = x, offset negated; g indexed by other rows (scaled
//                 by 1 / *gmax in the fp16 / bf16 path, *gmax multiplied back at the end);
//                 writes dout = dy.
#pragma once

#include <cstdint>

namespace infonce_cuda {

// Template kinds of the sweep kernels: which outputs one launch computes.
enum SweepKind : int {
  kLossOnly = 0,  // row sweep, loss rows only (the forward without gradients)
  kLossGrad = 1,  // row sweep, loss rows + dx + partials (the fused forward)
  kRowGrad = 2,   // row sweep, dx + partials (the backward)
  kColGrad = 3,   // column sweep, dy
};

template <typename A>
struct Sweep {
  const void* own;
  const void* other;
  const A* scale;
  const A* bias;
  const int64_t* own_labels;    // nullptr: the offset rule
  const int64_t* other_labels;
  const A* g;                   // nullptr: g = 1
  const float* gmax;            // fp16 / bf16 column sweep with g; else nullptr (1)
  int64_t n_own, n_other, d;
  int64_t off;                  // offset (row sweep) or -offset (column sweep), clamped
  bool vec;                     // fp16 / bf16: d % 8 == 0 and 16-byte aligned rows
  A* loss;
  void* dout;
  A* dt_part;
  A* db_part;
};

}  // namespace infonce_cuda
