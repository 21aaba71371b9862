// The CPU dispatch key of the private ops (schemas in csrc/ops.cpp): the kernels of
// csrc/cpu/lse_cpu.cpp and csrc/cpu/sigmoid_cpu.cpp behind the shared argument checks (csrc/common/register_impls.h, csrc/common/sigmoid_impls.h).
#include "../common/register_impls.h"
#include "../common/lse_impls.h"
#include "../common/sigmoid_impls.h"

namespace infonce_kernels {

TORCH_LIBRARY_IMPL(infonce_kernels, CPU, m) {
  OpImpls<lse_forward_cpu, lse_backward_cpu, lse_backward_paired_cpu>::register_all(m);
  SigmoidOpImpls<sigmoid_forward_cpu, sigmoid_backward_cpu>::register_all(m);
}

}  // namespace infonce_kernels
