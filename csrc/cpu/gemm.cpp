// matmul on the CPU (kernel_api.h): ATen's, which runs MKL or OpenBLAS.
#include "../kernels.h"

namespace nanoblock::cpu {

Tensor matmul(const Tensor& a, const Tensor& b) { return at::mm(a, b); }

}  // namespace nanoblock::cpu
