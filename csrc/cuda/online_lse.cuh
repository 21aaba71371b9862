// The online (streaming) log-sum-exp of the forward kernels: per row a running max m and a
// running sum l of exp(L - m) over the key tiles seen so far; r = m + log(l) at the end
// (docs/design.md, The primitive). The fp16/bf16 kernels work in the log2 domain (exp2f,
// x = S * s * log2(e), r = ln(2) * (m + log2(l))), the fp32/fp64 ones in the natural log.
#pragma once

#include <cmath>

namespace infonce_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float math_exp(float x) { return expf(x); }
__device__ __forceinline__ double math_exp(double x) { return exp(x); }
__device__ __forceinline__ float math_log(float x) { return logf(x); }
__device__ __forceinline__ double math_log(double x) { return log(x); }

// 2^x through the SFU alone (one MUFU.EX2): the tensor-core (fp16 / bf16) kernels only. exp2f
// without --use_fast_math is the same MUFU.EX2 wrapped in a range fix-up for results below
// 2^-126 (FSETP + 2 predicated FMUL); .ftz flushes those to 0 instead. Every exponential of
// these kernels is of x - (running max) <= 0 or of L - r <= 0 (P <= 1, summed in fp32 against a
// term >= 1, or rounded to fp16 / bf16 for the second product), so a flushed 2^-126 is far below
// the fp32 rounding of the sums it joins. ex2.approx(-inf) = +0, ex2.approx(+inf) = +inf,
// NaN -> NaN. The fp32 / fp64 SIMT kernels keep the exact math_exp above.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The shift of a tile's exponentials, for a new running max m > -inf: m itself, or 0 when the
// logits overflowed to m = +inf. Shifting by +inf would give exp(inf - inf) = NaN; shifting by
// 0 gives l = +inf, so r = +inf, as torch.logsumexp gives. (m = -inf, a row with every key so
// far excluded, is skipped by the callers: l stays 0.)
template <typename T>
__device__ __forceinline__ T lse_shift(T m) {
  return m == static_cast<T>(INFINITY) ? T(0) : m;
}

}  // namespace infonce_cuda
