// The fp32 / fp64 kernels: plain FMA (SIMT) tiles, 256 threads, 16 x 16 threads with TM x TM
// micro tiles, exact in the input precision (fp32 is exact fp32, no TF32, matching torch's
// default fp32 matmul on CUDA). Maths and the exclusion rule: lse_kernels.cu's header and
// csrc/common/exclusion.h; launched from launch_simt.cu.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernel_args.cuh"
#include "online_lse.cuh"
#include "tile_sizes.cuh"

namespace infonce_cuda {
namespace {

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
                        const T* __restrict__ scale_ptr, const infonce_kernels::ExclusionRule rule,
                        int64_t M, int64_t N, int64_t d, T* __restrict__ lse,
                        int32_t* __restrict__ dropped) {
  const int64_t* __restrict__ exclude = rule.lists;
  const int64_t* __restrict__ row_labels = rule.row_labels;
  const int64_t* __restrict__ key_labels = rule.key_labels;
  const int64_t* __restrict__ positive = rule.positive;
  const int E = static_cast<int>(rule.E);
  constexpr int B = 16 * TM;
  __shared__ T sX[kKC][B + 1];
  __shared__ T sY[kKC][B + 1];
  __shared__ int64_t sKL[LBL ? B : 1];  // key labels of the current key tile (LBL only)
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t row_base = int64_t(blockIdx.x) * B;
  const T scale = scale_ptr[0];
  const T kNegInf = -static_cast<T>(INFINITY);
  const T* __restrict__ threshold = static_cast<const T*>(rule.threshold);  // nullptr: rule off
  const bool thr = threshold != nullptr;

  int64_t row[TM], ex[TM][2];
  int64_t rl[TM], rp[TM];  // row label (LBL only), positive (LBL or the threshold rule)
  T rt[TM];                // row threshold (+inf without the rule)
  int cnt[TM];             // keys the threshold rule dropped (this lane's columns)
  T m[TM], l[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    row[i] = row_base + ty * TM + i;
    ex[i][0] = ex[i][1] = -1;
    rl[i] = 0;
    rp[i] = -1;
    rt[i] = static_cast<T>(INFINITY);
    cnt[i] = 0;
    if (row[i] < M) {
      if (E > 0) ex[i][0] = exclude[row[i] * E];
      if (E > 1) ex[i][1] = exclude[row[i] * E + 1];
      if (LBL) rl[i] = row_labels[row[i]];
      if (LBL || thr) rp[i] = positive[row[i]];
      if (thr) rt[i] = threshold[row[i]];
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
      const int x0 = tile_index(ex[i][0], col_base, B), x1 = tile_index(ex[i][1], col_base, B);
      const int xp = tile_index(rp[i], col_base, B);  // -1 without either rule (rp = -1)
      T mx = kNegInf;
#pragma unroll
      for (int j = 0; j < TM; ++j) {
        const int lc = tx + 16 * j;
        bool ok = lc < cvalid && lc != x0 && lc != x1;
        if (LBL) ok &= !label_excluded(rl[i], sKL[lc], lc, xp);
        const T logit = s[i][j] * scale;
        if (thr && ok && threshold_dropped(logit, rt[i], lc, xp)) {
          ok = false;
          ++cnt[i];
        }
        s[i][j] = ok ? logit : kNegInf;
        mx = fmax(mx, s[i][j]);
      }
#pragma unroll
      for (int o = 1; o < 16; o <<= 1) mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const T mnew = fmax(m[i], mx);
      if (mnew != kNegInf) {  // all-excluded so far: skip (no exp(-inf - -inf))
        const T shift = lse_shift(mnew);  // 0 where the logits overflowed to +inf
        T acc = T(0);
#pragma unroll
        for (int j = 0; j < TM; ++j) acc += math_exp(s[i][j] - shift);
        l[i] = l[i] * math_exp(m[i] - shift) + acc;
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
    if (thr) {
      int c = cnt[i];
#pragma unroll
      for (int o = 1; o < 16; o <<= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
      if (tx == 0 && row[i] < M) dropped[row[i]] = c;
    }
  }
}

// Backward SIMT, same roles as the mma kernel; W (exact, in T) goes through shared memory.
// __launch_bounds__(256, 2) caps registers at 128: without it ptxas spilled 4 B in <double, kRow>.
// grid = (row blocks, ceil(d / (16 TM))) output feature chunks of 16 TM.
// Arguments (xq, y_key_labels, yq, x_key_labels, x_offset), labels (LBL) and the threshold rule
// (THR): as in lse_bwd_mma_kernel.
template <typename T, int TM, int MODE, bool LBL, bool THR>
__global__ void __launch_bounds__(kSimtThreads, 2)
    lse_bwd_simt_kernel(const T* __restrict__ X, const T* __restrict__ Y,
                        const T* __restrict__ scale_ptr, const Sides<T> sides, int64_t nX,
                        int64_t nY, int64_t d, T* __restrict__ dX,
                        T* __restrict__ dscale_partial) {
  const QuerySide<T> xq = sides.rows, yq = sides.keys;
  const int64_t* __restrict__ y_key_labels = sides.key_labels;
  const int64_t* __restrict__ x_key_labels = sides.row_labels;
  const int64_t x_offset = sides.row_offset;
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
  // Threshold rule (false-negative filtering), each side's own when its pointer is set: the X
  // rows' thresholds and positives (row term), the Y columns' thresholds and positives local
  // to the X block (column term).
  // A template parameter: as a runtime test it pushed the fp32 kSym + LBL instantiation (at the
  // 128-register cap) into spills, also for launches without the rule.
  const bool rthr = THR && MODE != kCol && xq.threshold != nullptr;
  const bool cthr = THR && MODE != kRow && yq.threshold != nullptr;
  __shared__ T sXt[THR ? B : 1];
  __shared__ int64_t sXtp[THR ? B : 1];
  __shared__ T sCt[THR ? B : 1];
  __shared__ int sCtp[THR ? B : 1];

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
  if (rthr && threadIdx.x < B) {
    const int64_t a = row_base + threadIdx.x;
    sXt[threadIdx.x] = a < nX ? xq.threshold[a] : static_cast<T>(INFINITY);
    sXtp[threadIdx.x] = a < nX ? xq.positive[a] : -1;
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
        if (yq.E > 0) x0 = tile_index(yq.exclude[j * yq.E] - x_offset, row_base, B);
        if (yq.E > 1) x1 = tile_index(yq.exclude[j * yq.E + 1] - x_offset, row_base, B);
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
        sQp[threadIdx.x] = jv ? tile_index(yq.positive[j] - x_offset, row_base, B) : -1;
      }
    }
    if (cthr && threadIdx.x < B) {
      const int64_t j = col_base + threadIdx.x;
      sCt[threadIdx.x] = j < nY ? yq.threshold[j] : static_cast<T>(INFINITY);
      sCtp[threadIdx.x] = j < nY ? tile_index(yq.positive[j] - x_offset, row_base, B) : -1;
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
      const int x0 = tile_index(ex[i][0], col_base, B), x1 = tile_index(ex[i][1], col_base, B);
      const int xp = kRowLbl ? tile_index(sXrp[lr], col_base, B) : -1;
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
          // With labels the label rule's local positive is the threshold rule's (one positive
          // per row): reused, it keeps <float, 4, kSym, true, true> from spilling.
          const int xtp = kRowLbl ? xp : tile_index(sXtp[lr], col_base, B);
          if (rthr) ok &= !threshold_dropped(sv * scale, sXt[lr], lc, xtp);
          const T wr = ok ? rg[i] * math_exp(sv * scale - rr[i]) : T(0);
          dsc += wr * sv;
          w = wr;
        }
        if (MODE != kRow) {  // W_ba (V_ba when paired): row b = Y column (query), key a = X row
          bool ok = cok && lr != sCx0[lc] && lr != sCx1[lc];
          if (kColLbl) ok &= !label_excluded(sQL[lc], xkl, lr, sQp[lc]);
          if (cthr) ok &= !threshold_dropped(sv * scale, sCt[lc], lr, kColLbl ? sQp[lc] : sCtp[lc]);
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


}  // namespace
}  // namespace infonce_cuda
