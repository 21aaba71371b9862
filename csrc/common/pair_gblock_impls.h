// CLIP's pair-backward G-block op _lse_pair_gblock (schema in csrc/ops.cpp; the schedule around it:
// infonce_kernels/ops/pair_gemm.py). CUDA only: csrc/cuda/pair_gblock_cuda.cpp, built with the
// CUDA sources. Writes G'_ij = (g_r_i exp(l_ij - r_i) + g_t_j exp(l_ij - t_j)) / gmax of the block
// rows [row0, row1) x columns [col0, col1) into gblk and one partial sum of G'_ij <a_i, b_j> per
// program into gs (csrc/cuda/pair_gblock.h).
#pragma once
#include <ATen/ATen.h>

namespace infonce_kernels {

void lse_pair_gblock_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& r,
                          const at::Tensor& t, const at::Tensor& g_r, const at::Tensor& g_t, const at::Tensor& gmax,
                          const at::Tensor& gblk, const at::Tensor& gs, int64_t row0, int64_t row1, int64_t col0,
                          int64_t col1, int64_t col_progs);

}  // namespace infonce_kernels
