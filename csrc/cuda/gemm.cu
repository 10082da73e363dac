// The Block's GEMMs on CUDA (kernel_api.h): c [M, N] = a [M, K] @ b [K, N]
// (+ bias [N]) through at::cuda::mm and at::cuda::addmm, ATen's CUDA kernels
// called directly: the same cuBLAS(Lt) calls as at::mm and at::addmm, without
// the dispatcher's lookup on the way. Host time is what the small configs are
// short of (the tiny Block spends more time issuing its work than the GPU
// spends on it; host_time.py).
//
// (at::cuda::blas::gemm, one layer further down, would skip more, but the
// GPU machine's torch 2.11 does not export it from libtorch_cuda.so.)
#include <ATen/ops/addmm_cuda_dispatch.h>
#include <ATen/ops/mm_cuda_dispatch.h>

#include "../kernels.h"

namespace nanoblock::cuda {

Tensor matmul(const Tensor& a, const Tensor& b) { return at::cuda::mm(a, b); }

Tensor matmul_bias(const Tensor& bias, const Tensor& a, const Tensor& b) {
  return at::cuda::addmm(bias, a, b);
}

}  // namespace nanoblock::cuda
