// The fp32 / fp64 pairwise sigmoid sweep: plain-FMA tiles (the lse SIMT kernels' machinery,
// simt_kernels.cuh: 16 x 16 threads with TM x TM micro tiles, S over d in chunks of kKC), exact
// in T (ExactMath: exp, division, log1p; no TF32). G goes through shared memory to the second
// product acc += G other[:, chunk], output features in chunks of 16 TM on grid.y. Roles and
// outputs: sigmoid_sweep.cuh. Launched from sigmoid_kernels.cu.
#pragma once

#include "sigmoid_math.cuh"
#include "sigmoid_sweep.cuh"
#include "simt_kernels.cuh"

namespace infonce_cuda {
namespace {

template <typename T, int TM, int KIND, bool LBL>
__global__ void __launch_bounds__(kSimtThreads, 2) sigmoid_sweep_simt_kernel(const Sweep<T> a) {
  constexpr bool kRowSweep = KIND != kColGrad;
  constexpr bool kLoss = KIND == kLossOnly || KIND == kLossGrad;
  constexpr bool kGrad = KIND != kLossOnly;
  constexpr int B = 16 * TM;
  constexpr int DVS = 16 * TM;
  const T* __restrict__ X = static_cast<const T*>(a.own);
  const T* __restrict__ Y = static_cast<const T*>(a.other);
  __shared__ T sX[kKC][B + 1];
  __shared__ T sY[kKC][B + 1];
  __shared__ T sW[kGrad ? B : 1][B + 1];
  __shared__ T sV[kGrad ? B : 1][DVS];
  __shared__ int64_t sOL[LBL ? B : 1];         // labels of the current other tile
  __shared__ int64_t sXL[LBL ? B : 1];         // labels of this CTA's own rows (broadcast reads)
  __shared__ T sCg[kRowSweep ? 1 : B];         // column sweep: g of the other rows
  __shared__ T sRed[2][kSimtThreads / 32];

  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t row_base = int64_t(blockIdx.x) * B;
  const int64_t dv0 = int64_t(blockIdx.y) * DVS;
  const int64_t nX = a.n_own, nY = a.n_other, d = a.d;
  const T t = a.scale[0], b = a.bias[0];

  int64_t row[TM];
  bool rv[TM];
  T rg[TM], loss[TM], gsum[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    row[i] = row_base + ty * TM + i;
    rv[i] = row[i] < nX;
    rg[i] = (kRowSweep && a.g != nullptr) ? (rv[i] ? a.g[row[i]] : T(0)) : T(1);
    loss[i] = gsum[i] = T(0);
  }
  if (LBL && threadIdx.x < B) {
    const int64_t r = row_base + threadIdx.x;
    sXL[threadIdx.x] = r < nX ? a.own_labels[r] : 0;  // rows >= nX are never stored
  }
  T acc[TM][TM];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TM; ++j) acc[i][j] = T(0);

  for (int64_t col_base = 0; col_base < nY; col_base += B) {
    __syncthreads();  // previous tile's sW / sV / column data fully consumed
    if (kGrad) {
      for (int i = threadIdx.x; i < B * DVS; i += kSimtThreads) {
        const int r = i / DVS, c = i % DVS;
        const int64_t gr = col_base + r, gc = dv0 + c;
        sV[r][c] = (gr < nY && gc < d) ? Y[gr * d + gc] : T(0);
      }
    }
    if (threadIdx.x < B) {  // columns >= nY are masked by cvalid / zero rows of sV
      const int64_t j = col_base + threadIdx.x;
      if (LBL) sOL[threadIdx.x] = j < nY ? a.other_labels[j] : 0;
      if (!kRowSweep) sCg[threadIdx.x] = (a.g == nullptr) ? T(1) : (j < nY ? a.g[j] : T(0));
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
    const int delta = tile_delta(a.off, row_base, col_base, B, B);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int lr = ty * TM + i;
      const int64_t xl = LBL ? sXL[lr] : 0;
#pragma unroll
      for (int j = 0; j < TM; ++j) {
        const int lc = tx + 16 * j;
        const bool valid = lc < cvalid;
        const bool pos = LBL ? xl == sOL[lc] : lc == lr + delta;
        const T l = fma(s[i][j], t, b);
        const T ex = ExactMath<T>::exp_neg_abs(l);
        if (kLoss) loss[i] += valid ? softplus_term<ExactMath<T>>(l, pos, ex) : T(0);
        if (kGrad) {
          T w = sigmoid_grad_core<ExactMath<T>>(l, pos, ex);
          if (!kRowSweep) w *= sCg[lc];
          if (kRowSweep) gsum[i] += valid ? w : T(0);
          sW[lr][lc] = w;
        }
      }
    }
    if (kGrad) {
      __syncthreads();
#pragma unroll 4
      for (int c = 0; c < B; ++c) {
        T wv[TM], v[TM];
#pragma unroll
        for (int i = 0; i < TM; ++i) wv[i] = sW[ty * TM + i][c];
#pragma unroll
        for (int j = 0; j < TM; ++j) v[j] = sV[c][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TM; ++j) acc[i][j] = fma(wv[i], v[j], acc[i][j]);
      }
    }
  }

  if (kLoss && blockIdx.y == 0) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      T v = loss[i];
#pragma unroll
      for (int o = 1; o < 16; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (tx == 0 && rv[i]) a.loss[row[i]] = v;
    }
  }
  if (!kGrad) return;

  T dt = T(0), db = T(0);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    if (!rv[i]) continue;
    T* out = static_cast<T*>(a.dout) + row[i] * d;
    T dot = T(0);
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int64_t col = dv0 + tx + 16 * j;
      if (col < d) {
        out[col] = acc[i][j] * t * rg[i];
        if (kRowSweep) dot = fma(X[row[i] * d + col], acc[i][j], dot);
      }
    }
    if (kRowSweep) {
      dt += rg[i] * dot;
      db += rg[i] * gsum[i];
    }
  }
  if (kRowSweep) write_scale_bias_partials<kSimtThreads>(dt, db, sRed, a);
}

}  // namespace
}  // namespace infonce_cuda
