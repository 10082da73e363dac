// matmul on CUDA (kernel_api.h): c [M, N] = a [M, K] @ b [K, N], straight
// into at::cuda::blas::gemm, the cuBLAS call that at::mm makes for these
// layouts, without at::mm's dispatch and argument preparation around it:
// host time is what the small configs are short of (the tiny Block spends
// more time issuing its work than the GPU spends on it; host_time.py).
//
// cuBLAS is column-major: a row-major [R, S] matrix is its transpose there.
// So c^T [N, M] = b^T [N, K] @ a^T [K, M]: b is cuBLAS's first operand, a
// its second. A contiguous operand is already that transpose ('n', leading
// dimension its row stride); the transpose of a contiguous matrix (a
// weight's .t()) is read transposed ('t', leading dimension its column
// stride).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDABlas.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>

#include "../kernels.h"

namespace nanoblock::cuda {

namespace {

// How cuBLAS reads one operand, or nothing for a layout it is not given here.
struct Operand {
  char trans;
  int64_t ld;
};

std::optional<Operand> operand(const Tensor& t) {
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1))) {
    return Operand{'n', t.stride(0)};
  }
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0))) {
    return Operand{'t', t.stride(1)};
  }
  return std::nullopt;
}

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
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const auto op_a = operand(a), op_b = operand(b);
  if (use_aten() || M == 0 || N == 0 || K == 0 || !op_a || !op_b) return at::mm(a, b);
  Tensor c = at::empty({M, N}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "matmul", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::cuda::blas::gemm<scalar_t>(op_b->trans, op_a->trans, N, M, K, opmath_t(1),
                                   b.const_data_ptr<scalar_t>(), op_b->ld,
                                   a.const_data_ptr<scalar_t>(), op_a->ld, opmath_t(0),
                                   c.mutable_data_ptr<scalar_t>(), N);
  });
  return c;
}

}  // namespace nanoblock::cuda
