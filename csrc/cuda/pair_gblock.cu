// Launch of CLIP's pair-backward G kernel (pair_gblock_mma.cuh; interface in pair_gblock.h).
#include "pair_gblock_mma.cuh"

namespace infonce_cuda {
namespace {

template <typename Tag, bool VEC>
cudaError_t launch_gblock(const PairGBlockParams& p, int64_t programs, cudaStream_t stream) {
  auto kern = pair_gblock_mma_kernel<Tag, VEC>;
  constexpr size_t smem = pair_gblock_smem();  // 104,448 B: above the default 48 KB
  cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  kern<<<dim3(static_cast<unsigned>(programs)), kMmaThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename Tag>
cudaError_t launch_gblock(const PairGBlockParams& p, int64_t programs, cudaStream_t stream) {
  const bool vec = p.d % 8 == 0 && (reinterpret_cast<uintptr_t>(p.a) & 15u) == 0 &&
                   (reinterpret_cast<uintptr_t>(p.b) & 15u) == 0;
  return vec ? launch_gblock<Tag, true>(p, programs, stream) : launch_gblock<Tag, false>(p, programs, stream);
}

}  // namespace

cudaError_t pair_gblock(const PairGBlockParams& p, cudaStream_t stream) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (p.col_progs < 1 || p.ldg % 2 != 0 || (reinterpret_cast<uintptr_t>(p.gblk) & 3u) != 0) return cudaErrorInvalidValue;
  const int64_t programs = pair_gblock_programs(p);
  if (programs == 0) return cudaSuccess;  // an empty grid is a launch error
  if (programs > 0x7fffffff || p.col_progs > 65536) return cudaErrorInvalidValue;
  return p.dtype == DType::kFloat16 ? launch_gblock<F16Tag>(p, programs, stream)
                                    : launch_gblock<BF16Tag>(p, programs, stream);
}

}  // namespace infonce_cuda
