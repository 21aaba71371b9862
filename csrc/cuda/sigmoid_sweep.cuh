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

// The row sweep's epilogue: the CTA's sums of its threads' dt and db (warp shuffles, then the
// warps through sRed, a __shared__ [2][THREADS / 32]), written by thread 0 to the partials: dt per
// (row block, output chunk), db per row block (output chunk 0 only). Every thread must call it.
template <int THREADS, typename A>
__device__ __forceinline__ void write_scale_bias_partials(A dt, A db, A (&sRed)[2][THREADS / 32],
                                                          const Sweep<A>& a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    dt += __shfl_xor_sync(0xffffffffu, dt, o);
    db += __shfl_xor_sync(0xffffffffu, db, o);
  }
  if (lane == 0) {
    sRed[0][warp] = dt;
    sRed[1][warp] = db;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    A st = A(0), sb = A(0);
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) {
      st += sRed[0][w];
      sb += sRed[1][w];
    }
    a.dt_part[int64_t(blockIdx.x) * gridDim.y + blockIdx.y] = st;
    if (blockIdx.y == 0) a.db_part[blockIdx.x] = sb;
  }
}

}  // namespace infonce_cuda
