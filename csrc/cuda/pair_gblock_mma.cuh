// The G kernel of CLIP's pair backward (pair_gblock.h has the maths and the block interface):
// fp16 / bf16 on tensor cores through mma.sync.m16n8k16 (sm_80+), with the tile machinery of the
// lse kernels (mma_kernels.cuh: ldmatrix from padded shared memory, cp.async tiles, mma_qk).
//
// CTA = 4 warps over kGBM = 128 rows of the block (32 rows per warp, two m16 tiles: every B
// fragment read from shared memory serves both), column tiles of kGBN = 64. S = A B^T over all of
// d once per tile: the stream of (column tile, feature chunk of kDK) stages runs kStages = 2 deep
// (stage t in buffer t % 2: wait + barrier, issue stage t + 1's cp.async copies, multiply stage
// t), so each copy overlaps the previous stage's product; the loops are column tiles (outer) x
// chunks (inner), the shape the kernel report counts (inner loop x ceil(d / kDK)). After a tile's last chunk, per element
// (log2 domain, c2 = s log2(e), r2 = r log2(e), t2 = t log2(e)):
//   P = ex2(S c2 - r2_i),  Q = ex2(S c2 - t2_j)            (one FFMA + one MUFU.EX2 each)
//   G' = (g_r_i / gm) P + (g_t_j / gm) Q                    (FMUL + FFMA)
//   G' = 0 outside the block (rows >= row1, columns >= col1: one select), sum += G' S,
// and G' is stored in the input dtype, two columns per 32-bit store, unmasked (the block's
// buffer has room for whole tiles). The column data (t2, g_t / gm) of the next tile is written
// to shared memory by tile parity after the current tile's last barrier and published by the
// next tile's first barrier.
// Launched from pair_gblock.cu.
#pragma once

#include "mma_kernels.cuh"
#include "pair_gblock.h"

namespace infonce_cuda {
namespace {

constexpr float kLog2eG = 1.4426950408889634f;
constexpr int kGRows = 4;  // rows per thread: two m16 tiles x (gq, gq + 8)
constexpr size_t pair_gblock_smem() { return size_t(kStages) * (kGBM + kGBN) * kLds * sizeof(uint16_t); }

// VEC: d % 8 == 0 and 16-byte aligned a, b: cp.async tile loads (load_tile16's vector path, the
// element-wise one compiled out); else element loads.
template <typename Tag, bool VEC>
__global__ void __launch_bounds__(kMmaThreads, 1) pair_gblock_mma_kernel(const PairGBlockParams a) {
  const uint16_t* __restrict__ A = static_cast<const uint16_t*>(a.a);
  const uint16_t* __restrict__ B = static_cast<const uint16_t*>(a.b);
  extern __shared__ __align__(16) uint16_t smem16[];
  uint16_t* sX = smem16;                           // kStages x (kGBM x kLds)
  uint16_t* sY = smem16 + kStages * kGBM * kLds;   // kStages x (kGBN x kLds)
  __shared__ __align__(8) float sCT[2][kGBN];      // t2 of the tile's columns, by tile parity
  __shared__ __align__(8) float sCG[2][kGBN];      // g_t / gm, by tile parity
  __shared__ float sRed[kMmaThreads / 32];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int col_progs = static_cast<int>(a.col_progs);  // <= 65536 (the binding's check)
  const int rb = static_cast<int>(blockIdx.x / unsigned(col_progs)), cp = static_cast<int>(blockIdx.x % unsigned(col_progs));
  const int64_t row_base = a.row0 + int64_t(rb) * kGBM;
  const float inv_gm = 1.f / __ldg(a.gmax);
  const float c2 = __ldg(a.scale) * kLog2eG;
  const int nchunks = static_cast<int>((a.d + kDK - 1) / kDK);
  const int64_t ctiles = (a.col1 - a.col0 + kGBN - 1) / kGBN;
  const int ntiles = cp < ctiles ? static_cast<int>((ctiles - cp + col_progs - 1) / col_progs) : 0;
  const int64_t tile_step = int64_t(col_progs) * kGBN;

  // this thread's rows: r = 2 mt + h -> row 32 warp + 16 mt + gq + 8 h of the CTA
  bool rv[kGRows];
  float r2[kGRows], gr[kGRows];
  uint32_t* gp[kGRows];
#pragma unroll
  for (int r = 0; r < kGRows; ++r) {
    const int lr = warp * 32 + (r >> 1) * 16 + gq + 8 * (r & 1);
    const int64_t row = row_base + lr;
    rv[r] = row < a.row1;
    r2[r] = rv[r] ? __ldg(a.r + row) * kLog2eG : 0.f;
    gr[r] = rv[r] ? __ldg(a.g_r + row) * inv_gm : 0.f;
    gp[r] = static_cast<uint32_t*>(a.gblk) + ((row - a.row0) * a.ldg) / 2 + tq;  // the buffer as 16-bit pairs
  }

  // column data of tile k into parity k & 1 (threads < kGBN, one column each)
  auto column_data = [&](int k) {
    if (threadIdx.x < kGBN) {
      const int64_t j = a.col0 + (int64_t(cp) + int64_t(k) * col_progs) * kGBN + threadIdx.x;
      const bool in = j < a.col1;
      sCT[k & 1][threadIdx.x] = in ? __ldg(a.t + j) * kLog2eG : 0.f;
      sCG[k & 1][threadIdx.x] = in ? __ldg(a.g_t + j) * inv_gm : 0.f;
    }
  };
  // the copies of stage (tile k, chunk c) into buffer `buf`
  auto load_stage = [&](int k, int c, int buf) {
    const int64_t col = a.col0 + (int64_t(cp) + int64_t(k) * col_progs) * kGBN;
    load_tile16<kGBM>(sX + buf * kGBM * kLds, A, row_base, a.row1, int64_t(c) * kDK, a.d, VEC);
    load_tile16<kGBN>(sY + buf * kGBN * kLds, B, col, a.col1, int64_t(c) * kDK, a.d, VEC);
  };

  float gsum = 0.f;
  float s[2][8][4];
  if (ntiles > 0) {
    column_data(0);
    load_stage(0, 0, 0);
    cp_async_commit();
  }
  int buf = 0;
  int64_t col = a.col0 + int64_t(cp) * kGBN;
  for (int k = 0; k < ntiles; ++k, col += tile_step) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
    for (int c = 0; c < nchunks; ++c, buf ^= 1) {
      cp_async_wait_all();
      __syncthreads();  // this stage landed and is visible; every warp is done with buffer buf ^ 1
      const bool last = c + 1 == nchunks;  // the next stage: this tile's next chunk, or the next tile's first
      if (!last || k + 1 < ntiles) load_stage(last ? k + 1 : k, last ? 0 : c + 1, buf ^ 1);
      cp_async_commit();
      const int kvalid = static_cast<int>(a.d - int64_t(c) * kDK < kDK ? a.d - int64_t(c) * kDK : kDK);
      mma_qk<Tag, 2>(s, sX + buf * kGBM * kLds, sY + buf * kGBN * kLds, warp, lane, kvalid);
    }

    if (k + 1 < ntiles) column_data(k + 1);  // parity (k+1)&1: last read by tile k-1, before the barrier above
    const int cvalid = static_cast<int>(a.col1 - col < kGBN ? a.col1 - col : kGBN);
    const int64_t gcol = (col - a.col0) / 2;  // the tile's first column, in 32-bit pairs
    uint32_t m[kGRows];  // bit 2 nt + e: (row r, column nt * 8 + 2 tq + e of the tile) is in the block
#pragma unroll
    for (int r = 0; r < kGRows; ++r) {
      m[r] = 0u;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) m[r] |= uint32_t(rv[r] && nt * 8 + 2 * tq + e < cvalid) << (2 * nt + e);
    }
    // column by column (8 columns per n-tile, this thread's two), the column data read once for
    // the 4 rows (few registers live beside the 64 accumulators)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const float2 ct = *reinterpret_cast<const float2*>(&sCT[k & 1][nt * 8 + 2 * tq]);
      const float2 cg = *reinterpret_cast<const float2*>(&sCG[k & 1][nt * 8 + 2 * tq]);
#pragma unroll
      for (int r = 0; r < kGRows; ++r) {
        float w[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float sv = s[r >> 1][nt][2 * (r & 1) + e];
          const float p = fast_exp2(fmaf(sv, c2, -r2[r]));
          const float q = fast_exp2(fmaf(sv, c2, -(e ? ct.y : ct.x)));
          const float v = fmaf(gr[r], p, (e ? cg.y : cg.x) * q);
          w[e] = (m[r] >> (2 * nt + e)) & 1u ? v : 0.f;  // a padded row / column's exp may be inf
          gsum = fmaf(w[e], sv, gsum);
        }
        gp[r][gcol + nt * 4] = Tag::pack(w[0], w[1]);
      }
    }
  }

  // the program's partial of sum G' S: warp shuffles, then the 4 warps in a fixed order
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) gsum += __shfl_xor_sync(0xffffffffu, gsum, o);
  if (lane == 0) sRed[warp] = gsum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kMmaThreads / 32; ++w) v += sRed[w];
    a.gs[blockIdx.x] = v;
  }
}

}  // namespace
}  // namespace infonce_cuda
