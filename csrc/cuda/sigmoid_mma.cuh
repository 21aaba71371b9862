// The fp16 / bf16 pairwise sigmoid sweep: tensor cores through mma.sync.m16n8k16 (sm_80+), the
// tile machinery of the lse kernels (mma_kernels.cuh: 64-row CTAs of 4 warps, 16 rows per warp,
// 64-column tiles, S = own other^T over d in chunks of kDK = 128, output features in chunks of
// kDV = 128 on grid.y). Per tile: S in fp32 accumulators -> l = t S + b (one FMA) -> loss terms
// (FastMath: one ex2 and the log1p series, one approximate division) and G' in place of S (one
// ex2 + one rcp) -> acc += G' other[:, chunk] with the second mma, G' in the input dtype (as
// flash-attention's P).
// G' = sigmoid(l) - [pos] in [-1, 1] in the row sweep (g_i applied per row at the end); in the
// column sweep G' = (g_i / max|g|) (sigmoid(l) - [pos]), so fp16 never sees g ~ 1/M subnormals.
// Launched from sigmoid_kernels.cu.
#pragma once

#include "mma_kernels.cuh"
#include "sigmoid_math.cuh"
#include "sigmoid_sweep.cuh"

namespace infonce_cuda {
namespace {

template <typename Tag, int KIND, bool LBL>
__global__ void __launch_bounds__(kMmaThreads, 2) sigmoid_sweep_mma_kernel(const Sweep<float> a) {
  constexpr bool kRowSweep = KIND != kColGrad;
  constexpr bool kLoss = KIND == kLossOnly || KIND == kLossGrad;
  constexpr bool kGrad = KIND != kLossOnly;
  const uint16_t* __restrict__ X = static_cast<const uint16_t*>(a.own);
  const uint16_t* __restrict__ Y = static_cast<const uint16_t*>(a.other);
  extern __shared__ __align__(16) uint16_t smem16[];
  uint16_t* sX = smem16;
  uint16_t* sY = smem16 + kTileElems;
  uint16_t* sV = smem16 + 2 * kTileElems;   // only allocated (and used) when d > kDK
  __shared__ int64_t sOL[LBL ? kBN : 1];     // labels of the current other tile
  __shared__ int64_t sXL[LBL ? kBM : 1];     // labels of this CTA's own rows (not in registers:
                                             // the fused kLossGrad kind has none to spare)
  __shared__ float sCg[kRowSweep ? 1 : kBN];  // column sweep: g of the other rows / max|g|
  __shared__ float sRed[2][kMmaThreads / 32];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int64_t row_base = int64_t(blockIdx.x) * kBM;
  const int64_t dv0 = int64_t(blockIdx.y) * kDV;
  const int64_t nX = a.n_own, nY = a.n_other, d = a.d;
  const int dv_valid = static_cast<int>(d - dv0 < kDV ? d - dv0 : kDV);
  const float t = __ldg(a.scale), b = __ldg(a.bias);
  float gmax = 1.f;
  if (!kRowSweep && a.gmax != nullptr) gmax = __ldg(a.gmax);
  const float inv_gmax = gmax > 0.f ? 1.f / gmax : 0.f;

  int64_t row[2];
  bool rv[2];
  int lr[2];
  float rg[2] = {1.f, 1.f};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    lr[h] = warp * 16 + gq + 8 * h;
    row[h] = row_base + lr[h];
    rv[h] = row[h] < nX;
    if (kRowSweep && a.g != nullptr) rg[h] = rv[h] ? a.g[row[h]] : 0.f;
  }

  if (LBL && threadIdx.x < kBM) {  // rows >= nX are never stored: any value will do
    const int64_t r = row_base + threadIdx.x;
    sXL[threadIdx.x] = r < nX ? a.own_labels[r] : 0;
  }

  float acc[kGrad ? 16 : 1][4];
#pragma unroll
  for (int vt = 0; vt < (kGrad ? 16 : 1); ++vt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[vt][e] = 0.f;
  float loss[2] = {0.f, 0.f}, gsum[2] = {0.f, 0.f};

  const int nchunks = static_cast<int>((d + kDK - 1) / kDK);
  const bool x_resident = nchunks == 1;
  const bool need_v = kGrad && nchunks > 1;  // else the single other tile holds the output chunk
  if (x_resident) load_tile16<kBM>(sX, X, row_base, nX, 0, d, a.vec);
  const uint16_t* pv_base = (need_v ? sV : sY) + ((lane & 7) + ((lane >> 3) & 1) * 8) * kLds + (lane >> 4) * 8;

  for (int64_t col_base = 0; col_base < nY; col_base += kBN) {
    __syncthreads();  // everyone is done with the previous tile's shared data
    if (need_v) load_tile16<kBN>(sV, Y, col_base, nY, dv0, d, a.vec);
    if (threadIdx.x < kBN) {  // columns >= nY are masked by cvalid: any value will do
      const int64_t j = col_base + threadIdx.x;
      if (LBL) sOL[threadIdx.x] = j < nY ? a.other_labels[j] : 0;
      if (!kRowSweep) sCg[threadIdx.x] = (a.g == nullptr) ? 1.f : (j < nY ? a.g[j] * inv_gmax : 0.f);
    }
    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    for (int c = 0; c < nchunks; ++c) {
      if (c > 0) __syncthreads();
      if (!x_resident) load_tile16<kBM>(sX, X, row_base, nX, int64_t(c) * kDK, d, a.vec);
      load_tile16<kBN>(sY, Y, col_base, nY, int64_t(c) * kDK, d, a.vec);
      // the vectorised loads are cp.async: complete every outstanding copy (sX, sV, sY) first
      cp_async_commit();
      cp_async_wait_all();
      __syncthreads();  // also publishes sV, sOL, sCg
      const int kvalid = static_cast<int>(d - int64_t(c) * kDK < kDK ? d - int64_t(c) * kDK : kDK);
      // one m16 tile per warp (16 of the CTA's 64 rows): mma_qk's MT = 1 accumulator view of s
      mma_qk<Tag, 1>(*reinterpret_cast<float(*)[1][8][4]>(&s), sX, sY, warp, lane, kvalid);
    }

    const int cvalid = static_cast<int>(nY - col_base < kBN ? nY - col_base : kBN);
    const int delta = tile_delta(a.off, row_base, col_base, kBM, kBN);
    // The positive rule as one 16-bit mask per row (bit 2 nt + e = this lane's column nt*8 + 2tq + e):
    // each other label is read from shared memory once and consumed at once for both rows (testing
    // sOL inside the elementwise loop kept the 16 labels live and ptxas spilled, as in the lse
    // forward).
    uint32_t pmask[2] = {0u, 0u};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int lc = nt * 8 + 2 * tq + e;
        const int64_t olc = LBL ? sOL[lc] : 0;
#pragma unroll
        for (int h = 0; h < 2; ++h)
          pmask[h] |= uint32_t(LBL ? sXL[lr[h]] == olc : lc == lr[h] + delta) << (2 * nt + e);
      }
    // Loss terms, then G' in place of S. Two passes over the registers when both are wanted (the
    // fused kind recomputes l and e: one more FMA and ex2 per element): interleaved, the two
    // kept too many temporaries live and ptxas spilled with the label rule.
    if (kLoss) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int lc = nt * 8 + 2 * tq + e;
            const bool pos = (pmask[h] >> (2 * nt + e)) & 1u;
            const float l = fmaf(s[nt][2 * h + e], t, b);
            const float sp = softplus_term<FastMath>(l, pos, FastMath::exp_neg_abs(l));
            loss[h] += lc < cvalid ? sp : 0.f;
          }
    }
    if (kGrad) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int lc = nt * 8 + 2 * tq + e;
            const bool pos = (pmask[h] >> (2 * nt + e)) & 1u;
            const float l = fmaf(s[nt][2 * h + e], t, b);
            float w = sigmoid_grad_core<FastMath>(l, pos, FastMath::exp_neg_abs(l));
            if (!kRowSweep) w *= sCg[lc];
            if (kRowSweep) gsum[h] += lc < cvalid ? w : 0.f;
            s[nt][2 * h + e] = w;  // rows of other beyond nY are zero in the tile: w multiplies 0
          }
    }

    if (kGrad) {
      // acc += G'(16 x 64) * V(64 x 128): A fragments straight from the S accumulators
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t af[4];
        af[0] = Tag::pack(s[2 * kk][0], s[2 * kk][1]);
        af[1] = Tag::pack(s[2 * kk][2], s[2 * kk][3]);
        af[2] = Tag::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        af[3] = Tag::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int vp = 0; vp < kDV / 16; ++vp) {
          if (vp * 16 < dv_valid) {
            uint32_t b0, b1, b2, b3;
            ldsm_x4_trans(b0, b1, b2, b3, pv_base + kk * 16 * kLds + vp * 16);
            Tag::mma(acc[2 * vp], af, b0, b1);
            Tag::mma(acc[2 * vp + 1], af, b2, b3);
          }
        }
      }
    }
  }

  if (kLoss && blockIdx.y == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v = loss[h];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      if (tq == 0 && rv[h]) a.loss[row[h]] = v;
    }
  }
  if (!kGrad) return;

  // dout = t * (row factor) * acc; the row sweep also forms its dscale / dbias partials:
  // dscale = sum_i g_i <x_i, acc_i> over this chunk's features, dbias = sum_i g_i sum_j G'_ij.
  float dt = 0.f, db = 0.f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!rv[h]) continue;
    const float f = kRowSweep ? t * rg[h] : t * gmax;
    typename Tag::T* out = static_cast<typename Tag::T*>(a.dout) + row[h] * d + dv0;
    const uint16_t* xr = X + row[h] * d + dv0;
    float dot = 0.f;
#pragma unroll
    for (int vt = 0; vt < 16; ++vt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = vt * 8 + 2 * tq + e;
        if (col < dv_valid) {
          out[col] = Tag::from_float(acc[vt][2 * h + e] * f);
          if (kRowSweep) dot = fmaf(bits_to_float(xr[col], typename Tag::T()), acc[vt][2 * h + e], dot);
        }
      }
    if (kRowSweep) {
      dt += rg[h] * dot;
      db += rg[h] * gsum[h];
    }
  }
  if (kRowSweep) write_scale_bias_partials<kMmaThreads>(dt, db, sRed, a);
}

}  // namespace
}  // namespace infonce_cuda
