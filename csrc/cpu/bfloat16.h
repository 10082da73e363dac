// bfloat16 on the CPU: bf16 storage, float32 math.
//
// A kernel given bfloat16 tensors converts them to float32 tensors, runs its
// float32 code, and rounds its outputs to bfloat16 once at the end. Every
// sum and every intermediate is float32; the saved statistics (mean, rstd,
// lse) stay float32 (stats_dtype in kernels.h). The conversion costs one
// float32 copy of each input; the GEMMs around the kernels (block.cpp) run in
// bfloat16 in ATen, which also accumulates in float32.
#pragma once

#include <ATen/ATen.h>

namespace nanoblock::cpu {

inline bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

// float32 copy of a bf16 tensor; an undefined (absent optional) stays undefined.
inline at::Tensor to_float(const at::Tensor& t) {
  return t.defined() ? t.to(at::kFloat) : t;
}

inline at::Tensor to_bf16(const at::Tensor& t) { return t.to(at::kBFloat16); }

}  // namespace nanoblock::cpu
