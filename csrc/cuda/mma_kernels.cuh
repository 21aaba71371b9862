// The fp16 / bf16 kernels: tensor cores through mma.sync.m16n8k16 (sm_80+), fp32 accumulators,
// ldmatrix from padded shared memory, tiles brought in by cp.async two stages deep, exponentials
// by ex2.approx (one MUFU.EX2). CTA = 4 warps; forward 128 rows (32 per warp) x key tiles of 64;
// general backward 64 rows (16 per warp) x key tiles of 64, resident backward 128 rows (32 per
// warp) x key tiles of 32; the QK product loops over d in chunks of 128, the general backward's
// output loops over d in chunks of 128 on grid.y (each output chunk recomputes S and P: any d
// works, and d <= 128 costs no recomputation). Masked and interior tiles: once per key tile a
// warp vote decides whether an exclusion, the end of the keys or a rule touches the tile; only
// then does the warp run the per-element mask code (interior tiles: no per-element compares).
// Two kernels per direction: the general one (any d, alignment and rule) and, for the rule-free
// launch with d <= kDK and 16-B aligned rows, a resident one (the forward: the same body with the
// other cases compiled out; the backward: its own body, lse_bwd_resident_mma). The
// invariants: csrc/cuda/README.md. Maths and the exclusion rule: lse_kernels.cu's header and
// csrc/common/exclusion.h; launched from launch_mma.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// cp.async (sm_80+): 16-byte global -> shared copies that do not pass through registers, grouped
// by commit_group and awaited by wait_group (the "memory" clobbers keep the compiler from moving
// shared-memory accesses across them; the __syncthreads after the wait publishes the data).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes from src, or 16 zero bytes when !in (src-size 0: nothing is read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool in) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 16 : 0)
               : "memory");
}
// 8 bytes (one int64: .ca, sizes below 16 go through L1), or 8 zero bytes when !in.
__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src, bool in) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 8 : 0)
               : "memory");
}
// One int64 per thread < kBN: entry col + threadIdx.x of v (0 past n) into dst[threadIdx.x].
__device__ __forceinline__ void load_col64(int64_t* dst, const int64_t* __restrict__ v, int64_t col, int64_t n) {
  if (threadIdx.x < kBN) {
    const bool in = col + threadIdx.x < n;
    cp_async8(smem_addr(dst + threadIdx.x), in ? v + col + threadIdx.x : v, in);
  }
}
// 4 bytes (one float: .ca), or 4 zero bytes when !in.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool in) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 4 : 0)
               : "memory");
}
// One float per thread < kBN: entry col + threadIdx.x of v (0 past n) into dst[threadIdx.x].
__device__ __forceinline__ void load_col32(float* dst, const float* __restrict__ v, int64_t col, int64_t n) {
  if (threadIdx.x < kBN) {
    const bool in = col + threadIdx.x < n;
    cp_async4(smem_addr(dst + threadIdx.x), in ? v + col + threadIdx.x : v, in);
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Start copying rows [row0, row0 + ROWS) x cols [col0, col0 + kDK) of a (nrows x d) row-major
// 16-bit matrix into a ROWS x kLds smem tile; everything outside the matrix is zero (so padded
// rows/cols add 0 to dot products).
//   vec (d % 8 == 0 and a 16-B aligned base, so 8-element chunks are all-in or all-out and 16-B
//   aligned): cp.async, complete after the caller's commit_group + wait_group. Thread t copies
//   16-B chunk t % 16 of rows t / 16 + 8 i: one column test, then one pointer step per copy.
//   Otherwise: element loads and stores, complete on return.
template <int ROWS>
__device__ __forceinline__ void load_tile16(uint16_t* __restrict__ s, const uint16_t* __restrict__ g,
                                            int64_t row0, int64_t nrows, int64_t col0, int64_t d, bool vec) {
  if (vec) {
    constexpr int kCpr = kDK / 8;                 // 16-B chunks per row
    constexpr int kRowStep = kMmaThreads / kCpr;  // rows per pass of the CTA: 8
    static_assert(ROWS % kRowStep == 0, "whole passes");
    const int r = threadIdx.x / kCpr, c = (threadIdx.x % kCpr) * 8;
    const bool cin = col0 + c < d;
    const uint16_t* src = g + (row0 + r) * d + col0 + c;
    const int64_t step = kRowStep * d;
    int64_t left = nrows - row0 - r;  // matrix rows from this thread's first row on
    uint32_t dst = smem_addr(s + r * kLds + c);
#pragma unroll
    for (int i = 0; i < ROWS / kRowStep; ++i) {
      const bool in = cin && left > 0;
      cp_async16(dst, in ? src : g, in);
      src += step;
      left -= kRowStep;
      dst += kRowStep * kLds * sizeof(uint16_t);
    }
  } else {
    // The fallback (unaligned, or d % 8 != 0) is load-bound: kept rolled, it stays a short loop
    // beside the hot path instead of four unrolled copies of 64-bit index arithmetic.
#pragma unroll 1
    for (int i = threadIdx.x; i < ROWS * kDK; i += kMmaThreads) {
      const int r = i / kDK, c = i % kDK;
      const int64_t gr = row0 + r, gc = col0 + c;
      uint16_t v = 0;  // bit pattern of +0 in fp16 and bf16
      if (gr < nrows && gc < d) v = g[gr * d + gc];
      s[r * kLds + c] = v;
    }
  }
}

// s[mt][nt][.] += X_tile(warp's MT x 16 rows, k chunk) * Y_tile(8 NT cols, k chunk)^T: warp w owns
// rows [16 MT w, 16 MT (w + 1)) of the X tile, m16 tile mt its rows 16 MT w + 16 mt + [0, 16).
// Every B fragment (the Y tile through ldmatrix) is used for the MT m-tiles: MT = 2 halves the
// shared-memory reads per FLOP of MT = 1. NT (n8 tiles, even): 8 for 64-key tiles, 4 for kResBN.
// Accumulator layout (m16n8 C fragment), lane = 4*gq + tq:
//   s[mt][nt][0], s[mt][nt][1]: row gq,     cols nt*8 + 2tq, +1   (of m-tile mt)
//   s[mt][nt][2], s[mt][nt][3]: row gq + 8, cols nt*8 + 2tq, +1
// kvalid: number of valid features in this chunk (k-steps past it are all-zero and skipped).
template <typename Tag, int MT, int NT>
__device__ __forceinline__ void mma_qk(float (&s)[MT][NT][4], const uint16_t* sX, const uint16_t* sY,
                                       int warp, int lane, int kvalid) {
  // A (16x16, row major) from X: matrices (rows 0-7|8-15) x (cols 0-7|8-15) -> a0..a3.
  const uint16_t* pa =
      sX + (warp * 16 * MT + (lane & 7) + ((lane >> 3) & 1) * 8) * kLds + (lane >> 4) * 8;
  // B (16x8, "col") = Y^T: b0 = Y[key gq][k 2tq..], b1 = Y[key gq][k 8+2tq..]; x4 covers two
  // n-tiles: (keys 0-7, k 0-7), (keys 0-7, k 8-15), (keys 8-15, k 0-7), (keys 8-15, k 8-15).
  const uint16_t* pb = sY + ((lane & 7) + (lane >> 4) * 8) * kLds + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int ks = 0; ks < kDK / 16; ++ks) {
    if (ks * 16 < kvalid) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldsm_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3], pa + mt * 16 * kLds + ks * 16);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(b0, b1, b2, b3, pb + np * 16 * kLds + ks * 16);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Tag::mma(s[mt][2 * np], a[mt], b0, b1);
          Tag::mma(s[mt][2 * np + 1], a[mt], b2, b3);
        }
      }
    }
  }
}

// The stream of (key tile, feature chunk) stages of both kernels, kStages = 2 deep: stage t is
// key tile t / nchunks, chunk t % nchunks, in buffer t % 2. Each stage begins with
//   cp.async.wait_group 0 + __syncthreads   (this stage's copies landed and are visible; every
//                                            warp is done with the previous stage's buffer)
// then issues the next stage's copies into the other buffer and computes on this one, so the
// copy of stage t + 1 overlaps the product of stage t with one barrier per stage. Per-key-tile
// data written with plain stores (key labels, column info, the value tile) is double-buffered by
// key-tile parity and written after the last product of the previous tile, so the barrier of
// the next stage publishes it and no reader of the same parity (two tiles back) is still busy.

// Forward: one CTA per 128-row block of q (4 warps x 32 rows: two m16 tiles per warp), loop over
// all key blocks, online LSE in the log2 domain (x = S * s * log2(e)); r = ln(2) * (m + log2(l)).
// Thread (warp, lane = 4 gq + tq) owns rows 32 warp + 16 mt + gq + 8 h (r = 2 mt + h, mt, h in
// {0, 1}) and, of every key tile, columns nt * 8 + 2 tq + e (nt < 8, e < 2); a row's (m, l) is
// kept by the 4 lanes of its quad (m equal in the 4, l a partial sum, added at the end).
// Registers: 64 fp32 accumulators + 4 rows' state; see the ptxas report (no spills).
// Threshold rule (THR, false-negative filtering; launched only when rule.threshold is set, so the
// THR = false code is the rule-free kernel): each row's threshold and positive in registers, the
// logit s * S (nats) compared through exclusion.h's threshold_dropped inside the same
// branch-free mask, and the keys it drops counted per row into dropped[row] (quad-reduced).
// RES (the resident kernel, lse_fwd_resident_mma_kernel): the launch has d <= kDK and 16-B
// aligned rows, so the q tile is resident, every tile load takes the cp.async path and the
// feature-chunk loop runs once: the code of the other cases is compiled out.
template <typename Tag, bool LBL, bool THR, bool RES>
__device__ __forceinline__ void lse_fwd_mma(const uint16_t* __restrict__ X, const uint16_t* __restrict__ Y,
                                            const float* __restrict__ scale_ptr,
                                            const infonce_kernels::ExclusionRule& rule, int64_t M, int64_t N,
                                            int64_t d, bool vec, float* __restrict__ lse,
                                            int32_t* __restrict__ dropped) {
  constexpr int MT = kFwdMTiles, R = 2 * MT;  // m16 tiles and rows per thread
  const int64_t* __restrict__ exclude = rule.lists;
  const int64_t* __restrict__ row_labels = rule.row_labels;
  const int64_t* __restrict__ key_labels = rule.key_labels;
  const int64_t* __restrict__ positive = rule.positive;
  const int E = static_cast<int>(rule.E);
  vec = RES || vec;
  const int nchunks = RES ? 1 : static_cast<int>((d + kDK - 1) / kDK);
  const bool x_resident = RES || nchunks == 1;  // d <= kDK: the q tile is loaded once
  // Dynamic smem (fwd_mma_smem): X (1 or kStages row tiles), then kStages key tiles.
  extern __shared__ __align__(16) uint16_t smem16[];
  uint16_t* sX = smem16;
  uint16_t* sY = smem16 + (x_resident ? 1 : kStages) * kFwdXElems;
  __shared__ int64_t sKL[LBL ? kStages : 1][LBL ? kBN : 1];  // key labels by key-tile parity (LBL)

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int64_t row_base = int64_t(blockIdx.x) * kFwdBM;
  const float scale = __ldg(scale_ptr);
  const float scale2 = scale * kLog2e;
  const float* __restrict__ threshold = static_cast<const float*>(rule.threshold);

  int64_t row[R], ex[R][2];
  int64_t rl[R], rp[R];  // row label (LBL), positive (LBL or THR)
  float rt[R];           // row threshold in nats (THR; +inf past M)
  int cnt[R];            // keys the threshold rule dropped, this lane's columns (THR)
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row[r] = row_base + warp * 16 * MT + (r >> 1) * 16 + gq + 8 * (r & 1);
    ex[r][0] = ex[r][1] = -1;
    rl[r] = 0;
    rp[r] = -1;
    rt[r] = INFINITY;
    cnt[r] = 0;
    if (row[r] < M) {
      if (E > 0) ex[r][0] = exclude[row[r] * E];
      if (E > 1) ex[r][1] = exclude[row[r] * E + 1];
      if (LBL) rl[r] = row_labels[row[r]];
      if (LBL || THR) rp[r] = positive[row[r]];
      if (THR) rt[r] = threshold[row[r]];
    }
  }
  float m[R], l[R];  // running max (log2 domain), same in the 4 lanes of a quad; partial sum
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
  }

  // Stage (col, c) into buffer b: the key tile's chunk c (and the row tile's, when not resident).
  auto issue = [&](int64_t col, int c, int b) {
    if (!x_resident) load_tile16<kFwdBM>(sX + b * kFwdXElems, X, row_base, M, int64_t(c) * kDK, d, vec);
    load_tile16<kBN>(sY + b * kTileElems, Y, col, N, int64_t(c) * kDK, d, vec);
  };
  // The key labels of tile col into parity t (columns >= N get 0: masked by cvalid).
  auto issue_labels = [&](int64_t col, int t) {
    if (LBL) load_col64(sKL[t], key_labels, col, N);
  };
  if (x_resident) load_tile16<kFwdBM>(sX, X, row_base, M, 0, d, vec);
  issue(0, 0, 0);
  issue_labels(0, 0);
  cp_async_commit();

  int b = 0, tb = 0;  // buffer of the current stage, parity of the current key tile
  for (int64_t col_base = 0; col_base < N; col_base += kBN) {
    float s[MT][8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;

    for (int c = 0; c < nchunks; ++c) {
      cp_async_wait_all();
      __syncthreads();
      const bool last = c + 1 == nchunks;
      const int64_t ncol = last ? col_base + kBN : col_base;
      const bool new_tile = last && ncol < N;
      if (ncol < N) issue(ncol, last ? 0 : c + 1, b ^ 1);
      if (new_tile) issue_labels(ncol, tb ^ 1);
      cp_async_commit();
      // RES: every k-step (the columns past d are zero and add nothing): no guards in the product
      const int kvalid = RES ? kDK : static_cast<int>(d - int64_t(c) * kDK < kDK ? d - int64_t(c) * kDK : kDK);
      mma_qk<Tag, MT>(s, sX + (x_resident ? 0 : b * kFwdXElems), sY + b * kTileElems, warp, lane, kvalid);
      b ^= 1;
    }

    const int cvalid = static_cast<int>(N - col_base < kBN ? N - col_base : kBN);
    // Masked tile: one a rule can touch (a row's list entry in it, the end of the keys, or the
    // label / threshold rule, which are tested on every tile). The test is per warp (__any_sync:
    // one uniform branch); an interior tile skips the mask pass below and takes only the
    // mask-free softmax after it.
    bool masked = LBL || THR;
    if (!masked) {
      bool touch = cvalid < kBN;
#pragma unroll
      for (int r = 0; r < R; ++r)
        touch |= tile_index(ex[r][0], col_base, kBN) >= 0 || tile_index(ex[r][1], col_base, kBN) >= 0;
      masked = __any_sync(0xffffffffu, touch);
    }
    if (masked) {
      // Mask pass: every excluded entry of S becomes -inf (its exponent scale2 * S - shift is
      // then -inf for scale2 > 0, the API's s > 0, and 2^-inf = 0). Label rule as one 16-bit mask
      // per row (bit 2 nt + e = this lane's column nt*8 + 2tq + e): each key label is read from
      // shared memory once and consumed at once for the R rows (all 16 labels live across the
      // rows made ptxas spill).
      uint32_t lmask[R];
#pragma unroll
      for (int r = 0; r < R; ++r) lmask[r] = 0u;
      if (LBL) {
        int xp[R];
#pragma unroll
        for (int r = 0; r < R; ++r) xp[r] = tile_index(rp[r], col_base, kBN);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int lc = nt * 8 + 2 * tq + e;
            const int64_t kl = sKL[tb][lc];
#pragma unroll
            for (int r = 0; r < R; ++r) lmask[r] |= uint32_t(label_excluded(rl[r], kl, lc, xp[r])) << (2 * nt + e);
          }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float(&sr)[8][4] = s[r >> 1];
        const int h = r & 1;
        const int x0 = tile_index(ex[r][0], col_base, kBN), x1 = tile_index(ex[r][1], col_base, kBN);
        const int xtp = THR ? tile_index(rp[r], col_base, kBN) : -1;  // the positive, never dropped
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int lc = nt * 8 + 2 * tq + e;
            bool ok = lc < cvalid && lc != x0 && lc != x1;
            if (LBL) ok &= ((lmask[r] >> (2 * nt + e)) & 1u) == 0u;
            if (THR) {  // clause 3 on the keys clauses 1 and 2 keep: counted, then masked
              const bool dr = ok && threshold_dropped(sr[nt][2 * h + e] * scale, rt[r], lc, xtp);
              cnt[r] += dr;
              ok &= !dr;
            }
            sr[nt][2 * h + e] = ok ? sr[nt][2 * h + e] : -INFINITY;
          }
      }
    }
    // Softmax of the (masked) tile, the scale folded into the exponent: x = scale2 * S, and
    // max_j x_j = scale2 * max_j S_j (rounding is monotone, scale2 > 0), so the max is taken on S
    // and each term is one FFMA (scale2 * S - shift) and one ex2.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float(&sr)[8][4] = s[r >> 1];
      const int h = r & 1;
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) mx = fmaxf(mx, sr[nt][2 * h + e]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mnew = fmaxf(m[r], mx * scale2);
      // Branch-free update. mnew = -inf (every key of the row excluded so far): shift 0, so
      // every term is exp2(-inf) = 0 and l stays 0 (never exp2(-inf - -inf) = NaN). mnew = +inf
      // (overflow): shift 0 as well (lse_shift), l = +inf, r = +inf.
      const float shift = mnew == -INFINITY ? 0.f : lse_shift(mnew);
      float acc = 0.f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) acc += fast_exp2(fmaf(sr[nt][2 * h + e], scale2, -shift));
      l[r] = l[r] * fast_exp2(m[r] - shift) + acc;  // m[r] = -inf -> factor 0, l[r] was 0
      m[r] = mnew;
    }
    tb ^= 1;
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    float sum = l[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    // sum == 0 only for a fully excluded row (a caller error): r = -inf, not NaN.
    if (tq == 0 && row[r] < M) lse[row[r]] = (m[r] + log2f(sum)) * kLn2;
    if (THR) {
      int c = cnt[r];
      c += __shfl_xor_sync(0xffffffffu, c, 1);
      c += __shfl_xor_sync(0xffffffffu, c, 2);
      if (tq == 0 && row[r] < M) dropped[row[r]] = c;
    }
  }
}

// One key column's data as a query of the column term (kCol / kSym), loaded from global memory
// into registers before a product and stored to shared memory after it (its label-rule entries
// are plain copies: cp.async, with the tiles).
struct ColStage {
  float r2 = 0.f, g = 0.f;  // r_b * log2(e), g_b / gmax (0 for columns >= nY: their W is masked anyway)
  int x0 = -1, x1 = -1;     // row b's exclusions, local to this CTA's row block (-1 = none)
  // Whether the column's exclusions touch this CTA's row block (the tile is then masked).
  __device__ __forceinline__ bool touches() const { return x0 >= 0 || x1 >= 0; }
  // Column j < nY of yq, its exclusions made local to the row block [row_base, row_base + rows)
  // (x_offset is subtracted from the entry, not added to row_base: see lse_bwd_simt_kernel).
  static __device__ __forceinline__ ColStage fetch(const QuerySide<float>& yq, int64_t j, float inv_gmax,
                                                   int64_t x_offset, int64_t row_base, int rows) {
    ColStage cs;
    cs.r2 = yq.lse[j] * kLog2e;
    cs.g = yq.grad[j] * inv_gmax;
    if (yq.E > 0) cs.x0 = tile_index(yq.exclude[j * yq.E] - x_offset, row_base, rows);
    if (yq.E > 1) cs.x1 = tile_index(yq.exclude[j * yq.E + 1] - x_offset, row_base, rows);
    return cs;
  }
  // The shared-memory entry {r2, g, x0, x1 (int bits)}.
  __device__ __forceinline__ float4 packed() const {
    return make_float4(r2, g, __int_as_float(x0), __int_as_float(x1));
  }
};

// out = the CTA's sum of v in a fixed order (warp xor tree, then the warps in order); every thread
// calls it (one barrier), sred holds a float per warp.
__device__ __forceinline__ void store_cta_sum(float v, float* sred, float* out) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) sred[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kMmaThreads / 32; ++w) t += sred[w];
    *out = t;
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
// Thread (warp, lane = 4 gq + tq) owns X rows 16 warp + gq + 8 h (h in {0, 1}; one m16 tile per
// warp) and, of every key tile, columns nt * 8 + 2 tq + e; of the output, features
// dv0 + vt * 8 + 2 tq + e (vt < 16).
// Precision: W' is rounded to the input dtype (fp16 / bf16) for the second mma, the same choice
// as flash-attention's P; accumulation stays fp32. To keep W' inside fp16's normal range, the
// factor pulled out is g_a itself (kRow: W' = P in [0, 1]) or gmax = max_b |g_b| (kCol/kSym:
// |W'| <= 2; gmax = max over both sides' gradients when paired) -- a plain g_b P with g = 1/M
// would fall into fp16 subnormals for M > 16384.
// Masks: on a masked tile (see `masked` below) an excluded entry's exponent is replaced by -inf
// before ex2 (2^-inf = 0), branch-free inside the tile; an interior tile runs the copy of the
// S -> W' loop without any per-element test (FFMA, MUFU per term).
// dscale partial (kRow, kSym; blockIdx.y == 0 only): sum_ab g_a P_ab S_ab in fp32, exact W
// (per row: sum_b P_ab S_ab, times g_a at the end).
// Registers: 64 (output acc) + 32 (S) fp32 + fragments + the next tile's ColStage; no spills
// (see the ptxas report). The min-blocks hint 2 of __launch_bounds__ matters: with (128) alone
// ptxas (13.0) chose a 168-register budget for kRow on sm_80 and spilled; with (128, 2) the
// budget is 255 and nothing spills.
// Labels (LBL): the row term reads xq.labels / xq.positive of the X rows and y_key_labels of the
// Y columns; the column term (kCol, kSym) reads x_key_labels of the X rows and yq.labels /
// yq.positive of the Y columns (positive made local to this CTA's row block like the exclusion
// lists). All of them sit in shared memory and are turned into bit masks once per key tile.
// Arguments: xq = the X rows as queries (kRow, kSym; unused in kCol), y_key_labels = the Y
// columns' labels as keys (row term); yq = the Y columns as queries (kCol, kSym; unused in kRow),
// whose lists and positives number the X rows from x_offset, x_key_labels = the X rows' labels as
// keys (column term).
// Threshold rule (THR, false-negative filtering; launched only when a side has thresholds, so the
// THR = false code is the rule-free kernel): each side uses its own rows' thresholds. The row term
// reads the X rows' (sXt, positives in sXrp; +inf for a side without them), the column term the Y
// columns' (sCt and sQp, copied by cp.async with the key tile's labels; positives made local to
// the row block per column), both from shared memory where they are used: no registers live
// across the product (the two-sided kernel is at 233-254 of 255). The logit s * S (nats) is
// compared through exclusion.h's threshold_dropped and folded into the same branch-free -inf mask.
// The rule-free launch with d <= kDK and aligned rows runs lse_bwd_resident_mma instead (below).
template <typename Tag, int MODE, bool LBL, bool THR>
__device__ __forceinline__ void lse_bwd_mma(const uint16_t* __restrict__ X, const uint16_t* __restrict__ Y,
                                            const float* __restrict__ scale_ptr, const Sides<float>& sides,
                                            int64_t nX, int64_t nY, int64_t d, bool vec,
                                            const float* __restrict__ gmax_ptr, typename Tag::T* __restrict__ dX,
                                            float* __restrict__ dscale_partial) {
  const QuerySide<float> xq = sides.rows, yq = sides.keys;
  const int64_t* __restrict__ y_key_labels = sides.key_labels;
  const int64_t* __restrict__ x_key_labels = sides.row_labels;
  const int64_t x_offset = sides.row_offset;
  const int nchunks = static_cast<int>((d + kDK - 1) / kDK);
  const bool x_resident = nchunks == 1;
  const bool need_v = !x_resident;  // else the (single) key tile holds features [0, kDK) = chunk
  // Dynamic smem (bwd_mma_smem): X (1 or kStages), Y (kStages), V (kStages, only when need_v).
  extern __shared__ __align__(16) uint16_t smem16[];
  uint16_t* sX = smem16;
  uint16_t* sY = smem16 + (x_resident ? 1 : kStages) * kTileElems;
  uint16_t* sV = sY + kStages * kTileElems;
  // Per-key-tile data by key-tile parity (unused ones are one-element dummies):
  constexpr bool kColTerm = MODE != kRow;
  constexpr bool kRowLbl = LBL && MODE != kCol;  // row term: X row = query, Y column = key
  constexpr bool kColLbl = LBL && MODE != kRow;  // column term: Y column = query, X row = key
  constexpr bool kRowThr = THR && MODE != kCol;  // threshold rule, row term
  constexpr bool kColThr = THR && MODE != kRow;  // threshold rule, column term
  constexpr bool kColPos = kColLbl || kColThr, kRowPos = kRowLbl || kRowThr;
  __shared__ float4 sCol[kColTerm ? kStages : 1][kColTerm ? kBN : 1];  // {r2, g, x0, x1 (int bits)}
  __shared__ int64_t sKL[kRowLbl ? kStages : 1][kRowLbl ? kBN : 1];    // y_key_labels of the Y columns
  __shared__ int64_t sQL[kColLbl ? kStages : 1][kColLbl ? kBN : 1];    // yq.labels of the Y columns
  __shared__ int64_t sQp[kColPos ? kStages : 1][kColPos ? kBN : 1];    // yq.positive of the Y columns
  __shared__ float sCt[kColThr ? kStages : 1][kColThr ? kBN : 1];      // yq.threshold of the Y columns
  __shared__ int64_t sXrl[kRowLbl ? kBM : 1], sXrp[kRowPos ? kBM : 1];  // xq.labels / positive of the X rows
  __shared__ float sXt[kRowThr ? kBM : 1];                              // xq.threshold of the X rows
  __shared__ int64_t sXkl[kColLbl ? kBM : 1];                           // x_key_labels of the X rows
  __shared__ float sRed[kMmaThreads / 32];

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
  bool rv[2];  // the row exists (rows past nX: see "Rows past nX" below)
  float rr2[2], rg[2], rgw[2];  // r_a * log2(e), g_a, g_a / gmax (kSym: the row term's weight in W')
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
    }
    rgw[h] = rg[h] * inv_gmax;
  }
  // The X rows' label-rule entries (LBL) stay in shared memory, read once per key tile by the
  // mask pre-pass below: in registers (12 more per thread) ptxas spilled the two-sided kernel.
  if ((LBL || kRowThr) && threadIdx.x < kBM) {
    const int64_t r = row_base + threadIdx.x;
    const bool v = r < nX;
    if (kRowLbl) {
      sXrl[threadIdx.x] = v ? xq.labels[r] : 0;
      sXrp[threadIdx.x] = v ? xq.positive[r] : -1;
    } else if constexpr (kRowThr) {  // a side without the rule has no positives: +inf drops nothing
      sXrp[threadIdx.x] = v && xq.positive != nullptr ? xq.positive[r] : -1;
    }
    if constexpr (kRowThr) sXt[threadIdx.x] = v && xq.threshold != nullptr ? xq.threshold[r] : INFINITY;
    if (kColLbl) sXkl[threadIdx.x] = v ? x_key_labels[r] : 0;
  }

  float acc[16][4];
#pragma unroll
  for (int vt = 0; vt < 16; ++vt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[vt][e] = 0.f;
  float dsr[2] = {0.f, 0.f};  // sum_b P_ab S_ab of this thread's rows (dscale = sum_a g_a dsr_a)
  int cflag = 0;  // the column data last stored touches this row block (ColStage::touches)

  // The column-term data of key tile `col` (threads < kBN, one column each).
  auto fetch_col = [&](int64_t col) {
    ColStage cs;
    const int64_t j = col + threadIdx.x;
    if (kColTerm && threadIdx.x < kBN && j < nY) cs = ColStage::fetch(yq, j, inv_gmax, x_offset, row_base, kBM);
    return cs;
  };
  auto store_col = [&](const ColStage& cs, int t) {
    if (kColTerm && threadIdx.x < kBN) {
      sCol[t][threadIdx.x] = cs.packed();
      cflag = cs.touches();
    }
  };
  // The label-rule entries of key tile col into parity t (columns >= nY get 0: masked by cvalid).
  auto issue_labels = [&](int64_t col, int t) {
    if (kRowLbl) load_col64(sKL[t], y_key_labels, col, nY);
    if (kColLbl) {
      load_col64(sQL[t], yq.labels, col, nY);
      load_col64(sQp[t], yq.positive, col, nY);
    }
    // if constexpr: without THR the lambda does not capture the rule's data.
    if constexpr (kColThr) {  // a side without the rule: positives -1 and thresholds +inf (plain stores)
      if (!kColLbl && yq.positive != nullptr) load_col64(sQp[t], yq.positive, col, nY);
      else if (!kColLbl && threadIdx.x < kBN) sQp[t][threadIdx.x] = -1;
      if (yq.threshold != nullptr) load_col32(sCt[t], yq.threshold, col, nY);
      else if (threadIdx.x < kBN) sCt[t][threadIdx.x] = INFINITY;
    }
  };
  // Stage (col, c) into buffer b; with the first chunk of a key tile of parity t, its value tile.
  auto issue = [&](int64_t col, int c, int b, int t) {
    if (!x_resident) load_tile16<kBM>(sX + b * kTileElems, X, row_base, nX, int64_t(c) * kDK, d, vec);
    load_tile16<kBN>(sY + b * kTileElems, Y, col, nY, int64_t(c) * kDK, d, vec);
    if (need_v && c == 0) load_tile16<kBN>(sV + t * kTileElems, Y, col, nY, dv0, d, vec);
  };
  if (x_resident) load_tile16<kBM>(sX, X, row_base, nX, 0, d, vec);
  issue(0, 0, 0, 0);
  issue_labels(0, 0);
  store_col(fetch_col(0), 0);
  cp_async_commit();

  // ldmatrix.trans lane offset of the value tile (B of the second mma).
  const int pv_lane = ((lane & 7) + ((lane >> 3) & 1) * 8) * kLds + (lane >> 4) * 8;
  int b = 0, tb = 0;  // buffer of the current stage, parity of the current key tile
  for (int64_t col_base = 0; col_base < nY; col_base += kBN) {
    float s1[1][8][4];
    float(&s)[8][4] = s1[0];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    int yb = 0;  // buffer of the tile's last chunk (the value tile when d <= kDK)
    // Whether a column of this key tile has an exclusion in this row block: OR-reduced over the
    // CTA by the stage barriers (cflag holds this tile's flag from the store_col that the first
    // barrier publishes until the store_col of the next tile, after the last barrier).
    int col_touch = 0;
    for (int c = 0; c < nchunks; ++c) {
      cp_async_wait_all();
      if constexpr (kColTerm) col_touch = __syncthreads_or(cflag);
      else __syncthreads();
      const bool last = c + 1 == nchunks;
      const int64_t ncol = last ? col_base + kBN : col_base;
      const bool new_tile = last && ncol < nY;
      if (ncol < nY) issue(ncol, last ? 0 : c + 1, b ^ 1, last ? tb ^ 1 : tb);
      if (new_tile) issue_labels(ncol, tb ^ 1);
      cp_async_commit();
      ColStage next;
      if (new_tile) next = fetch_col(ncol);
      const int kvalid = static_cast<int>(d - int64_t(c) * kDK < kDK ? d - int64_t(c) * kDK : kDK);
      mma_qk<Tag, 1>(s1, sX + (x_resident ? 0 : b * kTileElems), sY + b * kTileElems, warp, lane, kvalid);
      if (new_tile) store_col(next, tb ^ 1);
      yb = b;
      b ^= 1;
    }

    // S -> W' (in place), dscale partial from the exact fp32 W. Each column's data is read from
    // shared memory once (one 16-B load) and used for both rows.
    // Rows past nX are not masked: their X rows are zero (S = 0, every exponent finite or -inf)
    // and g = 0 (no dscale term); W' row a only feeds output row a, which is never stored.
    const int cvalid = static_cast<int>(nY - col_base < kBN ? nY - col_base : kBN);
    int x0[2], x1[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      x0[h] = tile_index(ex[h][0], col_base, kBN);
      x1[h] = tile_index(ex[h][1], col_base, kBN);
    }
    // Label rule (LBL) as bit masks, bit 2 (2 nt + e) + h = (row h, column nt*8 + 2tq + e): each
    // column's labels are read from shared memory once and consumed at once for both rows, as in
    // the forward (testing them inside the loop below kept them live with the column data and
    // ptxas spilled).
    uint32_t rmask = 0u, cmask = 0u;  // row term, column term
    if (LBL) {
      int xp[2];
      int64_t xrl[2], xkl[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lr = warp * 16 + gq + 8 * h;
        xrl[h] = kRowLbl ? sXrl[lr] : 0;
        xp[h] = kRowLbl ? tile_index(sXrp[lr], col_base, kBN) : -1;
        xkl[h] = kColLbl ? sXkl[lr] : 0;
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int lc = nt * 8 + 2 * tq + e, bit = 2 * (2 * nt + e);
          if (kRowLbl) {
            const int64_t ykl = sKL[tb][lc];
#pragma unroll
            for (int h = 0; h < 2; ++h) rmask |= uint32_t(label_excluded(xrl[h], ykl, lc, xp[h])) << (bit + h);
          }
          if (kColLbl) {
            const int64_t yql = sQL[tb][lc];
            // x_offset is subtracted from the entry, not added to row_base: see lse_bwd_simt_kernel.
            const int yqp = tile_index(sQp[tb][lc] - x_offset, row_base, kBM);
#pragma unroll
            for (int h = 0; h < 2; ++h)
              cmask |= uint32_t(label_excluded(yql, xkl[h], warp * 16 + gq + 8 * h, yqp)) << (bit + h);
          }
        }
    }
    // Masked tile: one a rule can touch (a row's or a column's list entry in it, the end of the
    // keys, or the label / threshold rule, tested on every tile), decided per warp (one uniform
    // branch). An interior tile takes the mask-free copy of the loop below (kMasked = false).
    bool masked = LBL || THR;
    if (!masked) {
      bool touch = cvalid < kBN;
      if (MODE != kCol) touch |= (x0[0] >= 0) | (x1[0] >= 0) | (x0[1] >= 0) | (x1[1] >= 0);
      masked = __any_sync(0xffffffffu, touch) || col_touch != 0;
    }
    // S -> W' per entry, the scale folded into the exponent (one FFMA: scale2 S - r2) and 1/gmax
    // into the row / column weights (rgw, ci.y). Excluded entries: exponent -inf, P = 0.
    auto to_w = [&](auto masked_tag) {
      constexpr bool kMasked = decltype(masked_tag)::value;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int lc = nt * 8 + 2 * tq + e, bit = 2 * (2 * nt + e);
          const float4 ci = kColTerm ? sCol[tb][lc] : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int lr = warp * 16 + gq + 8 * h;
            const float sv = s[nt][2 * h + e];
            const bool cok = lc < cvalid;
            float w = 0.f;
            if (MODE != kCol) {  // W_ab: row a = X row (query), key b = Y column
              float x = fmaf(sv, scale2, -rr2[h]);
              if constexpr (kMasked) {
                bool ok = cok && lc != x0[h] && lc != x1[h];
                if (kRowLbl) ok &= ((rmask >> (bit + h)) & 1u) == 0u;
                // Threshold rule (THR): row lr's threshold and positive (local to this key tile).
                if constexpr (kRowThr)
                  ok &= !threshold_dropped(sv * scale, sXt[lr], lc, tile_index(sXrp[lr], col_base, kBN));
                x = ok ? x : -INFINITY;
              }
              const float p = fast_exp2(x);
              dsr[h] = fmaf(p, sv, dsr[h]);
              w = (MODE == kRow) ? p : rgw[h] * p;
            }
            if (kColTerm) {  // W_ba (V_ba when paired): row b = Y column (query), key a = X row
              float x = fmaf(sv, scale2, -ci.x);
              if constexpr (kMasked) {
                bool ok = cok && lr != __float_as_int(ci.z) && lr != __float_as_int(ci.w);
                if (kColLbl) ok &= ((cmask >> (bit + h)) & 1u) == 0u;
                // Threshold rule (THR): column lc's threshold and positive (local to the row block;
                // x_offset is subtracted from the entry, not added to row_base: see lse_bwd_simt_kernel).
                if constexpr (kColThr)
                  ok &= !threshold_dropped(sv * scale, sCt[tb][lc], lr,
                                           tile_index(sQp[tb][lc] - x_offset, row_base, kBM));
                x = ok ? x : -INFINITY;
              }
              w = fmaf(ci.y, fast_exp2(x), w);
            }
            s[nt][2 * h + e] = w;
          }
        }
    };
    if (masked) to_w(std::true_type{});
    else to_w(std::false_type{});

    // acc += W'(16 x 64) * V(64 keys x 128 features)
    const uint16_t* pv_base = (need_v ? sV + tb * kTileElems : sY + yb * kTileElems) + pv_lane;
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
    tb ^= 1;
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

  if (MODE != kCol && blockIdx.y == 0) store_cta_sum(rg[0] * dsr[0] + rg[1] * dsr[1], sRed, dscale_partial + blockIdx.x);
}

// The resident backward (lse_bwd_resident_mma_kernel): the rule-free launch with d <= kDK and
// 16-B aligned rows (no label / threshold rule), with 32 rows per warp.
// One CTA per kResBM = 128-row block of X (4 warps x 32 rows: two m16 tiles per warp), grid.y = 1
// (the whole output row, d <= kDV, in one program); key tiles of kResBN = 32, each the S key tile
// and the value tile at once (features [0, kDK), zero past d). The maths, W' per MODE, gmax, the
// masks, the dscale partial and the rows past nX are lse_bwd_mma's (see its header); what differs:
//   - Thread (warp, lane = 4 gq + tq) owns X rows 32 warp + 16 mt + gq + 8 h (r = 2 mt + h; mt, h
//     in {0, 1}) and, of every key tile, columns nt * 8 + 2 tq + e (nt < 4, e < 2); of the output,
//     features vt * 8 + 2 tq + e (vt < 16) of its 4 rows.
//   - Registers: acc 2 x 16 x 4 = 128 fp32 (output), S 2 x 4 x 4 = 32 fp32, 4 rows' state; the
//     64-key tile of lse_bwd_mma would need 64 S registers on top (over 255).
//   - Shared-memory reads per entry (ldmatrix, per warp and 32 x 32 entries): S product 8 k-steps
//     x (2 A + 2 B) x4 matrices = 16 KB, W'V product 2 k-steps x 8 x4.trans = 8 KB: 24 B per entry
//     (lse_bwd_mma: 20 + 16 = 36), every B fragment serving both m-tiles.
//   - One stage per key tile (a single feature chunk): wait_group 0 + barrier, copy of the next
//     key tile (cp.async, the other buffer), the next tile's column data (fetch_col: warp 0, one
//     column per lane), S, W', acc += W' V. The column data is double-buffered by key-tile parity
//     as in lse_bwd_mma (stored after the S product, published by the next barrier).
template <typename Tag, int MODE>
__device__ __forceinline__ void lse_bwd_resident_mma(const uint16_t* __restrict__ X, const uint16_t* __restrict__ Y,
                                                     const float* __restrict__ scale_ptr, const Sides<float>& sides,
                                                     int64_t nX, int64_t nY, int64_t d,
                                                     const float* __restrict__ gmax_ptr,
                                                     typename Tag::T* __restrict__ dX,
                                                     float* __restrict__ dscale_partial) {
  constexpr int MT = kResMTiles, NT = kResBN / 8, R = 2 * MT;  // m16 tiles, n8 tiles, rows per thread
  constexpr bool kColTerm = MODE != kRow;
  const QuerySide<float> xq = sides.rows, yq = sides.keys;
  const int64_t x_offset = sides.row_offset;
  // Dynamic smem (bwd_res_mma_smem): X (kResBM rows), then kStages key tiles of kResBN rows.
  extern __shared__ __align__(16) uint16_t smem16[];
  uint16_t* sX = smem16;
  uint16_t* sY = smem16 + kResBM * kLds;
  __shared__ float4 sCol[kColTerm ? kStages : 1][kColTerm ? kResBN : 1];  // {r2, g, x0, x1 (int bits)}
  __shared__ float sRed[kMmaThreads / 32];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int64_t row_base = int64_t(blockIdx.x) * kResBM;
  const float scale = __ldg(scale_ptr);
  const float scale2 = scale * kLog2e;
  float inv_gmax = 1.f, gmax = 1.f;
  if (MODE != kRow) {
    gmax = __ldg(gmax_ptr);
    inv_gmax = gmax > 0.f ? 1.f / gmax : 0.f;  // all-zero g: W' = 0 and the output is 0
  }

  // This thread's four rows (local lr = 32 warp + 16 mt + gq + 8 h, r = 2 mt + h).
  int64_t ex[R][2];
  float rr2[R], rgw[R];  // r_a * log2(e), g_a / gmax (kSym: the row term's weight in W')
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = row_base + warp * 32 + (r >> 1) * 16 + gq + 8 * (r & 1);
    ex[r][0] = ex[r][1] = -1;
    rr2[r] = 0.f;
    rgw[r] = 0.f;
    if (MODE != kCol && row < nX) {
      rr2[r] = xq.lse[row] * kLog2e;
      rgw[r] = xq.grad[row] * inv_gmax;
      if (xq.E > 0) ex[r][0] = xq.exclude[row * xq.E];
      if (xq.E > 1) ex[r][1] = xq.exclude[row * xq.E + 1];
    }
  }

  float acc[MT][16][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int vt = 0; vt < 16; ++vt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][vt][e] = 0.f;
  float dsr[R];  // sum_b P_ab S_ab of this thread's rows (dscale = sum_a g_a dsr_a)
#pragma unroll
  for (int r = 0; r < R; ++r) dsr[r] = 0.f;
  int cflag = 0;  // the column data last stored touches this row block (ColStage::touches)

  // The column-term data of key tile `col` (warp 0, one column per lane).
  auto fetch_col = [&](int64_t col) {
    ColStage cs;
    const int64_t j = col + threadIdx.x;
    if (kColTerm && threadIdx.x < kResBN && j < nY) cs = ColStage::fetch(yq, j, inv_gmax, x_offset, row_base, kResBM);
    return cs;
  };
  auto store_col = [&](const ColStage& cs, int t) {
    if (kColTerm && threadIdx.x < kResBN) {
      sCol[t][threadIdx.x] = cs.packed();
      cflag = cs.touches();
    }
  };
  load_tile16<kResBM>(sX, X, row_base, nX, 0, d, true);
  load_tile16<kResBN>(sY, Y, 0, nY, 0, d, true);
  store_col(fetch_col(0), 0);
  cp_async_commit();

  // ldmatrix.trans lane offset of the value tile (B of the second mma, see below).
  const int pv_lane = ((lane & 7) + ((lane >> 3) & 1) * 8) * kLds + (lane >> 4) * 8;
  int tb = 0;  // parity of the current key tile = its buffer
  for (int64_t col_base = 0; col_base < nY; col_base += kResBN) {
    cp_async_wait_all();
    // Whether a column of this key tile has an exclusion in this row block, OR-reduced over the
    // CTA by the barrier that publishes the tile (cflag: this tile's, from the previous store_col).
    int col_touch = 0;
    if constexpr (kColTerm) col_touch = __syncthreads_or(cflag);
    else __syncthreads();
    const int64_t ncol = col_base + kResBN;
    if (ncol < nY) load_tile16<kResBN>(sY + (tb ^ 1) * kResBN * kLds, Y, ncol, nY, 0, d, true);
    cp_async_commit();
    ColStage next;
    if (ncol < nY) next = fetch_col(ncol);

    // S (fp32): every k-step (the features past d are zero and add nothing).
    const uint16_t* sYt = sY + tb * kResBN * kLds;
    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
    mma_qk<Tag, MT>(s, sX, sYt, warp, lane, kDK);
    if (ncol < nY) store_col(next, tb ^ 1);

    // Masked tile (exclusion entry of a row or a column in it, or the end of the keys), one warp
    // vote: as lse_bwd_mma's.
    const int cvalid = static_cast<int>(nY - col_base < kResBN ? nY - col_base : kResBN);
    int x0[R], x1[R];
    bool touch = cvalid < kResBN;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      x0[r] = tile_index(ex[r][0], col_base, kResBN);
      x1[r] = tile_index(ex[r][1], col_base, kResBN);
      if (MODE != kCol) touch |= (x0[r] >= 0) | (x1[r] >= 0);
    }
    const bool masked = __any_sync(0xffffffffu, touch) || col_touch != 0;
    // S -> W' in place (lse_bwd_mma's to_w with four rows per column): each column's data is one
    // 16-B shared load used for the four rows.
    auto to_w = [&](auto masked_tag) {
      constexpr bool kMasked = decltype(masked_tag)::value;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int lc = nt * 8 + 2 * tq + e;
          const float4 ci = kColTerm ? sCol[tb][lc] : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const int mt = r >> 1, h = r & 1;
            const int lr = warp * 32 + mt * 16 + gq + 8 * h;
            const float sv = s[mt][nt][2 * h + e];
            float w = 0.f;
            if (MODE != kCol) {  // W_ab: row a = X row (query), key b = Y column
              float x = fmaf(sv, scale2, -rr2[r]);
              if constexpr (kMasked) x = (lc < cvalid && lc != x0[r] && lc != x1[r]) ? x : -INFINITY;
              const float p = fast_exp2(x);
              dsr[r] = fmaf(p, sv, dsr[r]);
              w = (MODE == kRow) ? p : rgw[r] * p;
            }
            if (kColTerm) {  // W_ba (V_ba when paired): row b = Y column (query), key a = X row
              float x = fmaf(sv, scale2, -ci.x);
              if constexpr (kMasked)
                x = (lc < cvalid && lr != __float_as_int(ci.z) && lr != __float_as_int(ci.w)) ? x : -INFINITY;
              w = fmaf(ci.y, fast_exp2(x), w);
            }
            s[mt][nt][2 * h + e] = w;
          }
        }
    };
    if (masked) to_w(std::true_type{});
    else to_w(std::false_type{});

    // acc[mt] += W'(m-tile mt: 16 rows x 32 keys) * V(32 keys x 128 features), V = the key tile.
    // A (m16k16, row major) of k-step kk, m-tile mt, from the C fragments of n-tiles 2kk, 2kk+1:
    //   a0 = (row gq, keys 16kk + 2tq, +1) = s[mt][2kk][0..1],  a1 = (row gq+8, same keys) = [2..3],
    //   a2 = (row gq, keys 16kk + 8 + 2tq, +1) = s[mt][2kk+1][0..1],  a3 = (row gq+8) = [2..3].
    // B (k16n8, "col": b0 = (keys 2tq, +1; feature gq), b1 = (keys 8 + 2tq, +1; feature gq)) from
    // the row-major V tile (row = key) by ldmatrix.x4.trans: lanes 8i..8i+7 address matrix i =
    // (keys 16kk + (i & 1) 8 + [0, 8), features 16vp + (i >> 1) 8 + [0, 8)) (pv_lane); .trans gives
    // lane l (rows 2(l%4), +1; col l/4) = (keys 2tq, +1; feature gq) of each: b0, b1 of the n-tile
    // of features 16vp + [0, 8), b2, b3 of 16vp + 8 + [0, 8). Each B fragment serves both m-tiles.
    const uint16_t* pv_base = sYt + pv_lane;
#pragma unroll
    for (int kk = 0; kk < kResBN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = Tag::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = Tag::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = Tag::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = Tag::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
      // Every output n-tile (features past d: V is zero there, the product adds 0; no guards).
#pragma unroll
      for (int vp = 0; vp < kDV / 16; ++vp) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4_trans(b0, b1, b2, b3, pv_base + kk * 16 * kLds + vp * 16);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Tag::mma(acc[mt][2 * vp], a[mt], b0, b1);
          Tag::mma(acc[mt][2 * vp + 1], a[mt], b2, b3);
        }
      }
    }
    tb ^= 1;
  }

  // dX = s * (row factor) * acc; the row side's g_a is read again here (not kept across the loop).
  float dsc = 0.f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int mt = r >> 1, h = r & 1;
    const int64_t row = row_base + warp * 32 + mt * 16 + gq + 8 * h;
    if (row >= nX) continue;
    const float rg = MODE != kCol ? xq.grad[row] : 0.f;
    dsc = fmaf(rg, dsr[r], dsc);
    const float f = (MODE == kRow) ? scale * rg : scale * gmax;
    typename Tag::T* out = dX + row * d;
#pragma unroll
    for (int vt = 0; vt < 16; ++vt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = vt * 8 + 2 * tq + e;
        if (col < d) out[col] = Tag::from_float(acc[mt][vt][2 * h + e] * f);
      }
  }

  // dscale partial of this row block (kRow, kSym), in a fixed order.
  if (MODE != kCol) store_cta_sum(dsc, sRed, dscale_partial + blockIdx.x);
}

// The kernels. lse_*_mma_kernel: every case (any d, any alignment, both rules);
// lse_*_resident_mma_kernel: the rule-free launch with d <= kDK and 16-B aligned rows (the
// launchers pick it): the forward's body with the other cases compiled out, the backward's
// lse_bwd_resident_mma (32 rows per warp).
template <typename Tag, bool LBL, bool THR>
__global__ void __launch_bounds__(kMmaThreads)
    lse_fwd_mma_kernel(const uint16_t* __restrict__ X, const uint16_t* __restrict__ Y,
                       const float* __restrict__ scale_ptr, const infonce_kernels::ExclusionRule rule,
                       int64_t M, int64_t N, int64_t d, bool vec, float* __restrict__ lse,
                       int32_t* __restrict__ dropped) {
  lse_fwd_mma<Tag, LBL, THR, false>(X, Y, scale_ptr, rule, M, N, d, vec, lse, dropped);
}
template <typename Tag>
__global__ void __launch_bounds__(kMmaThreads)
    lse_fwd_resident_mma_kernel(const uint16_t* __restrict__ X, const uint16_t* __restrict__ Y,
                                const float* __restrict__ scale_ptr, const infonce_kernels::ExclusionRule rule,
                                int64_t M, int64_t N, int64_t d, float* __restrict__ lse) {
  lse_fwd_mma<Tag, false, false, true>(X, Y, scale_ptr, rule, M, N, d, true, lse, nullptr);
}
// The min-blocks hint 2 of __launch_bounds__ matters: see lse_bwd_mma's header.
template <typename Tag, int MODE, bool LBL, bool THR>
__global__ void __launch_bounds__(kMmaThreads, 2)
    lse_bwd_mma_kernel(const uint16_t* __restrict__ X, const uint16_t* __restrict__ Y,
                       const float* __restrict__ scale_ptr, const Sides<float> sides, int64_t nX,
                       int64_t nY, int64_t d, bool vec, const float* __restrict__ gmax_ptr,
                       typename Tag::T* __restrict__ dX, float* __restrict__ dscale_partial) {
  lse_bwd_mma<Tag, MODE, LBL, THR>(X, Y, scale_ptr, sides, nX, nY, d, vec, gmax_ptr, dX, dscale_partial);
}
template <typename Tag, int MODE>
__global__ void __launch_bounds__(kMmaThreads, 2)
    lse_bwd_resident_mma_kernel(const uint16_t* __restrict__ X, const uint16_t* __restrict__ Y,
                                const float* __restrict__ scale_ptr, const Sides<float> sides, int64_t nX,
                                int64_t nY, int64_t d, const float* __restrict__ gmax_ptr,
                                typename Tag::T* __restrict__ dX, float* __restrict__ dscale_partial) {
  lse_bwd_resident_mma<Tag, MODE>(X, Y, scale_ptr, sides, nX, nY, d, gmax_ptr, dX, dscale_partial);
}

}  // namespace
}  // namespace infonce_cuda
