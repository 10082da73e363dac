// The tensor-core path of causal attention (attention_mma.cu), used by
// attention.cu for float16 / bfloat16 when the head dim is one it was built
// for. Same inputs, outputs and layouts as the generic path (attention.cu).
#pragma once

#include "common.cuh"

namespace nanoblock::cuda {

// True when the tensor-core kernels take qkv [B, T, 3C] with head dim hd:
// float16 or bfloat16, hd in {32, 64, 80, 96, 128}, 16-byte aligned rows.
bool mma_attention_supported(const Tensor& qkv, int64_t hd, const Tensor& other);

// out [B, T, C], lse [B, n_head, T] (float32), both preallocated; dropout
// of the probabilities as in attention.cu.
void mma_attention_forward(const Tensor& qkv, int64_t n_head, const Tensor& out,
                           const Tensor& lse, const DropoutArgs& dropout);

// grad_qkv [B, T, 3C] preallocated; row_dot = rowsum(dO * O) [B, n_head, T];
// dropout: the forward's.
void mma_attention_backward(const Tensor& grad_out, const Tensor& qkv, const Tensor& lse,
                            const Tensor& row_dot, int64_t n_head, const Tensor& grad_qkv,
                            const DropoutArgs& dropout);

}  // namespace nanoblock::cuda
