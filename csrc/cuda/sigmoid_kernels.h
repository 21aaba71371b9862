// infonce_kernels — CUDA kernels of the pairwise sigmoid (SigLIP) op (csrc/ops.cpp: _sigmoid_fwd,
// _sigmoid_bwd; docs/design.md, The pairwise sigmoid loss).
//
// Plain C++ launcher API, no torch headers (compiles with plain nvcc, scripts/check_cuda_compile):
// one SigmoidParams struct of raw device pointers and sizes, and a cudaStream_t. The torch binding
// (sigmoid_cuda.cpp) checks the arguments, allocates outputs and workspace, sets the device guard
// and passes the current stream.
//
// Maths: x (M, d) image rows, y (N, d) text rows, t = *scale, b = *bias, l_ij = t <x_i, y_j> + b,
// z_ij = +1 on a positive pair (labels given: row_labels[i] == col_labels[j]; else j - i == offset),
// -1 otherwise.
//   rows_i = sum_j softplus(-z_ij l_ij)
//   G_ij = g_i (sigmoid(l_ij) - [z_ij = 1])          (g = grad, or 1 when grad is nullptr)
//   dx_i = t sum_j G_ij y_j,  dy_j = t sum_i G_ij x_i,  dscale = sum_ij G_ij <x_i, y_j>,  dbias = sum_ij G_ij
// Schedule (no M x N tensor, no atomics, deterministic): a row sweep (CTA = a block of x rows,
// loop over all y) gives rows, dx and per-CTA partials of dscale / dbias; a column sweep (CTA = a
// block of y rows, loop over all x: the same kernel with x and y swapped and the offset negated)
// gives dy. Both sweeps put the output feature dimension in chunks on grid.y; every chunk
// recomputes its S tiles when d exceeds one chunk.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

#include "lse_kernels.h"  // DType, kMaxFeatureDim

namespace infonce_cuda {

// The one parameter struct of the sigmoid launcher. Pointers typed by `dtype`: x, y, dx, dy in the
// input dtype; scale, bias, grad, rows, dscale, dbias float (double for fp64 inputs).
struct SigmoidParams {
  DType dtype = DType::kFloat32;
  const void* x = nullptr;      // (M, d)
  const void* y = nullptr;      // (N, d)
  const void* scale = nullptr;  // one device scalar t
  const void* bias = nullptr;   // one device scalar b
  int64_t M = 0, N = 0, d = 0;
  const int64_t* row_labels = nullptr;  // (M,); both nullptr: positives are j - i == offset
  const int64_t* col_labels = nullptr;  // (N,)
  int64_t offset = 0;
  const void* grad = nullptr;  // (M,) upstream gradient of rows; nullptr: 1 for every row
  // Outputs: rows (nullptr: not wanted); dx, dy, dscale, dbias all set or all nullptr.
  void* rows = nullptr;
  void* dx = nullptr;
  void* dy = nullptr;
  void* dscale = nullptr;
  void* dbias = nullptr;
  void* workspace = nullptr;  // sigmoid_workspace_bytes(p), 256-byte aligned
};

// Bytes of device scratch memory sigmoid_run needs (>= 1): max |g| and the dscale / dbias partials.
size_t sigmoid_workspace_bytes(const SigmoidParams& p);

// Enqueues the sweeps that compute the outputs that are set; returns cudaErrorInvalidValue for an
// inconsistent p (one label pointer, some gradient outputs missing, nothing to compute) and
// otherwise cudaGetLastError() after the launches.
cudaError_t sigmoid_run(const SigmoidParams& p, cudaStream_t stream);

}  // namespace infonce_cuda
