// infonce_kernels — CUDA binding of _lse_pair_gblock (schema in csrc/ops.cpp, the kernel's
// interface in pair_gblock.h): check the arguments (ValueError / TypeError naming the argument),
// set the device guard, launch on the current stream.
#include "../common/pair_gblock_impls.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "pair_gblock.h"

namespace infonce_kernels {
namespace {

constexpr const char* kOp = "infonce_kernels::_lse_pair_gblock (cuda)";

void check_vector(const at::Tensor& v, const char* name, int64_t n, const at::Tensor& a) {
  TORCH_CHECK_TYPE(v.scalar_type() == at::kFloat, kOp, ": ", name, " must be float32, got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.device() == a.device(), kOp, ": ", name, " must be on ", a.device(), ", got ", v.device());
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == n && v.is_contiguous(), kOp, ": ", name,
                    " must be a contiguous vector of ", n, " elements, got shape ", v.sizes());
}

void check_scalar(const at::Tensor& v, const char* name, const at::Tensor& a) {
  TORCH_CHECK_TYPE(v.scalar_type() == at::kFloat, kOp, ": ", name, " must be float32, got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.device() == a.device(), kOp, ": ", name, " must be on ", a.device(), ", got ", v.device());
  TORCH_CHECK_VALUE(v.dim() == 0, kOp, ": ", name, " must be 0-d, got shape ", v.sizes());
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace

void lse_pair_gblock_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& r,
                          const at::Tensor& t, const at::Tensor& g_r, const at::Tensor& g_t, const at::Tensor& gmax,
                          const at::Tensor& gblk, const at::Tensor& gs, int64_t row0, int64_t row1, int64_t col0,
                          int64_t col1, int64_t col_progs) {
  TORCH_CHECK_VALUE(a.is_cuda(), kOp, ": a must be a CUDA tensor, got device ", a.device());
  TORCH_CHECK_TYPE(a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16, kOp,
                   ": a must be float16 or bfloat16, got ", a.scalar_type());
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type() && gblk.scalar_type() == a.scalar_type(), kOp,
                   ": b and gblk must have a's dtype ", a.scalar_type(), ", got ", b.scalar_type(), " and ",
                   gblk.scalar_type());
  TORCH_CHECK_VALUE(b.device() == a.device() && gblk.device() == a.device(), kOp, ": b and gblk must be on ", a.device());
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), kOp,
                    ": a (M, d) and b (N, d) must be matrices of one feature dimension, got ", a.sizes(), " and ",
                    b.sizes());
  TORCH_CHECK_VALUE(a.is_contiguous() && b.is_contiguous(), kOp, ": a and b must be contiguous");
  const int64_t M = a.size(0), N = b.size(0), d = a.size(1);
  TORCH_CHECK_VALUE(d >= 1 && d <= infonce_cuda::kMaxFeatureDim, kOp, ": feature dimension d = ", d,
                    " outside [1, ", infonce_cuda::kMaxFeatureDim, "]");
  check_scalar(scale, "scale", a);
  check_scalar(gmax, "gmax", a);
  check_vector(r, "r", M, a);
  check_vector(g_r, "g_r", M, a);
  check_vector(t, "t", N, a);
  check_vector(g_t, "g_t", N, a);
  TORCH_CHECK_VALUE(0 <= row0 && row0 <= row1 && row1 <= M, kOp, ": rows [row0, row1) = [", row0, ", ", row1,
                    ") must lie in [0, M = ", M, "]");
  TORCH_CHECK_VALUE(0 <= col0 && col0 <= col1 && col1 <= N, kOp, ": columns [col0, col1) = [", col0, ", ", col1,
                    ") must lie in [0, N = ", N, "]");
  TORCH_CHECK_VALUE(col_progs >= 1 && col_progs <= 65536, kOp, ": col_progs must be in [1, 65536], got ", col_progs);
  // the kernel writes whole tiles, unmasked, two columns per 32-bit store
  TORCH_CHECK_VALUE(gblk.dim() == 2 && gblk.stride(1) == 1 && gblk.stride(0) % 2 == 0 &&
                        gblk.stride(0) >= gblk.size(1) && reinterpret_cast<uintptr_t>(gblk.data_ptr()) % 4 == 0,
                    kOp, ": gblk must be a row-major matrix with an even row stride and a 4-byte aligned start, got "
                    "strides ", gblk.strides());
  TORCH_CHECK_VALUE(gblk.size(0) >= round_up(row1 - row0, infonce_cuda::kGBM) &&
                        gblk.size(1) >= round_up(col1 - col0, infonce_cuda::kGBN),
                    kOp, ": gblk ", gblk.sizes(), " must hold the block rounded up to whole ", infonce_cuda::kGBM, " x ",
                    infonce_cuda::kGBN, " tiles (", round_up(row1 - row0, infonce_cuda::kGBM), " x ",
                    round_up(col1 - col0, infonce_cuda::kGBN), ")");
  infonce_cuda::PairGBlockParams p;
  p.dtype = a.scalar_type() == at::kHalf ? infonce_cuda::DType::kFloat16 : infonce_cuda::DType::kBFloat16;
  p.row0 = row0;
  p.row1 = row1;
  p.col0 = col0;
  p.col1 = col1;
  p.col_progs = col_progs;
  const int64_t programs = infonce_cuda::pair_gblock_programs(p);
  TORCH_CHECK_VALUE(programs <= 0x7fffffff, kOp, ": ", programs, " programs exceed the grid limit 2^31 - 1");
  TORCH_CHECK_TYPE(gs.scalar_type() == at::kFloat, kOp, ": gs must be float32, got ", gs.scalar_type());
  TORCH_CHECK_VALUE(gs.device() == a.device() && gs.is_contiguous() && gs.numel() >= programs, kOp,
                    ": gs must be a contiguous float32 tensor on ", a.device(), " with room for ", programs,
                    " partial sums, got ", gs.numel());
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.scale = scale.data_ptr<float>();
  p.r = r.data_ptr<float>();
  p.t = t.data_ptr<float>();
  p.g_r = g_r.data_ptr<float>();
  p.g_t = g_t.data_ptr<float>();
  p.gmax = gmax.data_ptr<float>();
  p.M = M;
  p.N = N;
  p.d = d;
  p.gblk = gblk.data_ptr();
  p.ldg = gblk.stride(0);
  p.gs = gs.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(a.device());
  C10_CUDA_CHECK(infonce_cuda::pair_gblock(p, c10::cuda::getCurrentCUDAStream(a.get_device()).stream()));
}

}  // namespace infonce_kernels
