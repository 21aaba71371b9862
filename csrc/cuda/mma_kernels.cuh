// The fp16 / bf16 kernels: tensor cores through mma.sync.m16n8k16 (sm_80+), fp32 accumulators,
// ldmatrix from padded shared memory. CTA = 4 warps = 64 rows (16 per warp), key tiles of 64,
// the QK product loops over d in chunks of 128, the backward output loops over d in chunks of
// 128 on grid.y (each output chunk recomputes S and P: any d works, and d <= 128 costs no
// recomputation). Maths and the exclusion rule: lse_kernels.cu's header and
// csrc/common/exclusion.h; launched from launch_mma.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_args.cuh"
#include "online_lse.cuh"
#include "tile_sizes.cuh"

namespace infonce_cuda {
namespace {

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
                       const float* __restrict__ scale_ptr, const infonce_kernels::ExclusionRule rule,
                       int64_t M, int64_t N, int64_t d, bool vec, float* __restrict__ lse,
                       int32_t* __restrict__ dropped) {
  const int64_t* __restrict__ exclude = rule.lists;
  const int64_t* __restrict__ row_labels = rule.row_labels;
  const int64_t* __restrict__ key_labels = rule.key_labels;
  const int64_t* __restrict__ positive = rule.positive;
  const int E = static_cast<int>(rule.E);
  extern __shared__ __align__(16) uint16_t smem16[];
  uint16_t* sX = smem16;
  uint16_t* sY = smem16 + kTileElems;
  __shared__ int64_t sKL[LBL ? kBN : 1];  // key labels of the current key tile (LBL only)

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int64_t row_base = int64_t(blockIdx.x) * kBM;
  const float scale = __ldg(scale_ptr);
  const float scale2 = scale * kLog2e;
  // Threshold rule (false-negative filtering; nullptr: off): compared on the logit in nats.
  const float* __restrict__ threshold = static_cast<const float*>(rule.threshold);
  const bool thr = threshold != nullptr;

  int64_t row[2], ex[2][2];
  int64_t rl[2] = {0, 0}, rp[2] = {-1, -1};  // row label (LBL only), positive (LBL or threshold)
  float rt[2] = {INFINITY, INFINITY};        // row threshold
  int cnt[2] = {0, 0};                       // keys the threshold rule dropped (this lane's columns)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = row_base + warp * 16 + gq + 8 * h;
    ex[h][0] = ex[h][1] = -1;
    if (row[h] < M) {
      if (E > 0) ex[h][0] = exclude[row[h] * E];
      if (E > 1) ex[h][1] = exclude[row[h] * E + 1];
      if (LBL) rl[h] = row_labels[row[h]];
      if (LBL || thr) rp[h] = positive[row[h]];
      if (thr) rt[h] = threshold[row[h]];
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
      const int xp0 = tile_index(rp[0], col_base, kBN), xp1 = tile_index(rp[1], col_base, kBN);
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
      const int x0 = tile_index(ex[h][0], col_base, kBN), x1 = tile_index(ex[h][1], col_base, kBN);
      const int xtp = thr ? tile_index(rp[h], col_base, kBN) : -1;
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int lc = nt * 8 + 2 * tq + e;
          bool ok = lc < cvalid && lc != x0 && lc != x1;
          if (LBL) ok &= ((lmask[h] >> (2 * nt + e)) & 1u) == 0u;
          if (thr && ok && threshold_dropped(s[nt][2 * h + e] * scale, rt[h], lc, xtp)) {
            ok = false;
            ++cnt[h];
          }
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
        const float shift = lse_shift(mnew);  // 0 where the logits overflowed to +inf
        float acc = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) acc += exp2f(s[nt][2 * h + e] - shift);  // exp2(-inf) = 0
        l[h] = l[h] * exp2f(m[h] - shift) + acc;  // m[h] = -inf -> factor 0, l[h] was 0
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
    if (thr) {
      int c = cnt[h];
      c += __shfl_xor_sync(0xffffffffu, c, 1);
      c += __shfl_xor_sync(0xffffffffu, c, 2);
      if (tq == 0 && row[h] < M) dropped[row[h]] = c;
    }
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
// Threshold rule (THR, instantiated only for launches with it; each side's own when its pointer
// is set): the row term reads the X rows' thresholds and positives, the column term the Y
// columns' (shared, positives local to this CTA's row block); compared on the logit in nats.
// With labels, the label rule's local positives are reused (one positive per row, for both rules).
// <Tag, kSym, true, true> (labels and thresholds in one symmetric / paired backward) spills 16 B
// on sm_80 (ptxas 13.0; none on sm_90): the threshold tests of both terms on top of both label
// rules at the 255-register cap. Launches without the threshold rule run the THR = false
// instantiations, whose code is the same as before the rule existed.
template <typename Tag, int MODE, bool LBL, bool THR>
__global__ void __launch_bounds__(kMmaThreads, 2)
    lse_bwd_mma_kernel(const uint16_t* __restrict__ X, const uint16_t* __restrict__ Y,
                       const float* __restrict__ scale_ptr, const Sides<float> sides, int64_t nX,
                       int64_t nY, int64_t d, bool vec, const float* __restrict__ gmax_ptr,
                       typename Tag::T* __restrict__ dX, float* __restrict__ dscale_partial) {
  const QuerySide<float> xq = sides.rows, yq = sides.keys;
  const int64_t* __restrict__ y_key_labels = sides.key_labels;
  const int64_t* __restrict__ x_key_labels = sides.row_labels;
  const int64_t x_offset = sides.row_offset;
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
  // Threshold rule (THR): see above.
  const bool rthr = THR && MODE != kCol && xq.threshold != nullptr;
  const bool cthr = THR && MODE != kRow && yq.threshold != nullptr;
  __shared__ float sXt[THR ? kBM : 1];
  __shared__ int64_t sXtp[THR ? kBM : 1];
  __shared__ float sCt[THR ? kBN : 1];
  __shared__ int sCtp[THR ? kBN : 1];

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
  if (rthr && threadIdx.x < kBM) {  // read after the column loop's first __syncthreads
    const int64_t a = row_base + threadIdx.x;
    sXt[threadIdx.x] = a < nX ? xq.threshold[a] : INFINITY;
    sXtp[threadIdx.x] = a < nX ? xq.positive[a] : -1;
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
        if (yq.E > 0) x0 = tile_index(yq.exclude[j * yq.E] - x_offset, row_base, kBM);
        if (yq.E > 1) x1 = tile_index(yq.exclude[j * yq.E + 1] - x_offset, row_base, kBM);
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
        sQp[threadIdx.x] = jv ? tile_index(yq.positive[j] - x_offset, row_base, kBM) : -1;
      }
    }
    if (cthr && threadIdx.x < kBN) {
      const int64_t j = col_base + threadIdx.x;
      sCt[threadIdx.x] = j < nY ? yq.threshold[j] : INFINITY;
      sCtp[threadIdx.x] = j < nY ? tile_index(yq.positive[j] - x_offset, row_base, kBM) : -1;
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
      const int x0 = tile_index(ex[h][0], col_base, kBN), x1 = tile_index(ex[h][1], col_base, kBN);
      const int xp = kRowLbl ? tile_index(xrp[h], col_base, kBN) : -1;
      const float xt = rthr ? sXt[lr] : 0.f;
      // with labels the label rule's local positive is the threshold rule's (one per row)
      const int xtp = !rthr ? -1 : kRowLbl ? xp : tile_index(sXtp[lr], col_base, kBN);
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
            if (rthr) ok &= !threshold_dropped(sv * scale, xt, lc, xtp);
            const float p = ok ? exp2f(sv * scale2 - rr2[h]) : 0.f;
            dsc += rg[h] * p * sv;
            w = (MODE == kRow) ? p : rg[h] * p;
          }
          if (MODE != kRow) {  // W_ba (V_ba when paired): row b = Y column (query), key a = X row
            bool ok = cok && lr != sCx0[lc] && lr != sCx1[lc];
            if (kColLbl) ok &= !label_excluded(sQL[lc], xkl[h], lr, sQp[lc]);
            if (cthr) ok &= !threshold_dropped(sv * scale, sCt[lc], lr, kColLbl ? sQp[lc] : sCtp[lc]);
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


}  // namespace
}  // namespace infonce_cuda
