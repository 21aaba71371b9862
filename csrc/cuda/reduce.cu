// The backward's small reductions: max |g| (the fp16/bf16 normalisation) and the deterministic
// dscale sum (one partial per row-block CTA, summed by a single CTA in a fixed order, in double:
// no atomics anywhere).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "launchers.h"
#include "tile_sizes.cuh"

namespace infonce_cuda {
namespace {


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

}  // namespace

cudaError_t launch_absmax(const float* g, int64_t n, const float* h, int64_t nh, float* out, cudaStream_t stream) {
  absmax_kernel<<<1, kRedThreads, 0, stream>>>(g, n, h, nh, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sum_partials(const T* partial, int64_t n, T* out, cudaStream_t stream) {
  sum_partials_kernel<T><<<1, kRedThreads, 0, stream>>>(partial, n, out);
  return cudaGetLastError();
}

template cudaError_t launch_sum_partials<float>(const float*, int64_t, float*, cudaStream_t);
template cudaError_t launch_sum_partials<double>(const double*, int64_t, double*, cudaStream_t);

}  // namespace infonce_cuda
