// infonce_kernels — CUDA implementation of the ops defined in csrc/ops.cpp:
//   lse_fwd(Tensor q, Tensor k, Tensor scale, Tensor exclude, bool symmetric) -> Tensor
//   lse_bwd(Tensor grad, Tensor q, Tensor k, Tensor scale, Tensor exclude, bool symmetric,
//           Tensor lse) -> (Tensor, Tensor, Tensor)
// Thin binding: validate (every message names the argument), allocate outputs and workspace,
// set the device guard, launch the torch-free kernels (lse_kernels.cu) on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "lse_kernels.h"

namespace {

infonce_cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return infonce_cuda::DType::kFloat16;
    case at::kBFloat16: return infonce_cuda::DType::kBFloat16;
    case at::kFloat: return infonce_cuda::DType::kFloat32;
    case at::kDouble: return infonce_cuda::DType::kFloat64;
    default: TORCH_CHECK(false, "infonce_kernels (cuda): unsupported q dtype ", t);
  }
}

// dtype of scale, lse and grad: float64 for float64 inputs, else float32.
at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& q, const char* op) {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on the same device as q (",
              q.device(), "), got ", t.device());
}

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& scale, const at::Tensor& exclude, bool symmetric) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", q.device());
  check_same_device(k, "k", q, op);
  check_same_device(scale, "scale", q, op);
  check_same_device(exclude, "exclude", q, op);
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble, op,
              ": q must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt, op, ": k must have q's dtype ", dt, ", got ",
              k.scalar_type());
  TORCH_CHECK(q.dim() == 2, op, ": q must be 2-D (M, d), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 2, op, ": k must be 2-D (N, d), got shape ", k.sizes());
  TORCH_CHECK(q.size(0) >= 1 && q.size(1) >= 1, op, ": q must have M >= 1 and d >= 1, got shape ",
              q.sizes());
  TORCH_CHECK(k.size(0) >= 1, op, ": k must have N >= 1 rows, got shape ", k.sizes());
  TORCH_CHECK(k.size(1) == q.size(1), op, ": k must have q's feature dimension d = ", q.size(1),
              ", got shape ", k.sizes());
  TORCH_CHECK(q.size(1) <= infonce_cuda::kMaxFeatureDim, op, ": q's feature dimension d = ",
              q.size(1), " exceeds the cuda backend's limit ", infonce_cuda::kMaxFeatureDim);
  TORCH_CHECK(q.is_contiguous(), op, ": q must be contiguous");
  TORCH_CHECK(k.is_contiguous(), op, ": k must be contiguous");
  if (symmetric) {
    // k is q: the kernels read only q.
    TORCH_CHECK(k.sizes() == q.sizes(), op, ": symmetric=True needs k to be q (same shape ",
                q.sizes(), "), got k of shape ", k.sizes());
  }
  TORCH_CHECK(scale.dim() == 0, op, ": scale must be a 0-d tensor, got shape ", scale.sizes());
  TORCH_CHECK(scale.scalar_type() == acc_dtype(dt), op, ": scale must be ", acc_dtype(dt),
              " for q of dtype ", dt, ", got ", scale.scalar_type());
  TORCH_CHECK(exclude.dim() == 2 && exclude.size(0) == q.size(0) && exclude.size(1) <= 2, op,
              ": exclude must have shape (M, E) with M = ", q.size(0), " and E <= 2, got ",
              exclude.sizes());
  TORCH_CHECK(exclude.scalar_type() == at::kLong, op, ": exclude must be int64, got ",
              exclude.scalar_type());
  TORCH_CHECK(exclude.is_contiguous(), op, ": exclude must be contiguous");
}

const int64_t* exclude_ptr(const at::Tensor& exclude) {
  return exclude.numel() > 0 ? exclude.data_ptr<int64_t>() : nullptr;
}

at::Tensor lse_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                        const at::Tensor& exclude, bool symmetric) {
  constexpr const char* op = "infonce_kernels::lse_fwd (cuda)";
  check_inputs(op, q, k, scale, exclude, symmetric);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor& kk = symmetric ? q : k;
  const int64_t M = q.size(0), N = kk.size(0), d = q.size(1), E = exclude.size(1);
  at::Tensor lse = at::empty({M}, q.options().dtype(acc_dtype(q.scalar_type())));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  C10_CUDA_CHECK(infonce_cuda::lse_forward(kernel_dtype(q.scalar_type()), q.data_ptr(),
                                           kk.data_ptr(), scale.data_ptr(), exclude_ptr(exclude),
                                           M, N, d, E, lse.data_ptr(), stream));
  return lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& exclude, bool symmetric, const at::Tensor& lse) {
  constexpr const char* op = "infonce_kernels::lse_bwd (cuda)";
  check_inputs(op, q, k, scale, exclude, symmetric);
  check_same_device(grad, "grad", q, op);
  check_same_device(lse, "lse", q, op);
  const int64_t M = q.size(0);
  const auto acc = acc_dtype(q.scalar_type());
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == M, op, ": grad must have shape (M,) = (", M,
              ",), got ", grad.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == M, op, ": lse must have shape (M,) = (", M,
              ",), got ", lse.sizes());
  TORCH_CHECK(grad.scalar_type() == acc, op, ": grad must be ", acc, ", got ", grad.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc, op, ": lse must be ", acc, ", got ", lse.scalar_type());
  TORCH_CHECK(grad.is_contiguous(), op, ": grad must be contiguous");
  TORCH_CHECK(lse.is_contiguous(), op, ": lse must be contiguous");

  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor& kk = symmetric ? q : k;
  const int64_t N = kk.size(0), d = q.size(1), E = exclude.size(1);
  const auto dt = kernel_dtype(q.scalar_type());

  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = symmetric ? q.new_empty({0}) : at::empty_like(k);
  at::Tensor dscale = at::empty({}, scale.options());
  const size_t ws_bytes = infonce_cuda::lse_backward_workspace_bytes(dt, M, N, d, symmetric);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  C10_CUDA_CHECK(infonce_cuda::lse_backward(
      dt, grad.data_ptr(), q.data_ptr(), kk.data_ptr(), scale.data_ptr(), exclude_ptr(exclude), M,
      N, d, E, symmetric, lse.data_ptr(), dq.data_ptr(), symmetric ? nullptr : dk.data_ptr(),
      dscale.data_ptr(), workspace.data_ptr(), stream));
  return std::make_tuple(dq, dk, dscale);
}

}  // namespace

TORCH_LIBRARY_IMPL(infonce_kernels, CUDA, m) {
  m.impl("lse_fwd", &lse_fwd_cuda);
  m.impl("lse_bwd", &lse_bwd_cuda);
}
