// matmul on CUDA (kernel_api.h): c [M, N] = a [M, K] @ b [K, N] through
// at::cuda::mm, ATen's CUDA kernel for mm called directly: the same cuBLAS
// call as at::mm, without the dispatcher's lookup on the way. Host time is
// what the small configs are short of (the tiny Block spends more time
// issuing its work than the GPU spends on it; host_time.py).
//
// (at::cuda::blas::gemm, one layer further down, would skip more, but the
// GPU machine's torch 2.11 does not export it from libtorch_cuda.so.)
#include <ATen/ops/mm.h>
#include <ATen/ops/mm_cuda_dispatch.h>

#include <cstdlib>
#include <string>

#include "../kernels.h"

namespace nanoblock::cuda {

namespace {

// EXPERIMENT (branch next-gpu): NANOBLOCK_GEMM=aten (read once) sends every
// matmul to at::mm, for a same-build A/B of the host time.
bool use_aten() {
  static const bool aten = [] {
    const char* v = std::getenv("NANOBLOCK_GEMM");
    return v != nullptr && std::string(v) == "aten";
  }();
  return aten;
}

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b) {
  return use_aten() ? at::mm(a, b) : at::cuda::mm(a, b);
}

}  // namespace nanoblock::cuda
