// infonce_kernels — CUDA kernels for the masked, scaled row log-sum-exp and its backward.
//
// Mathematics (DESIGN.md §1, notes/contract.md), never materialising an M x N matrix:
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
// Exclusion of pair (query row i, key j) -- the same rule as csrc/cpu/lse_cpu.cpp `mask_tile` and
// infonce_kernels/reference.py `excluded()`:
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

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace infonce_cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

enum Mode : int { kRow = 0, kCol = 1, kSym = 2 };

// Label-rule test of one pair, given the query row's label, the key's label, and the key's local
// index `lk` against the query row's positive as a local index `lp` of the same tile (-1 = none
// or outside the tile, never equal to a local index).
__device__ __forceinline__ bool label_excluded(int64_t row_label, int64_t key_label, int lk,
                                               int lp) {
  return row_label == key_label && lk != lp;
}

// Index `e` (absolute) relative to a tile [base, base + size): local index, or -1 when outside.
// -1 ("no exclusion") is always outside since base >= 0.
__device__ __forceinline__ int rel_index(int64_t e, int64_t base, int size) {
  return (e >= base && e < base + size) ? static_cast<int>(e - base) : -1;
}

// One side's rows acting as queries (passed by value as a kernel parameter). A = float for the
// fp16 / bf16 / fp32 kernels, double for fp64.
//   grad, lse: (n,) upstream gradient and log-sum-exp of these rows;
//   exclude:   (n, E) lists of the keys each row leaves out, -1 = none (nullptr when E == 0);
//   labels, positive: (n,) the label rule (nullptr when it is off, or unused by the mode).
template <typename A>
struct QuerySide {
  const A* grad;
  const A* lse;
  const int64_t* exclude;
  const int64_t* labels;
  const int64_t* positive;
  int E;
};

// ================================================================================================
// fp16 / bf16 tensor-core path
// ================================================================================================
constexpr int kMmaThreads = 128;  // 4 warps
constexpr int kBM = 64;           // rows per CTA: 16 per warp
constexpr int kBN = 64;           // columns (keys) per tile
constexpr int kDK = 128;          // feature chunk of the S = X Y^T product
constexpr int kDV = 128;          // output feature chunk of the backward (grid.y)
constexpr int kLds = kDK + 8;     // smem row stride in 16-bit elements: 272 B, 16-B aligned rows,
                                  // 17 x 16 B apart -> the 8 rows of one ldmatrix phase hit 8
                                  // distinct bank groups (conflict free)
constexpr int kTileElems = 64 * kLds;  // one 64 x kDK tile (kBM == kBN == 64)
static_assert(kBM == 64 && kBN == 64, "tile loaders assume 64-row tiles");
static_assert(kDV == kDK, "when d <= kDK the key tile doubles as the value tile");

struct F16Tag {
  using T = __half;
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // lo -> low 16 bits (the element with the smaller k index), as mma expects.
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ T from_float(float x) { return __float2half_rn(x); }
};

struct BF16Tag {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ T from_float(float x) { return __float2bfloat16_rn(x); }
};

// ldmatrix: lanes 8i..8i+7 give the row addresses of 8x8 matrix i (8 contiguous 16-bit values,
// 16-B aligned). Result reg i, lane l: (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i;
// with .trans: (rows 2(l%4), 2(l%4)+1, col l/4).
__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                        const uint16_t* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                              uint32_t& r3, const uint16_t* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a));
}

// Copy rows [row0, row0+64) x cols [col0, col0+kDK) of a (nrows x d) row-major 16-bit matrix into
// a 64 x kLds smem tile; everything outside the matrix is zero (so padded rows/cols add 0 to dot
// products). vec: d % 8 == 0 and 16-B aligned base, so 8-element chunks are all-in or all-out.
__device__ __forceinline__ void load_tile16(uint16_t* __restrict__ s, const uint16_t* __restrict__ g,
                                            int64_t row0, int64_t nrows, int64_t col0, int64_t d,
                                            bool vec) {
  if (vec) {
    constexpr int kCpr = kDK / 8;  // 16-B chunks per row
#pragma unroll 4
    for (int i = threadIdx.x; i < 64 * kCpr; i += kMmaThreads) {
      const int r = i / kCpr, c = (i % kCpr) * 8;
      const int64_t gr = row0 + r, gc = col0 + c;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (gr < nrows && gc < d) v = __ldg(reinterpret_cast<const uint4*>(g + gr * d + gc));
      *reinterpret_cast<uint4*>(s + r * kLds + c) = v;
    }
  } else {
    for (int i = threadIdx.x; i < 64 * kDK; i += kMmaThreads) {
      const int r = i / kDK, c = i % kDK;
      const int64_t gr = row0 + r, gc = col0 + c;
      uint16_t v = 0;  // bit pattern of +0 in fp16 and bf16
      if (gr < nrows && gc < d) v = g[gr * d + gc];
      s[r * kLds + c] = v;
    }
  }
}

// s[nt][.] += X_tile(warp's 16 rows, k chunk) * Y_tile(64 cols, k chunk)^T.
// Accumulator layout (m16n8 C fragment), lane = 4*gq + tq:
//   s[nt][0], s[nt][1]: row gq,     cols nt*8 + 2tq, +1
//   s[nt][2], s[nt][3]: row gq + 8, cols nt*8 + 2tq, +1
// kvalid: number of valid features in this chunk (k-steps past it are all-zero and skipped).
template <typename Tag>
__device__ __forceinline__ void mma_qk(float (&s)[8][4], const uint16_t* sX, const uint16_t* sY,
                                       int warp, int lane, int kvalid) {
  // A (16x16, row major) from X: matrices (rows 0-7|8-15) x (cols 0-7|8-15) -> a0..a3.
  const uint16_t* pa =
      sX + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLds + (lane >> 4) * 8;
  // B (16x8, "col") = Y^T: b0 = Y[key gq][k 2tq..], b1 = Y[key gq][k 8+2tq..]; x4 covers two
  // n-tiles: (keys 0-7, k 0-7), (keys 0-7, k 8-15), (keys 8-15, k 0-7), (keys 8-15, k 8-15).
  const uint16_t* pb = sY + ((lane & 7) + (lane >> 4) * 8) * kLds + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int ks = 0; ks < kDK / 16; ++ks) {
    if (ks * 16 < kvalid) {
      uint32_t a[4];
      ldsm_x4(a[0], a[1], a[2], a[3], pa + ks * 16);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(b0, b1, b2, b3, pb + np * 16 * kLds + ks * 16);
        Tag::mma(s[2 * np], a, b0, b1);
        Tag::mma(s[2 * np + 1], a, b2, b3);
      }
    }
  }
}

// Forward: one CTA per 64-row block of q, loop over all key blocks, online LSE in the log2
// domain (x = S * s * log2(e)); r = ln(2) * (m + log2(l)).
// Registers: 32 fp32 accumulators + row state; no spills (see the ptxas report): 88-115 per
// thread, 126 with LBL, where ptxas (13.0) settles on a 128-register budget -- keep the label
// state compact (the bit masks below) or add a min-blocks hint if a change makes it spill.
template <typename Tag, bool LBL>
__global__ void __launch_bounds__(kMmaThreads)
    lse_fwd_mma_kernel(const uint16_t* __restrict__ X, const uint16_t* __restrict__ Y,
                       const float* __restrict__ scale_ptr, const int64_t* __restrict__ exclude,
                       const int64_t* __restrict__ row_labels,
                       const int64_t* __restrict__ key_labels,
                       const int64_t* __restrict__ positive, int64_t M, int64_t N, int64_t d,
                       int E, bool vec, float* __restrict__ lse) {
  extern __shared__ __align__(16) uint16_t smem16[];
  uint16_t* sX = smem16;
  uint16_t* sY = smem16 + kTileElems;
  __shared__ int64_t sKL[LBL ? kBN : 1];  // key labels of the current key tile (LBL only)

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int64_t row_base = int64_t(blockIdx.x) * kBM;
  const float scale2 = __ldg(scale_ptr) * kLog2e;

  int64_t row[2], ex[2][2];
  int64_t rl[2] = {0, 0}, rp[2] = {-1, -1};  // row label, positive (LBL only)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = row_base + warp * 16 + gq + 8 * h;
    ex[h][0] = ex[h][1] = -1;
    if (row[h] < M) {
      if (E > 0) ex[h][0] = exclude[row[h] * E];
      if (E > 1) ex[h][1] = exclude[row[h] * E + 1];
      if (LBL) {
        rl[h] = row_labels[row[h]];
        rp[h] = positive[row[h]];
      }
    }
  }
  float m[2] = {-INFINITY, -INFINITY};  // running max (log2 domain), same in the 4 lanes of a quad
  float l[2] = {0.f, 0.f};              // this lane's partial running sum, relative to m

  const int nchunks = static_cast<int>((d + kDK - 1) / kDK);
  const bool x_resident = nchunks == 1;  // d <= kDK: the q tile is loaded once
  if (x_resident) load_tile16(sX, X, row_base, M, 0, d, vec);

  for (int64_t col_base = 0; col_base < N; col_base += kBN) {
    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;

    for (int c = 0; c < nchunks; ++c) {
      __syncthreads();  // everyone is done reading the previous tiles (and sKL)
      if (!x_resident) load_tile16(sX, X, row_base, M, int64_t(c) * kDK, d, vec);
      load_tile16(sY, Y, col_base, N, int64_t(c) * kDK, d, vec);
      if (LBL && c == 0 && threadIdx.x < kBN) {
        const int64_t j = col_base + threadIdx.x;
        sKL[threadIdx.x] = j < N ? key_labels[j] : 0;  // columns >= N are masked by cvalid
      }
      __syncthreads();
      const int kvalid = static_cast<int>(d - int64_t(c) * kDK < kDK ? d - int64_t(c) * kDK : kDK);
      mma_qk<Tag>(s, sX, sY, warp, lane, kvalid);
    }

    const int cvalid = static_cast<int>(N - col_base < kBN ? N - col_base : kBN);
    // Label rule as one 16-bit mask per row (bit 2 nt + e = this lane's column nt*8 + 2tq + e):
    // each key label is read from shared memory once and consumed at once for both rows. Testing
    // sKL inside the loop below instead kept all 16 labels (32 registers) live across the two
    // rows and ptxas (13.0, sm_80) spilled 24 B.
    uint32_t lmask[2] = {0u, 0u};
    if (LBL) {
      const int xp0 = rel_index(rp[0], col_base, kBN), xp1 = rel_index(rp[1], col_base, kBN);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int lc = nt * 8 + 2 * tq + e;
          const int64_t kl = sKL[lc];
          lmask[0] |= uint32_t(label_excluded(rl[0], kl, lc, xp0)) << (2 * nt + e);
          lmask[1] |= uint32_t(label_excluded(rl[1], kl, lc, xp1)) << (2 * nt + e);
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int x0 = rel_index(ex[h][0], col_base, kBN), x1 = rel_index(ex[h][1], col_base, kBN);
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int lc = nt * 8 + 2 * tq + e;
          bool ok = lc < cvalid && lc != x0 && lc != x1;
          if (LBL) ok &= ((lmask[h] >> (2 * nt + e)) & 1u) == 0u;
          const float x = ok ? s[nt][2 * h + e] * scale2 : -INFINITY;
          s[nt][2 * h + e] = x;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mnew = fmaxf(m[h], mx);
      // All keys of the row excluded so far: nothing to add, and skipping avoids
      // exp2(-inf - (-inf)) = NaN. mnew is quad-uniform, so the quad does not diverge.
      if (mnew != -INFINITY) {
        float acc = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) acc += exp2f(s[nt][2 * h + e] - mnew);  // exp2(-inf) = 0
        l[h] = l[h] * exp2f(m[h] - mnew) + acc;  // m[h] = -inf -> factor 0, l[h] was 0
        m[h] = mnew;
      }
    }
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = l[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    // sum == 0 only for a fully excluded row (a caller error): r = -inf, not NaN.
    if (tq == 0 && row[h] < M) lse[row[h]] = (m[h] + log2f(sum)) * kLn2;
  }
}

// Backward, one CTA per (64-row block of X, 128-wide feature chunk of the output).
//   For each 64-column block of Y: S = X Y^T (fp32, tensor cores), then per entry
//     kRow: W' = P_ab                          (g_a is applied per row at the end)
//     kCol: W' = g_b P_ba / gmax               (b is a query, a a key)
//     kSym: W' = (g_a P_ab + g_b P_ba) / gmax  (g_b, P_ba from the column side yq: the row side
//                                               itself when symmetric, h_b and rho_b when paired)
//   and acc += W' Y[:, chunk] with a second mma (A = W' straight from the S accumulators: the
//   m16n8 C fragments of two adjacent n-tiles are exactly the m16k16 A fragment).
// Precision: W' is rounded to the input dtype (fp16 / bf16) for the second mma, the same choice
// as flash-attention's P; accumulation stays fp32. To keep W' inside fp16's normal range, the
// factor pulled out is g_a itself (kRow: W' = P in [0, 1]) or gmax = max_b |g_b| (kCol/kSym:
// |W'| <= 2; gmax = max over both sides' gradients when paired) -- a plain g_b P with g = 1/M
// would fall into fp16 subnormals for M > 16384.
// dscale partial (kRow, kSym; blockIdx.y == 0 only): sum_ab g_a P_ab S_ab in fp32, exact W.
// Registers: 64 (output acc) + 32 (S) fp32 + fragments: 177-195 per thread (201-225 with LBL), no
// spills. The
// min-blocks hint 2 of __launch_bounds__ matters: with (128) alone ptxas (13.0) chose a 168-register
// budget for kRow on sm_80 and spilled 52 B; with (128, 2) the budget is 255 and nothing spills.
// Labels (LBL): the row term reads xq.labels / xq.positive of the X rows (registers) and
// y_key_labels of the Y columns (shared); the column term (kCol, kSym) reads x_key_labels of the
// X rows (registers) and yq.labels / yq.positive of the Y columns (shared, positive made local to
// this CTA's row block like the exclusion lists).
// Arguments: xq = the X rows as queries (kRow, kSym; unused in kCol), y_key_labels = the Y
// columns' labels as keys (row term); yq = the Y columns as queries (kCol, kSym; unused in kRow),
// whose lists and positives number the X rows from x_offset, x_key_labels = the X rows' labels as
// keys (column term).
template <typename Tag, int MODE, bool LBL>
__global__ void __launch_bounds__(kMmaThreads, 2)
    lse_bwd_mma_kernel(const uint16_t* __restrict__ X, const uint16_t* __restrict__ Y,
                       const float* __restrict__ scale_ptr, const QuerySide<float> xq,
                       const int64_t* __restrict__ y_key_labels, const QuerySide<float> yq,
                       const int64_t* __restrict__ x_key_labels, int64_t x_offset, int64_t nX,
                       int64_t nY, int64_t d, bool vec, const float* __restrict__ gmax_ptr,
                       typename Tag::T* __restrict__ dX, float* __restrict__ dscale_partial) {
  extern __shared__ __align__(16) uint16_t smem16[];
  uint16_t* sX = smem16;
  uint16_t* sY = smem16 + kTileElems;
  uint16_t* sV = smem16 + 2 * kTileElems;  // only allocated (and used) when d > kDK
  // Column (= query) info of the current Y block, for kCol / kSym:
  __shared__ float sCr2[kBN];  // r_b * log2(e)
  __shared__ float sCg[kBN];   // g_b
  __shared__ int sCx0[kBN], sCx1[kBN];  // row b's exclusions, relative to this CTA's row block
  __shared__ float sRed[kMmaThreads / 32];
  // Label rule (LBL only; one-element dummies otherwise):
  constexpr bool kRowLbl = LBL && MODE != kCol;  // row term: X row = query, Y column = key
  constexpr bool kColLbl = LBL && MODE != kRow;  // column term: Y column = query, X row = key
  __shared__ int64_t sKL[kRowLbl ? kBN : 1];     // y_key_labels of the Y columns
  __shared__ int64_t sQL[kColLbl ? kBN : 1];     // yq.labels of the Y columns
  __shared__ int sQp[kColLbl ? kBN : 1];         // yq.positive of the Y columns, local to the X block

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int64_t row_base = int64_t(blockIdx.x) * kBM;
  const int64_t dv0 = int64_t(blockIdx.y) * kDV;
  const int dv_valid = static_cast<int>(d - dv0 < kDV ? d - dv0 : kDV);
  const float scale = __ldg(scale_ptr);
  const float scale2 = scale * kLog2e;
  float inv_gmax = 1.f, gmax = 1.f;
  if (MODE != kRow) {
    gmax = __ldg(gmax_ptr);
    inv_gmax = gmax > 0.f ? 1.f / gmax : 0.f;  // all-zero g: W' = 0 and the output is 0
  }

  // This thread's two rows (local lr = warp*16 + gq + 8h).
  int64_t row[2], ex[2][2];
  int64_t xrl[2] = {0, 0}, xrp[2] = {-1, -1};  // kRowLbl: xq.labels / xq.positive of the X row
  int64_t xkl[2] = {0, 0};                     // kColLbl: x_key_labels of the X row
  bool rv[2];
  float rr2[2], rg[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = row_base + warp * 16 + gq + 8 * h;
    rv[h] = row[h] < nX;
    ex[h][0] = ex[h][1] = -1;
    rr2[h] = 0.f;
    rg[h] = 0.f;
    if (MODE != kCol && rv[h]) {
      rr2[h] = xq.lse[row[h]] * kLog2e;
      rg[h] = xq.grad[row[h]];
      if (xq.E > 0) ex[h][0] = xq.exclude[row[h] * xq.E];
      if (xq.E > 1) ex[h][1] = xq.exclude[row[h] * xq.E + 1];
      if (kRowLbl) {
        xrl[h] = xq.labels[row[h]];
        xrp[h] = xq.positive[row[h]];
      }
    }
    if (kColLbl && rv[h]) xkl[h] = x_key_labels[row[h]];
  }

  float acc[16][4];
#pragma unroll
  for (int vt = 0; vt < 16; ++vt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[vt][e] = 0.f;
  float dsc = 0.f;

  const int nchunks = static_cast<int>((d + kDK - 1) / kDK);
  const bool x_resident = nchunks == 1;
  const bool need_v = nchunks > 1;  // else the (single) key tile holds features [0, kDK) = chunk
  if (x_resident) load_tile16(sX, X, row_base, nX, 0, d, vec);

  const uint16_t* pv_base = (need_v ? sV : sY) +
                            ((lane & 7) + ((lane >> 3) & 1) * 8) * kLds + (lane >> 4) * 8;

  for (int64_t col_base = 0; col_base < nY; col_base += kBN) {
    __syncthreads();  // everyone is done with the previous block's tiles and column info
    if (need_v) load_tile16(sV, Y, col_base, nY, dv0, d, vec);
    if (MODE != kRow && threadIdx.x < kBN) {
      const int64_t j = col_base + threadIdx.x;
      float r2 = 0.f, gg = 0.f;
      int x0 = -1, x1 = -1;
      if (j < nY) {
        r2 = yq.lse[j] * kLog2e;
        gg = yq.grad[j];
        // x_offset is subtracted from the entry, not added to row_base: see lse_bwd_simt_kernel.
        if (yq.E > 0) x0 = rel_index(yq.exclude[j * yq.E] - x_offset, row_base, kBM);
        if (yq.E > 1) x1 = rel_index(yq.exclude[j * yq.E + 1] - x_offset, row_base, kBM);
      }
      sCr2[threadIdx.x] = r2;
      sCg[threadIdx.x] = gg;
      sCx0[threadIdx.x] = x0;
      sCx1[threadIdx.x] = x1;
    }
    if (LBL && threadIdx.x < kBN) {  // columns >= nY are masked by cvalid: any value will do
      const int64_t j = col_base + threadIdx.x;
      const bool jv = j < nY;
      if (kRowLbl) sKL[threadIdx.x] = jv ? y_key_labels[j] : 0;
      if (kColLbl) {
        sQL[threadIdx.x] = jv ? yq.labels[j] : 0;
        sQp[threadIdx.x] = jv ? rel_index(yq.positive[j] - x_offset, row_base, kBM) : -1;
      }
    }

    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    for (int c = 0; c < nchunks; ++c) {
      if (c > 0) __syncthreads();
      if (!x_resident) load_tile16(sX, X, row_base, nX, int64_t(c) * kDK, d, vec);
      load_tile16(sY, Y, col_base, nY, int64_t(c) * kDK, d, vec);
      __syncthreads();  // also publishes sV and the column info
      const int kvalid = static_cast<int>(d - int64_t(c) * kDK < kDK ? d - int64_t(c) * kDK : kDK);
      mma_qk<Tag>(s, sX, sY, warp, lane, kvalid);
    }

    // S -> W' (in place), dscale partial from the exact fp32 W.
    const int cvalid = static_cast<int>(nY - col_base < kBN ? nY - col_base : kBN);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int lr = warp * 16 + gq + 8 * h;
      const int x0 = rel_index(ex[h][0], col_base, kBN), x1 = rel_index(ex[h][1], col_base, kBN);
      const int xp = kRowLbl ? rel_index(xrp[h], col_base, kBN) : -1;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int lc = nt * 8 + 2 * tq + e;
          const float sv = s[nt][2 * h + e];
          const bool cok = rv[h] && lc < cvalid;
          float w = 0.f;
          if (MODE != kCol) {  // W_ab: row a = X row (query), key b = Y column
            bool ok = cok && lc != x0 && lc != x1;
            if (kRowLbl) ok &= !label_excluded(xrl[h], sKL[lc], lc, xp);
            const float p = ok ? exp2f(sv * scale2 - rr2[h]) : 0.f;
            dsc += rg[h] * p * sv;
            w = (MODE == kRow) ? p : rg[h] * p;
          }
          if (MODE != kRow) {  // W_ba (V_ba when paired): row b = Y column (query), key a = X row
            bool ok = cok && lr != sCx0[lc] && lr != sCx1[lc];
            if (kColLbl) ok &= !label_excluded(sQL[lc], xkl[h], lr, sQp[lc]);
            w += ok ? sCg[lc] * exp2f(sv * scale2 - sCr2[lc]) : 0.f;
          }
          s[nt][2 * h + e] = (MODE == kRow) ? w : w * inv_gmax;
        }
    }

    // acc += W'(16 x 64) * V(64 keys x 128 features)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4];
      a[0] = Tag::pack(s[2 * kk][0], s[2 * kk][1]);          // row gq,   keys 16kk + 2tq..
      a[1] = Tag::pack(s[2 * kk][2], s[2 * kk][3]);          // row gq+8, keys 16kk + 2tq..
      a[2] = Tag::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);  // row gq,   keys 16kk + 8 + 2tq..
      a[3] = Tag::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);  // row gq+8, keys 16kk + 8 + 2tq..
      // B (16 keys x 8 features) = V, via ldmatrix.trans: matrices (keys 0-7, f 0-7),
      // (keys 8-15, f 0-7), (keys 0-7, f 8-15), (keys 8-15, f 8-15) -> b0,b1 of two n-tiles.
#pragma unroll
      for (int vp = 0; vp < kDV / 16; ++vp) {
        if (vp * 16 < dv_valid) {
          uint32_t b0, b1, b2, b3;
          ldsm_x4_trans(b0, b1, b2, b3, pv_base + kk * 16 * kLds + vp * 16);
          Tag::mma(acc[2 * vp], a, b0, b1);
          Tag::mma(acc[2 * vp + 1], a, b2, b3);
        }
      }
    }
  }

  // dX = s * (row factor) * acc
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!rv[h]) continue;
    const float f = (MODE == kRow) ? scale * rg[h] : scale * gmax;
    typename Tag::T* out = dX + row[h] * d + dv0;
#pragma unroll
    for (int vt = 0; vt < 16; ++vt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = vt * 8 + 2 * tq + e;
        if (col < dv_valid) out[col] = Tag::from_float(acc[vt][2 * h + e] * f);
      }
  }

  if (MODE != kCol && blockIdx.y == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dsc += __shfl_xor_sync(0xffffffffu, dsc, o);
    if (lane == 0) sRed[warp] = dsc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float t = 0.f;
#pragma unroll
      for (int w = 0; w < kMmaThreads / 32; ++w) t += sRed[w];
      dscale_partial[blockIdx.x] = t;
    }
  }
}

// ================================================================================================
// fp32 / fp64 SIMT path (plain FMA, exact in the input precision)
// ================================================================================================
constexpr int kSimtThreads = 256;  // 16 x 16
constexpr int kKC = 16;            // feature chunk of the S product

__device__ __forceinline__ float math_exp(float x) { return expf(x); }
__device__ __forceinline__ double math_exp(double x) { return exp(x); }
__device__ __forceinline__ float math_log(float x) { return logf(x); }
__device__ __forceinline__ double math_log(double x) { return log(x); }

// Thread (tx, ty) = (tid % 16, tid / 16) owns rows ty*TM + i and columns tx + 16 j (i, j < TM)
// of the (16TM x 16TM) tile. Shared tiles are stored feature-major (sX[k][row]) with a +1 pad
// so the transposing stores are conflict free; the compute reads are broadcasts / consecutive.
template <typename T, int TM>
__device__ __forceinline__ void simt_load_t(T (*s)[16 * TM + 1], const T* __restrict__ g,
                                            int64_t row0, int64_t nrows, int64_t k0, int64_t d) {
  constexpr int B = 16 * TM;
  for (int i = threadIdx.x; i < B * kKC; i += kSimtThreads) {
    const int r = i / kKC, kk = i % kKC;
    const int64_t gr = row0 + r, gk = k0 + kk;
    s[kk][r] = (gr < nrows && gk < d) ? g[gr * d + gk] : T(0);
  }
}

template <typename T, int TM>
__device__ __forceinline__ void simt_qk(T (&s)[TM][TM], T (*sX)[16 * TM + 1],
                                        T (*sY)[16 * TM + 1], int tx, int ty) {
#pragma unroll
  for (int kk = 0; kk < kKC; ++kk) {
    T a[TM], b[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) a[i] = sX[kk][ty * TM + i];
#pragma unroll
    for (int j = 0; j < TM; ++j) b[j] = sY[kk][tx + 16 * j];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TM; ++j) s[i][j] = fma(a[i], b[j], s[i][j]);
  }
}

// Forward (natural-log domain). Row reductions over the 16 lanes tx of a half warp.
template <typename T, int TM, bool LBL>
__global__ void __launch_bounds__(kSimtThreads, 2)
    lse_fwd_simt_kernel(const T* __restrict__ X, const T* __restrict__ Y,
                        const T* __restrict__ scale_ptr, const int64_t* __restrict__ exclude,
                        const int64_t* __restrict__ row_labels,
                        const int64_t* __restrict__ key_labels,
                        const int64_t* __restrict__ positive, int64_t M, int64_t N, int64_t d,
                        int E, T* __restrict__ lse) {
  constexpr int B = 16 * TM;
  __shared__ T sX[kKC][B + 1];
  __shared__ T sY[kKC][B + 1];
  __shared__ int64_t sKL[LBL ? B : 1];  // key labels of the current key tile (LBL only)
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t row_base = int64_t(blockIdx.x) * B;
  const T scale = scale_ptr[0];
  const T kNegInf = -static_cast<T>(INFINITY);

  int64_t row[TM], ex[TM][2];
  int64_t rl[TM], rp[TM];  // row label, positive (LBL only)
  T m[TM], l[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    row[i] = row_base + ty * TM + i;
    ex[i][0] = ex[i][1] = -1;
    rl[i] = 0;
    rp[i] = -1;
    if (row[i] < M) {
      if (E > 0) ex[i][0] = exclude[row[i] * E];
      if (E > 1) ex[i][1] = exclude[row[i] * E + 1];
      if (LBL) {
        rl[i] = row_labels[row[i]];
        rp[i] = positive[row[i]];
      }
    }
    m[i] = kNegInf;
    l[i] = T(0);
  }

  for (int64_t col_base = 0; col_base < N; col_base += B) {
    T s[TM][TM];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TM; ++j) s[i][j] = T(0);
    for (int64_t k0 = 0; k0 < d; k0 += kKC) {
      __syncthreads();  // previous tiles (and sKL) fully consumed
      simt_load_t<T, TM>(sX, X, row_base, M, k0, d);
      simt_load_t<T, TM>(sY, Y, col_base, N, k0, d);
      if (LBL && k0 == 0 && threadIdx.x < B) {
        const int64_t j = col_base + threadIdx.x;
        sKL[threadIdx.x] = j < N ? key_labels[j] : 0;  // columns >= N are masked by cvalid
      }
      __syncthreads();
      simt_qk<T, TM>(s, sX, sY, tx, ty);
    }
    const int cvalid = static_cast<int>(N - col_base < B ? N - col_base : B);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int x0 = rel_index(ex[i][0], col_base, B), x1 = rel_index(ex[i][1], col_base, B);
      const int xp = LBL ? rel_index(rp[i], col_base, B) : -1;
      T mx = kNegInf;
#pragma unroll
      for (int j = 0; j < TM; ++j) {
        const int lc = tx + 16 * j;
        bool ok = lc < cvalid && lc != x0 && lc != x1;
        if (LBL) ok &= !label_excluded(rl[i], sKL[lc], lc, xp);
        s[i][j] = ok ? s[i][j] * scale : kNegInf;
        mx = fmax(mx, s[i][j]);
      }
#pragma unroll
      for (int o = 1; o < 16; o <<= 1) mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const T mnew = fmax(m[i], mx);
      if (mnew != kNegInf) {  // all-excluded so far: skip (no exp(-inf - -inf))
        T acc = T(0);
#pragma unroll
        for (int j = 0; j < TM; ++j) acc += math_exp(s[i][j] - mnew);
        l[i] = l[i] * math_exp(m[i] - mnew) + acc;
        m[i] = mnew;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    T sum = l[i];
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (tx == 0 && row[i] < M) lse[row[i]] = m[i] + math_log(sum);
  }
}

// Backward SIMT, same roles as the mma kernel; W (exact, in T) goes through shared memory.
// __launch_bounds__(256, 2) caps registers at 128: without it ptxas spilled 4 B in <double, kRow>.
// grid = (row blocks, ceil(d / (16 TM))) output feature chunks of 16 TM.
// Arguments (xq, y_key_labels, yq, x_key_labels, x_offset) and labels (LBL): as in
// lse_bwd_mma_kernel.
template <typename T, int TM, int MODE, bool LBL>
__global__ void __launch_bounds__(kSimtThreads, 2)
    lse_bwd_simt_kernel(const T* __restrict__ X, const T* __restrict__ Y,
                        const T* __restrict__ scale_ptr, const QuerySide<T> xq,
                        const int64_t* __restrict__ y_key_labels, const QuerySide<T> yq,
                        const int64_t* __restrict__ x_key_labels, int64_t x_offset, int64_t nX,
                        int64_t nY, int64_t d, T* __restrict__ dX,
                        T* __restrict__ dscale_partial) {
  constexpr int B = 16 * TM;
  constexpr int DVS = 16 * TM;
  __shared__ T sX[kKC][B + 1];
  __shared__ T sY[kKC][B + 1];
  __shared__ T sW[B][B + 1];
  __shared__ T sV[B][DVS];
  __shared__ T sCr[B], sCg[B];
  __shared__ int sCx0[B], sCx1[B];
  __shared__ T sRed[kSimtThreads / 32];
  // Label rule (LBL only; one-element dummies otherwise):
  constexpr bool kRowLbl = LBL && MODE != kCol;  // row term: X row = query, Y column = key
  constexpr bool kColLbl = LBL && MODE != kRow;  // column term: Y column = query, X row = key
  __shared__ int64_t sKL[kRowLbl ? B : 1];       // y_key_labels of the Y columns
  __shared__ int64_t sQL[kColLbl ? B : 1];       // yq.labels of the Y columns
  __shared__ int sQp[kColLbl ? B : 1];           // yq.positive of the Y columns, local to the X block
  // The X rows' own label state also lives in shared memory (written once, before the first
  // __syncthreads of the column loop): kept in registers (3 x TM int64 per thread) it pushed the
  // fp32 kRow / kSym instantiations past the 128-register cap of __launch_bounds__(256, 2) and
  // ptxas spilled (8 B in kRow, up to 184 B in kSym). Reads are half-warp broadcasts.
  __shared__ int64_t sXrl[kRowLbl ? B : 1];  // xq.labels of the X rows (queries)
  __shared__ int64_t sXrp[kRowLbl ? B : 1];  // xq.positive of the X rows
  __shared__ int64_t sXkl[kColLbl ? B : 1];  // x_key_labels of the X rows (keys)

  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t row_base = int64_t(blockIdx.x) * B;
  const int64_t dv0 = int64_t(blockIdx.y) * DVS;
  const T scale = scale_ptr[0];

  int64_t row[TM], ex[TM][2];
  bool rv[TM];
  T rr[TM], rg[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    row[i] = row_base + ty * TM + i;
    rv[i] = row[i] < nX;
    ex[i][0] = ex[i][1] = -1;
    rr[i] = T(0);
    rg[i] = T(0);
    if (MODE != kCol && rv[i]) {
      rr[i] = xq.lse[row[i]];
      rg[i] = xq.grad[row[i]];
      if (xq.E > 0) ex[i][0] = xq.exclude[row[i] * xq.E];
      if (xq.E > 1) ex[i][1] = xq.exclude[row[i] * xq.E + 1];
    }
  }
  if (LBL && threadIdx.x < B) {  // rows >= nX are masked by rv: any value will do
    const int64_t a = row_base + threadIdx.x;
    const bool av = a < nX;
    if (kRowLbl) {
      sXrl[threadIdx.x] = av ? xq.labels[a] : 0;
      sXrp[threadIdx.x] = av ? xq.positive[a] : -1;
    }
    if (kColLbl) sXkl[threadIdx.x] = av ? x_key_labels[a] : 0;
  }
  T acc[TM][TM];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TM; ++j) acc[i][j] = T(0);
  T dsc = T(0);

  for (int64_t col_base = 0; col_base < nY; col_base += B) {
    __syncthreads();  // previous block's sW / sV / column info fully consumed
    for (int i = threadIdx.x; i < B * DVS; i += kSimtThreads) {
      const int b = i / DVS, c = i % DVS;
      const int64_t gb = col_base + b, gc = dv0 + c;
      sV[b][c] = (gb < nY && gc < d) ? Y[gb * d + gc] : T(0);
    }
    if (MODE != kRow && threadIdx.x < B) {
      const int64_t j = col_base + threadIdx.x;
      T r = T(0), gg = T(0);
      int x0 = -1, x1 = -1;
      if (j < nY) {
        r = yq.lse[j];
        gg = yq.grad[j];
        // The column side numbers the X rows from x_offset. Subtracting it from the entry (a
        // kernel parameter operand) rather than adding it to row_base keeps no extra 64-bit
        // value live across the column loop: row_base + x_offset in a register pushed
        // lse_bwd_simt_kernel<float, 4, kSym, true> to an 8 B spill on sm_80. -1 stays outside.
        if (yq.E > 0) x0 = rel_index(yq.exclude[j * yq.E] - x_offset, row_base, B);
        if (yq.E > 1) x1 = rel_index(yq.exclude[j * yq.E + 1] - x_offset, row_base, B);
      }
      sCr[threadIdx.x] = r;
      sCg[threadIdx.x] = gg;
      sCx0[threadIdx.x] = x0;
      sCx1[threadIdx.x] = x1;
    }
    if (LBL && threadIdx.x < B) {  // columns >= nY are masked by cvalid: any value will do
      const int64_t j = col_base + threadIdx.x;
      const bool jv = j < nY;
      if (kRowLbl) sKL[threadIdx.x] = jv ? y_key_labels[j] : 0;
      if (kColLbl) {
        sQL[threadIdx.x] = jv ? yq.labels[j] : 0;
        sQp[threadIdx.x] = jv ? rel_index(yq.positive[j] - x_offset, row_base, B) : -1;
      }
    }

    T s[TM][TM];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TM; ++j) s[i][j] = T(0);
    for (int64_t k0 = 0; k0 < d; k0 += kKC) {
      if (k0 > 0) __syncthreads();
      simt_load_t<T, TM>(sX, X, row_base, nX, k0, d);
      simt_load_t<T, TM>(sY, Y, col_base, nY, k0, d);
      __syncthreads();
      simt_qk<T, TM>(s, sX, sY, tx, ty);
    }

    const int cvalid = static_cast<int>(nY - col_base < B ? nY - col_base : B);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int lr = ty * TM + i;
      const int x0 = rel_index(ex[i][0], col_base, B), x1 = rel_index(ex[i][1], col_base, B);
      const int xp = kRowLbl ? rel_index(sXrp[lr], col_base, B) : -1;
      const int64_t xrl = kRowLbl ? sXrl[lr] : 0, xkl = kColLbl ? sXkl[lr] : 0;
#pragma unroll
      for (int j = 0; j < TM; ++j) {
        const int lc = tx + 16 * j;
        const T sv = s[i][j];
        const bool cok = rv[i] && lc < cvalid;
        T w = T(0);
        if (MODE != kCol) {  // W_ab: row a = X row (query), key b = Y column
          bool ok = cok && lc != x0 && lc != x1;
          if (kRowLbl) ok &= !label_excluded(xrl, sKL[lc], lc, xp);
          const T wr = ok ? rg[i] * math_exp(sv * scale - rr[i]) : T(0);
          dsc += wr * sv;
          w = wr;
        }
        if (MODE != kRow) {  // W_ba (V_ba when paired): row b = Y column (query), key a = X row
          bool ok = cok && lr != sCx0[lc] && lr != sCx1[lc];
          if (kColLbl) ok &= !label_excluded(sQL[lc], xkl, lr, sQp[lc]);
          w += ok ? sCg[lc] * math_exp(sv * scale - sCr[lc]) : T(0);
        }
        sW[lr][lc] = w;
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int b = 0; b < B; ++b) {
      T wv[TM], v[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) wv[i] = sW[ty * TM + i][b];
#pragma unroll
      for (int j = 0; j < TM; ++j) v[j] = sV[b][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TM; ++j) acc[i][j] = fma(wv[i], v[j], acc[i][j]);
    }
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    if (!rv[i]) continue;
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int64_t col = dv0 + tx + 16 * j;
      if (col < d) dX[row[i] * d + col] = acc[i][j] * scale;
    }
  }

  if (MODE != kCol && blockIdx.y == 0) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dsc += __shfl_xor_sync(0xffffffffu, dsc, o);
    if (lane == 0) sRed[warp] = dsc;
    __syncthreads();
    if (threadIdx.x == 0) {
      T t = T(0);
#pragma unroll
      for (int w = 0; w < kSimtThreads / 32; ++w) t += sRed[w];
      dscale_partial[blockIdx.x] = t;
    }
  }
}

// ================================================================================================
// small helpers: max |g| and the deterministic dscale reduction
// ================================================================================================
constexpr int kRedThreads = 256;

// out = max(max_i |g_i|, max_j |h_j|) (h: the key side's gradient when paired; nh = 0 otherwise).
__global__ void __launch_bounds__(kRedThreads)
    absmax_kernel(const float* __restrict__ g, int64_t n, const float* __restrict__ h, int64_t nh,
                  float* __restrict__ out) {
  __shared__ float sm[kRedThreads];
  float v = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kRedThreads) v = fmaxf(v, fabsf(g[i]));
  for (int64_t i = threadIdx.x; i < nh; i += kRedThreads) v = fmaxf(v, fabsf(h[i]));
  sm[threadIdx.x] = v;
  __syncthreads();
  for (int o = kRedThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) sm[threadIdx.x] = fmaxf(sm[threadIdx.x], sm[threadIdx.x + o]);
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = sm[0];
}

// Fixed order: thread t sums partials t, t+256, ... in double, then a fixed tree.
template <typename T>
__global__ void __launch_bounds__(kRedThreads)
    sum_partials_kernel(const T* __restrict__ partial, int64_t n, T* __restrict__ out) {
  __shared__ double sm[kRedThreads];
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kRedThreads) v += static_cast<double>(partial[i]);
  sm[threadIdx.x] = v;
  __syncthreads();
  for (int o = kRedThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) sm[threadIdx.x] += sm[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<T>(sm[0]);
}

// ================================================================================================
// launchers
// ================================================================================================
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr size_t kWsHeader = 256;  // [0, 4): gmax (fp16/bf16 path); partials start at 256

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The label rule's three pointers: all nullptr (off) or all set.
struct Labels {
  const int64_t* row;  // (M,) row_labels
  const int64_t* key;  // (N,) key_labels
  const int64_t* pos;  // (M,) positive
  bool on() const { return row != nullptr; }
};

template <typename Tag, bool LBL>
cudaError_t fwd_mma(const void* q, const void* k, const void* scale, const int64_t* exclude,
                    Labels lab, int64_t M, int64_t N, int64_t d, int E, void* lse,
                    cudaStream_t stream) {
  const bool vec = d % 8 == 0 && aligned16(q) && aligned16(k);
  // 34,816 B dynamic (+ 512 B static sKL with labels): below the 48 KB default
  const size_t smem = 2 * kTileElems * sizeof(uint16_t);
  lse_fwd_mma_kernel<Tag, LBL><<<dim3(static_cast<unsigned>(cdiv(M, kBM))), kMmaThreads, smem,
                                 stream>>>(
      static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k),
      static_cast<const float*>(scale), exclude, lab.row, lab.key, lab.pos, M, N, d, E, vec,
      static_cast<float*>(lse));
  return cudaGetLastError();
}

template <typename Tag, int MODE, bool LBL>
cudaError_t bwd_mma_launch(const void* X, const void* Y, const float* scale,
                           QuerySide<float> xq, const int64_t* y_key_labels, QuerySide<float> yq,
                           const int64_t* x_key_labels, int64_t x_offset, int64_t nX, int64_t nY,
                           int64_t d, const float* gmax, void* dX, float* partial,
                           cudaStream_t stream) {
  const bool vec = d % 8 == 0 && aligned16(X) && aligned16(Y);
  const bool need_v = d > kDK;
  const size_t smem = (need_v ? 3 : 2) * kTileElems * sizeof(uint16_t);  // 34,816 or 52,224 B
  auto kern = lse_bwd_mma_kernel<Tag, MODE, LBL>;
  if (smem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(cdiv(nX, kBM)), static_cast<unsigned>(cdiv(d, kDV)));
  kern<<<grid, kMmaThreads, smem, stream>>>(
      static_cast<const uint16_t*>(X), static_cast<const uint16_t*>(Y), scale, xq, y_key_labels,
      yq, x_key_labels, x_offset, nX, nY, d, vec, gmax, static_cast<typename Tag::T*>(dX),
      partial);
  return cudaGetLastError();
}

// The two sides of a backward as the kernels see them. rows: the rows of q as queries (grad,
// lse, exclude, row_labels, positive; keys numbered like k); keys: the rows of k as queries
// (paired: key_grad, key_lse, key_exclude, key_labels, key_positive; their keys are the rows of
// q numbered from row_offset). Symmetric: keys = rows, row_offset = 0. The label pointers are
// all nullptr when the rule is off.
template <typename A>
struct Sides {
  QuerySide<A> rows;
  const int64_t* key_labels;  // (N,) labels of the rows of k as keys of the rows of q
  QuerySide<A> keys;
  const int64_t* row_labels;  // (M,) labels of the rows of q as keys of the rows of k
  int64_t row_offset;
};

// Two-sided (kSym) dq = s (W + V^T) k and the row side's dscale: the symmetric backward (k is q,
// keys = rows) and lse_bwd_paired. gmax covers both sides' gradients (W' = (W + V^T) / gmax).
template <typename Tag, bool LBL>
cudaError_t two_sided_mma(const void* q, const void* k, const float* scale, const Sides<float>& sd,
                          int64_t M, int64_t N, int64_t d, void* dq, float* dscale,
                          void* workspace, cudaStream_t stream) {
  float* gmax = static_cast<float*>(workspace);
  float* partial = reinterpret_cast<float*>(static_cast<char*>(workspace) + kWsHeader);
  const bool same_grad = sd.keys.grad == sd.rows.grad && N <= M;  // symmetric: read g once
  absmax_kernel<<<1, kRedThreads, 0, stream>>>(sd.rows.grad, M, sd.keys.grad, same_grad ? 0 : N,
                                               gmax);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = bwd_mma_launch<Tag, kSym, LBL>(q, k, scale, sd.rows, sd.key_labels, sd.keys,
                                       sd.row_labels, sd.row_offset, M, N, d, gmax, dq, partial,
                                       stream);
  if (err != cudaSuccess) return err;
  sum_partials_kernel<float><<<1, kRedThreads, 0, stream>>>(partial, cdiv(M, kBM), dscale);
  return cudaGetLastError();
}

// The kernels take each pointer in its role (xq / yq = the X / Y rows as queries); kCol swaps
// X and Y: its Y rows are the queries q, its X rows the keys k.
template <typename Tag, bool LBL>
cudaError_t bwd_mma(const void* grad_, const void* q, const void* k, const void* scale_,
                    const int64_t* exclude, Labels lab, int64_t M, int64_t N, int64_t d, int E,
                    bool symmetric, const void* lse_, void* dq, void* dk, void* dscale,
                    void* workspace, cudaStream_t stream) {
  const float* scale = static_cast<const float*>(scale_);
  const QuerySide<float> rows{static_cast<const float*>(grad_), static_cast<const float*>(lse_),
                              exclude, lab.row, lab.pos, E};
  if (symmetric) {
    const Sides<float> sd{rows, lab.key, rows, lab.key, 0};
    return two_sided_mma<Tag, LBL>(q, q, scale, sd, M, M, d, dq, static_cast<float*>(dscale),
                                   workspace, stream);
  }
  float* gmax = static_cast<float*>(workspace);
  float* partial = reinterpret_cast<float*>(static_cast<char*>(workspace) + kWsHeader);
  const QuerySide<float> none{};
  cudaError_t err = bwd_mma_launch<Tag, kRow, LBL>(q, k, scale, rows, lab.key, none, nullptr, 0,
                                                   M, N, d, gmax, dq, partial, stream);
  if (err != cudaSuccess) return err;
  absmax_kernel<<<1, kRedThreads, 0, stream>>>(rows.grad, M, nullptr, 0, gmax);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  err = bwd_mma_launch<Tag, kCol, LBL>(k, q, scale, none, nullptr, rows, lab.key, 0, N, M, d,
                                       gmax, dk, nullptr, stream);
  if (err != cudaSuccess) return err;
  sum_partials_kernel<float><<<1, kRedThreads, 0, stream>>>(partial, cdiv(M, kBM),
                                                            static_cast<float*>(dscale));
  return cudaGetLastError();
}

template <typename T, int TM, bool LBL>
cudaError_t fwd_simt(const void* q, const void* k, const void* scale, const int64_t* exclude,
                     Labels lab, int64_t M, int64_t N, int64_t d, int E, void* lse,
                     cudaStream_t stream) {
  lse_fwd_simt_kernel<T, TM, LBL><<<dim3(static_cast<unsigned>(cdiv(M, 16 * TM))), kSimtThreads,
                                    0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(scale), exclude,
      lab.row, lab.key, lab.pos, M, N, d, E, static_cast<T*>(lse));
  return cudaGetLastError();
}

template <typename T, int TM, int MODE, bool LBL>
cudaError_t bwd_simt_launch(const T* X, const T* Y, const T* scale, QuerySide<T> xq,
                            const int64_t* y_key_labels, QuerySide<T> yq,
                            const int64_t* x_key_labels, int64_t x_offset, int64_t nX, int64_t nY,
                            int64_t d, T* dX, T* partial, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(cdiv(nX, 16 * TM)), static_cast<unsigned>(cdiv(d, 16 * TM)));
  lse_bwd_simt_kernel<T, TM, MODE, LBL><<<grid, kSimtThreads, 0, stream>>>(
      X, Y, scale, xq, y_key_labels, yq, x_key_labels, x_offset, nX, nY, d, dX, partial);
  return cudaGetLastError();
}

// As two_sided_mma, exact in T (no normalisation by max |g|).
template <typename T, int TM, bool LBL>
cudaError_t two_sided_simt(const void* q, const void* k, const T* scale, const Sides<T>& sd,
                           int64_t M, int64_t N, int64_t d, void* dq, T* dscale, void* workspace,
                           cudaStream_t stream) {
  T* partial = reinterpret_cast<T*>(static_cast<char*>(workspace) + kWsHeader);
  cudaError_t err = bwd_simt_launch<T, TM, kSym, LBL>(
      static_cast<const T*>(q), static_cast<const T*>(k), scale, sd.rows, sd.key_labels, sd.keys,
      sd.row_labels, sd.row_offset, M, N, d, static_cast<T*>(dq), partial, stream);
  if (err != cudaSuccess) return err;
  sum_partials_kernel<T><<<1, kRedThreads, 0, stream>>>(partial, cdiv(M, 16 * TM), dscale);
  return cudaGetLastError();
}

template <typename T, int TM, bool LBL>
cudaError_t bwd_simt(const void* grad_, const void* q_, const void* k_, const void* scale_,
                     const int64_t* exclude, Labels lab, int64_t M, int64_t N, int64_t d, int E,
                     bool symmetric, const void* lse_, void* dq, void* dk, void* dscale,
                     void* workspace, cudaStream_t stream) {
  const T* q = static_cast<const T*>(q_);
  const T* k = static_cast<const T*>(k_);
  const T* scale = static_cast<const T*>(scale_);
  const QuerySide<T> rows{static_cast<const T*>(grad_), static_cast<const T*>(lse_), exclude,
                          lab.row, lab.pos, E};
  if (symmetric) {
    const Sides<T> sd{rows, lab.key, rows, lab.key, 0};
    return two_sided_simt<T, TM, LBL>(q, q, scale, sd, M, M, d, dq, static_cast<T*>(dscale),
                                      workspace, stream);
  }
  T* partial = reinterpret_cast<T*>(static_cast<char*>(workspace) + kWsHeader);
  const QuerySide<T> none{};
  cudaError_t err = bwd_simt_launch<T, TM, kRow, LBL>(q, k, scale, rows, lab.key, none, nullptr,
                                                      0, M, N, d, static_cast<T*>(dq), partial,
                                                      stream);
  if (err != cudaSuccess) return err;
  err = bwd_simt_launch<T, TM, kCol, LBL>(k, q, scale, none, nullptr, rows, lab.key, 0, N, M, d,
                                          static_cast<T*>(dk), nullptr, stream);
  if (err != cudaSuccess) return err;
  sum_partials_kernel<T><<<1, kRedThreads, 0, stream>>>(partial, cdiv(M, 16 * TM),
                                                        static_cast<T*>(dscale));
  return cudaGetLastError();
}

constexpr int kTmF32 = 4;  // 64 x 64 tiles, 42 KB static smem in the backward
constexpr int kTmF64 = 2;  // 32 x 32 tiles (fp64 halves the smem budget), 26 KB

// Forward / backward dispatch over (dtype, label rule on/off).
template <bool LBL>
cudaError_t forward_dispatch(DType dtype, const void* q, const void* k, const void* scale,
                             const int64_t* exclude, Labels lab, int64_t M, int64_t N, int64_t d,
                             int e, void* lse, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return fwd_mma<F16Tag, LBL>(q, k, scale, exclude, lab, M, N, d, e, lse, stream);
    case DType::kBFloat16:
      return fwd_mma<BF16Tag, LBL>(q, k, scale, exclude, lab, M, N, d, e, lse, stream);
    case DType::kFloat32:
      return fwd_simt<float, kTmF32, LBL>(q, k, scale, exclude, lab, M, N, d, e, lse, stream);
    case DType::kFloat64:
      return fwd_simt<double, kTmF64, LBL>(q, k, scale, exclude, lab, M, N, d, e, lse, stream);
  }
  return cudaErrorInvalidValue;
}

template <bool LBL>
cudaError_t backward_dispatch(DType dtype, const void* grad, const void* q, const void* k,
                              const void* scale, const int64_t* exclude, Labels lab, int64_t M,
                              int64_t N, int64_t d, int e, bool symmetric, const void* lse,
                              void* dq, void* dk, void* dscale, void* workspace,
                              cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return bwd_mma<F16Tag, LBL>(grad, q, k, scale, exclude, lab, M, N, d, e, symmetric, lse, dq,
                                  dk, dscale, workspace, stream);
    case DType::kBFloat16:
      return bwd_mma<BF16Tag, LBL>(grad, q, k, scale, exclude, lab, M, N, d, e, symmetric, lse, dq,
                                   dk, dscale, workspace, stream);
    case DType::kFloat32:
      return bwd_simt<float, kTmF32, LBL>(grad, q, k, scale, exclude, lab, M, N, d, e, symmetric,
                                          lse, dq, dk, dscale, workspace, stream);
    case DType::kFloat64:
      return bwd_simt<double, kTmF64, LBL>(grad, q, k, scale, exclude, lab, M, N, d, e, symmetric,
                                           lse, dq, dk, dscale, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

// lse_bwd_paired: the key side's pointers (grad / lse typed like the row side's).
struct KeySidePtrs {
  const void* grad;
  const void* lse;
  const int64_t* exclude;
  const int64_t* positive;
  int E;
  int64_t row_offset;
};

template <typename A>
Sides<A> paired_sides(const void* grad, const void* lse, const int64_t* exclude, int E,
                      const Labels& lab, const KeySidePtrs& ks) {
  return {{static_cast<const A*>(grad), static_cast<const A*>(lse), exclude, lab.row, lab.pos, E},
          lab.key,
          {static_cast<const A*>(ks.grad), static_cast<const A*>(ks.lse), ks.exclude, lab.key,
           ks.positive, ks.E},
          lab.row,
          ks.row_offset};
}

template <bool LBL>
cudaError_t paired_dispatch(DType dtype, const void* grad, const void* q, const void* k,
                            const void* scale, const int64_t* exclude, Labels lab, int64_t M,
                            int64_t N, int64_t d, int e, const void* lse, const KeySidePtrs& ks,
                            void* dq, void* dscale, void* workspace, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return two_sided_mma<F16Tag, LBL>(q, k, static_cast<const float*>(scale),
                                        paired_sides<float>(grad, lse, exclude, e, lab, ks), M, N,
                                        d, dq, static_cast<float*>(dscale), workspace, stream);
    case DType::kBFloat16:
      return two_sided_mma<BF16Tag, LBL>(q, k, static_cast<const float*>(scale),
                                         paired_sides<float>(grad, lse, exclude, e, lab, ks), M, N,
                                         d, dq, static_cast<float*>(dscale), workspace, stream);
    case DType::kFloat32:
      return two_sided_simt<float, kTmF32, LBL>(
          q, k, static_cast<const float*>(scale),
          paired_sides<float>(grad, lse, exclude, e, lab, ks), M, N, d, dq,
          static_cast<float*>(dscale), workspace, stream);
    case DType::kFloat64:
      return two_sided_simt<double, kTmF64, LBL>(
          q, k, static_cast<const double*>(scale),
          paired_sides<double>(grad, lse, exclude, e, lab, ks), M, N, d, dq,
          static_cast<double*>(dscale), workspace, stream);
  }
  return cudaErrorInvalidValue;
}

// All three label pointers set (rule on) or all nullptr (off); anything else is a caller error.
bool labels_consistent(const Labels& lab) {
  const int set = (lab.row != nullptr) + (lab.key != nullptr) + (lab.pos != nullptr);
  return set == 0 || set == 3;
}

}  // namespace

cudaError_t lse_forward(DType dtype, const void* q, const void* k, const void* scale,
                        const int64_t* exclude, const int64_t* row_labels,
                        const int64_t* key_labels, const int64_t* positive, int64_t M, int64_t N,
                        int64_t d, int64_t E, void* lse, cudaStream_t stream) {
  if (M < 1 || N < 1 || d < 1 || d > kMaxFeatureDim || E < 0 || E > 2) return cudaErrorInvalidValue;
  const Labels lab{row_labels, key_labels, positive};
  if (!labels_consistent(lab)) return cudaErrorInvalidValue;
  const int e = static_cast<int>(E);
  return lab.on() ? forward_dispatch<true>(dtype, q, k, scale, exclude, lab, M, N, d, e, lse, stream)
                  : forward_dispatch<false>(dtype, q, k, scale, exclude, lab, M, N, d, e, lse, stream);
}

size_t lse_backward_workspace_bytes(DType dtype, int64_t M, int64_t /*N*/, int64_t /*d*/,
                                    bool /*symmetric*/) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16: return kWsHeader + size_t(cdiv(M, kBM)) * sizeof(float);
    case DType::kFloat32: return kWsHeader + size_t(cdiv(M, 16 * kTmF32)) * sizeof(float);
    case DType::kFloat64: return kWsHeader + size_t(cdiv(M, 16 * kTmF64)) * sizeof(double);
  }
  return kWsHeader;
}

cudaError_t lse_backward(DType dtype, const void* grad, const void* q, const void* k,
                         const void* scale, const int64_t* exclude, const int64_t* row_labels,
                         const int64_t* key_labels, const int64_t* positive, int64_t M, int64_t N,
                         int64_t d, int64_t E, bool symmetric, const void* lse, void* dq, void* dk,
                         void* dscale, void* workspace, cudaStream_t stream) {
  if (M < 1 || N < 1 || d < 1 || d > kMaxFeatureDim || E < 0 || E > 2) return cudaErrorInvalidValue;
  if (symmetric && M != N) return cudaErrorInvalidValue;
  const Labels lab{row_labels, key_labels, positive};
  if (!labels_consistent(lab)) return cudaErrorInvalidValue;
  const int e = static_cast<int>(E);
  return lab.on() ? backward_dispatch<true>(dtype, grad, q, k, scale, exclude, lab, M, N, d, e,
                                            symmetric, lse, dq, dk, dscale, workspace, stream)
                  : backward_dispatch<false>(dtype, grad, q, k, scale, exclude, lab, M, N, d, e,
                                             symmetric, lse, dq, dk, dscale, workspace, stream);
}

cudaError_t lse_backward_paired(DType dtype, const void* grad, const void* q, const void* k,
                                const void* scale, const int64_t* exclude,
                                const int64_t* row_labels, const int64_t* key_labels,
                                const int64_t* positive, int64_t M, int64_t N, int64_t d,
                                int64_t E, const void* lse, const void* key_grad,
                                const void* key_lse, const int64_t* key_exclude,
                                const int64_t* key_positive, int64_t key_E, int64_t row_offset,
                                void* dq, void* dscale, void* workspace, cudaStream_t stream) {
  if (M < 1 || N < 1 || d < 1 || d > kMaxFeatureDim || E < 0 || E > 2 || key_E < 0 ||
      key_E > 2 || row_offset < 0)
    return cudaErrorInvalidValue;
  const Labels lab{row_labels, key_labels, positive};
  if (!labels_consistent(lab) || lab.on() != (key_positive != nullptr)) return cudaErrorInvalidValue;
  const KeySidePtrs ks{key_grad, key_lse, key_exclude, key_positive, static_cast<int>(key_E),
                       row_offset};
  const int e = static_cast<int>(E);
  return lab.on() ? paired_dispatch<true>(dtype, grad, q, k, scale, exclude, lab, M, N, d, e, lse,
                                          ks, dq, dscale, workspace, stream)
                  : paired_dispatch<false>(dtype, grad, q, k, scale, exclude, lab, M, N, d, e, lse,
                                           ks, dq, dscale, workspace, stream);
}

}  // namespace infonce_cuda
