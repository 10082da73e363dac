// nanoblock kernels: the functions each backend (cpu::, cuda::) implements.
//
// Layer 1 of the code (see DESIGN.md): no Python, no autograd, no argument
// checks. The op boundary (csrc/ops.cpp) has already checked every argument
// and made every tensor contiguous, so a kernel may assume:
//   - all tensors contiguous, on one device, of one floating dtype, except the
//     saved statistics (mean, rstd, lse), which are float32 for half, bfloat16
//     and float32 inputs and float64 for float64 inputs (stats_dtype below);
//   - an optional tensor that is absent arrives undefined (!t.defined());
//   - sizes may be zero (N = 0 rows, T = 0 positions).
// Gradients are returned fresh (overwritten, never accumulated into).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace nanoblock {

using at::Tensor;

// float64 inputs keep float64 statistics (gradcheck needs them); every other
// dtype keeps float32 statistics.
inline at::ScalarType stats_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// One dropout of the Block, for a kernel (kernel_api.h has the contract).
// p == 0: no dropout, rng may be undefined.
struct Dropout {
  double p = 0;
  Tensor rng;         // int64 [2] = (seed, offset) on the tensors' device
  int64_t which = 0;  // kDropoutAttention, kDropoutAttentionResidual, kDropoutMlpResidual
  bool active() const { return p > 0; }
};

constexpr int64_t kDropoutAttention = 0;          // the attention probabilities
constexpr int64_t kDropoutAttentionResidual = 1;  // attn.c_proj's output
constexpr int64_t kDropoutMlpResidual = 2;        // mlp.c_proj's output

namespace cpu {
#include "kernel_api.h"
}  // namespace cpu

#ifdef NANOBLOCK_WITH_CUDA
namespace cuda {
#include "kernel_api.h"

// Which kernels the CUDA causal attention may take for float16 / bfloat16
// (attention.cu's dispatch): with wgmma allowed (the default), Hopper's
// wgmma kernels where wgmma_attention_available() and they apply, else the
// mma.sync ones. NANOBLOCK_ATTENTION_KERNELS=mma in the environment when the
// library loads, or the op nanoblock::attention_kernels("mma") (ops.cpp),
// forbids wgmma, so that tests run both paths on one GPU.
bool wgmma_attention_allowed();
void allow_wgmma_attention(bool allowed);
// This build holds the wgmma kernels (sm_90a) and the current device is
// compute capability 9.0 (asked of the driver once per device).
bool wgmma_attention_available();

// Which path the float16 / bfloat16 CUDA GEMMs (gemm.cu) take: with cuBLASLt
// allowed (the default), cuBLASLt with a plan cached per shape where it
// applies, else ATen's mm / addmm. NANOBLOCK_GEMM_KERNELS=aten in the
// environment when the library loads, or the op
// nanoblock::gemm_kernels("aten") (ops.cpp), sends every GEMM to ATen, so
// that tests and benchmarks (host_time.py) run both paths in one process.
bool cublaslt_gemm_allowed();
void allow_cublaslt_gemm(bool allowed);
}  // namespace cuda
#endif

// The kernels of one backend, as a table, so that code composed of kernels
// (the whole Block, csrc/block.cpp) and the op boundary (csrc/ops.cpp) are
// written once for every backend.
struct Kernels {
  decltype(&cpu::layer_norm_forward) layer_norm_forward;
  decltype(&cpu::add_layer_norm_forward) add_layer_norm_forward;
  decltype(&cpu::layer_norm_backward) layer_norm_backward;
  decltype(&cpu::causal_attention_forward) causal_attention_forward;
  decltype(&cpu::causal_attention_backward) causal_attention_backward;
  decltype(&cpu::gelu_forward) gelu_forward;
  decltype(&cpu::gelu_backward) gelu_backward;
  decltype(&cpu::bias_grad) bias_grad;
  decltype(&cpu::gelu_backward_recompute) gelu_backward_recompute;
  decltype(&cpu::dropout_add) dropout_add;
  decltype(&cpu::matmul) matmul;
  decltype(&cpu::matmul_bias) matmul_bias;
  decltype(&cpu::matmul_bias_add) matmul_bias_add;
};

#define NANOBLOCK_KERNEL_TABLE(ns)                                                   \
  Kernels {                                                                          \
    &ns::layer_norm_forward, &ns::add_layer_norm_forward, &ns::layer_norm_backward,  \
        &ns::causal_attention_forward, &ns::causal_attention_backward,               \
        &ns::gelu_forward, &ns::gelu_backward, &ns::bias_grad,                       \
        &ns::gelu_backward_recompute, &ns::dropout_add, &ns::matmul,                 \
        &ns::matmul_bias, &ns::matmul_bias_add                                       \
  }

inline constexpr Kernels cpu_kernels = NANOBLOCK_KERNEL_TABLE(cpu);
#ifdef NANOBLOCK_WITH_CUDA
inline constexpr Kernels cuda_kernels = NANOBLOCK_KERNEL_TABLE(cuda);
#endif

}  // namespace nanoblock
