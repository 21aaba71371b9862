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

// The shift of a tile's exponentials, for a new running max m > -inf: m itself, or 0 when the
// logits overflowed to m = +inf. Shifting by +inf would give exp(inf - inf) = NaN; shifting by
// 0 gives l = +inf, so r = +inf, as torch.logsumexp gives. (m = -inf, a row with every key so
// far excluded, is skipped by the callers: l stays 0.)
template <typename T>
__device__ __forceinline__ T lse_shift(T m) {
  return m == static_cast<T>(INFINITY) ? T(0) : m;
}

}  // namespace infonce_cuda
