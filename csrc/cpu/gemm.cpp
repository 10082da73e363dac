// The Block's GEMMs on the CPU (kernel_api.h): ATen's, which run MKL or
// OpenBLAS.
#include "../kernels.h"

namespace nanoblock::cpu {

Tensor matmul(const Tensor& a, const Tensor& b) { return at::mm(a, b); }

Tensor matmul_bias(const Tensor& bias, const Tensor& a, const Tensor& b) {
  return at::addmm(bias, a, b);
}

Tensor matmul_bias_add(const Tensor& bias, const Tensor& a, const Tensor& b,
                       const Tensor& residual) {
  // (qualified: at::matmul would be found too, through the arguments)
  const Tensor product = bias.defined() ? cpu::matmul_bias(bias, a, b) : cpu::matmul(a, b);
  return cpu::dropout_add(product, residual, Dropout{});
}

}  // namespace nanoblock::cpu
