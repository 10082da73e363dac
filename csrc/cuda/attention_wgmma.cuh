// Causal attention forward and backward on Hopper's warpgroup tensor-core
// instructions (wgmma, sm_90a): attention_wgmma.cu and
// attention_wgmma_backward.cu. Beside the mma.sync path (attention_mma.cu),
// with the same inputs, outputs and layouts; attention.cu's dispatch takes
// it for float16 / bfloat16, head dim 64 or 128, no dropout, on a compute
// capability 9.0 GPU when the build holds sm_90a code (kernels.h:
// wgmma_attention_available, wgmma_attention_allowed). The *_into entry
// points are the dispatch's (arguments checked at the op boundary, default
// tile shapes); the others check their arguments and name a tile shape, for
// scripts/try_wgmma.py and scripts/try_wgmma_backward.py, which time them.
//
// Plain C++ (no CUDA types), so a .cpp binding can include it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace nanoblock::cuda {

// True when this build holds the wgmma kernels (compiled for sm_90a) and the
// current device is compute capability 9.0.
bool wgmma_attention_available();

// qkv [B, T, 3C] float16 / bfloat16 on the GPU, head dim C / n_head 64 or
// 128. Returns out [B, T, C] (qkv's dtype) and lse [B, n_head, T] (float32,
// natural log of the row sums of exp(scale * q k^T) over the causal keys).
std::tuple<at::Tensor, at::Tensor> wgmma_attention_forward(const at::Tensor& qkv, int64_t n_head);

// The dispatch's forward and backward: qkv (and grad_out) contiguous, 16-byte
// aligned, float16 / bfloat16, head dim 64 or 128; out [B, T, C], lse
// [B, n_head, T] float32, grad_qkv [B, T, 3C] preallocated; row_dot =
// rowsum(grad_out * out) [B, n_head, T] float32. Launched on the current
// stream, the default tile shapes.
void wgmma_attention_forward_into(const at::Tensor& qkv, int64_t n_head, const at::Tensor& out,
                                  const at::Tensor& lse);
void wgmma_attention_backward_into(const at::Tensor& grad_out, const at::Tensor& qkv,
                                   const at::Tensor& lse, const at::Tensor& row_dot,
                                   int64_t n_head, const at::Tensor& grad_qkv);

// The same with the tile shape named: key_tile keys per shared-memory tile
// (64 or 128), warpgroups (1 to 3 consumers, 64 queries each) per block, and
// the schedule: 0 serial, 1 pipelined (the softmax of one key tile overlaps
// the P V product of the one before), 2 producer (pipelined consumers and
// one more warpgroup that does the copies). For timing the shapes against
// each other; raises for a shape that is not built (attention_wgmma.cu
// lists them).
std::tuple<at::Tensor, at::Tensor> wgmma_attention_forward_tiles(const at::Tensor& qkv,
                                                                 int64_t n_head, int64_t key_tile,
                                                                 int64_t warpgroups,
                                                                 int64_t schedule);

// A tile shape of one wgmma kernel, as the *_tiles entry points below take
// it: tile (forward and grad_q: keys per shared-memory tile; grad_kv:
// queries), consumer warpgroups per block, schedule (each kernel's own
// numbering).
struct WgmmaShape {
  int64_t tile, warpgroups, schedule;
};

// The shape that the environment variable `name` gives as
// "TILE,WARPGROUPS,SCHEDULE", or none when it is unset; raises when it is
// set to anything else. The dispatch reads NANOBLOCK_WGMMA_FORWARD,
// NANOBLOCK_WGMMA_GRAD_KV and NANOBLOCK_WGMMA_GRAD_Q once, at its first
// wgmma attention, in place of its default shapes: to time every built
// shape in the same build (benchmarks/bench_attention.py); a shape not
// built for the head dim at hand raises there.
std::optional<WgmmaShape> wgmma_shape_from_env(const char* name);

// Backward (attention_wgmma_backward.cu), the two kernels of
// attention_mma.cu's backward: grad_out [B, T, C], qkv [B, T, 3C] (float16 /
// bfloat16), lse and row_dot (rowsum(grad_out * out)) [B, n_head, T]
// float32, all contiguous on one GPU; grad_qkv [B, T, 3C] preallocated.
// grad_kv writes its k and v columns (query tiles of query_tile, warpgroups
// x 64 keys a block, schedule 0 serial, 1 overlap: dV += P^T dO runs while
// dS is computed, 2 pipelined: also dK runs on into the next query tile),
// grad_q its q columns (key tiles of key_tile, warpgroups x 64 queries a
// block, schedule 0 serial, 2 pipelined: dQ runs on into the next key
// tile). Raise for a shape that is not built.
void wgmma_attention_grad_kv(const at::Tensor& grad_out, const at::Tensor& qkv,
                             const at::Tensor& lse, const at::Tensor& row_dot, int64_t n_head,
                             const at::Tensor& grad_qkv, int64_t query_tile, int64_t warpgroups,
                             int64_t schedule);
void wgmma_attention_grad_q(const at::Tensor& grad_out, const at::Tensor& qkv,
                            const at::Tensor& lse, const at::Tensor& row_dot, int64_t n_head,
                            const at::Tensor& grad_qkv, int64_t key_tile, int64_t warpgroups,
                            int64_t schedule);

}  // namespace nanoblock::cuda
