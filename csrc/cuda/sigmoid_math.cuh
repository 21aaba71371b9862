// The elementwise maths of the pairwise sigmoid kernels, written once for both kernel families.
//
// With a = |l| and e = exp(-a):
//   sigmoid(l) = (l >= 0 ? 1 : e) / (1 + e),   sigmoid(l) - 1 = -(l >= 0 ? e : 1) / (1 + e)
// so G = sigmoid(l) - [pos] needs no subtraction near 1, and
//   softplus(-z l) = max(-z l, 0) + log1p(e),   max(-z l, 0) = ((l >= 0) != pos) ? a : 0.
// FastMath (fp16 / bf16 tensor-core path, fp32 arithmetic): e by one ex2.approx.ftz, 1 / (1 + e) by
// one rcp.approx.ftz, log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3, as an odd series to s^13 (below
// fp32 rounding; one approximate division). ExactMath<T> (fp32 / fp64 SIMT path): the library's
// exp, division and log1p in T.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace infonce_cuda {

constexpr float kSigLog2e = 1.4426950408889634f;

struct FastMath {
  static __device__ __forceinline__ float exp_neg_abs(float l) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(-fabsf(l) * kSigLog2e));
    return y;
  }
  static __device__ __forceinline__ float rcp(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }
  static __device__ __forceinline__ float log1p_small(float e) {
    const float s = __fdividef(e, 2.f + e);
    const float q = s * s;
    float p = 1.f / 13.f;
    p = fmaf(p, q, 1.f / 11.f);
    p = fmaf(p, q, 1.f / 9.f);
    p = fmaf(p, q, 1.f / 7.f);
    p = fmaf(p, q, 1.f / 5.f);
    p = fmaf(p, q, 1.f / 3.f);
    p = fmaf(p, q, 1.f);
    return 2.f * s * p;
  }
};

template <typename T>
struct ExactMath {
  static __device__ __forceinline__ T exp_neg_abs(T l) { return exp(-fabs(l)); }
  static __device__ __forceinline__ T rcp(T x) { return T(1) / x; }
  static __device__ __forceinline__ T log1p_small(T e) { return log1p(e); }
};

// G / g = sigmoid(l) - [pos], from e = exp(-|l|).
template <typename Math, typename T>
__device__ __forceinline__ T sigmoid_grad_core(T l, bool pos, T e) {
  const T num = ((l >= T(0)) != pos) ? T(1) : e;
  return (pos ? -num : num) * Math::rcp(T(1) + e);
}

// softplus(-z l), from e = exp(-|l|).
template <typename Math, typename T>
__device__ __forceinline__ T softplus_term(T l, bool pos, T e) {
  return (((l >= T(0)) != pos) ? fabs(l) : T(0)) + Math::log1p_small(e);
}

// The positive test of the offset rule on tile-local indices: a pair is positive when
// j - i == offset, i.e. (local column) == (local row) + delta with delta = offset + row_base -
// col_base, clamped so that an int holds it (out of [-rows, cols] it matches nothing).
__device__ __forceinline__ int tile_delta(int64_t offset, int64_t row_base, int64_t col_base, int rows, int cols) {
  const int64_t v = offset + row_base - col_base;
  return v < -rows ? -2 * rows - 2 : (v > cols ? 2 * cols + 2 : static_cast<int>(v));
}

// A 16-bit element of x / y (raw bits) as float.
__device__ __forceinline__ float bits_to_float(uint16_t v, __half) { return __half2float(__ushort_as_half(v)); }
__device__ __forceinline__ float bits_to_float(uint16_t v, __nv_bfloat16) {
  return __bfloat162float(__ushort_as_bfloat16(v));
}

}  // namespace infonce_cuda
