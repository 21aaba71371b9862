// Launch of CLIP's pair-backward G kernel (pair_gblock_mma.cuh; interface in pair_gblock.h).
#include "pair_gblock_mma.cuh"

namespace infonce_cuda {
namespace {

template <typename Tag>
cudaError_t launch_gblock(const GBlockArgs& g, int64_t programs, cudaStream_t stream) {
  auto kern = pair_gblock_mma_kernel<Tag>;
  constexpr size_t smem = pair_gblock_smem();  // 104,448 B: above the default 48 KB
  cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  kern<<<dim3(static_cast<unsigned>(programs)), kMmaThreads, smem, stream>>>(g);
  return cudaGetLastError();
}

}  // namespace

cudaError_t pair_gblock(const PairGBlockParams& p, cudaStream_t stream) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (p.col_progs < 1 || p.ldg % 2 != 0 || (reinterpret_cast<uintptr_t>(p.gblk) & 3u) != 0) return cudaErrorInvalidValue;
  const int64_t programs = pair_gblock_programs(p);
  if (programs == 0) return cudaSuccess;  // an empty grid is a launch error
  if (programs > 0x7fffffff) return cudaErrorInvalidValue;
  GBlockArgs g;
  g.A = static_cast<const uint16_t*>(p.a);
  g.B = static_cast<const uint16_t*>(p.b);
  g.scale = p.scale;
  g.r = p.r;
  g.t = p.t;
  g.g_r = p.g_r;
  g.g_t = p.g_t;
  g.gmax = p.gmax;
  g.G = static_cast<uint32_t*>(p.gblk);
  g.ldg = p.ldg;
  g.gs = p.gs;
  g.row0 = p.row0;
  g.row1 = p.row1;
  g.col0 = p.col0;
  g.col1 = p.col1;
  g.d = p.d;
  g.col_progs = static_cast<int>(p.col_progs);
  g.vec = p.d % 8 == 0 && (reinterpret_cast<uintptr_t>(p.a) & 15u) == 0 && (reinterpret_cast<uintptr_t>(p.b) & 15u) == 0;
  return p.dtype == DType::kFloat16 ? launch_gblock<F16Tag>(g, programs, stream)
                                    : launch_gblock<BF16Tag>(g, programs, stream);
}

}  // namespace infonce_cuda
