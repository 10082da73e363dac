// The Block's GEMMs on the CPU (kernel_api.h): ATen's, which run MKL or
// OpenBLAS.
#include "../kernels.h"

namespace nanoblock::cpu {

Tensor matmul(const Tensor& a, const Tensor& b) { return at::mm(a, b); }

Tensor matmul_bias(const Tensor& bias, const Tensor& a, const Tensor& b) {
  return at::addmm(bias, a, b);
}

}  // namespace nanoblock::cpu
