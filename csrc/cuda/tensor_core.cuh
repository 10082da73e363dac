// Device pieces shared by the tensor-core attention kernels (attention_mma.cu,
// attention_wgmma.cu): asynchronous copies into shared memory, two floats
// packed as 16-bit values, the online-softmax bookkeeping of rows that the
// 4 lanes of a quad share (the accumulator layout of mma.m16n8 and of
// wgmma.m64nN alike: lanes 4g .. 4g + 3 hold row g), the order in which
// blocks take (tile, head) and the non-finite values on the causal
// diagonal. Device code: include from .cu files only.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace nanoblock::cuda {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 (or 4) bytes from global to shared memory (a pointer, or a shared-space
// address) without a register round trip; zero-filled when !valid (src is
// then not read).
__device__ __forceinline__ void copy_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void copy_async_16(void* dst, const void* src, bool valid) {
  copy_async_16(shared_address(dst), src, valid);
}
__device__ __forceinline__ void copy_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void copy_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void copy_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Starts copying values[first .. first + ROWS - 1] (zeros at or past T) to
// dst, one float a thread, by the block's THREADS threads (lse and D rows
// of a tile). Thread x takes rows x, x + THREADS, ... in rounds counted at
// compile time and unrolled: a loop from threadIdx.x has a trip count that
// ptxas cannot bound, and it emitted a general unrolled loop with a
// remainder loop, about 100 instructions a call.
template <int ROWS, int THREADS>
__device__ __forceinline__ void copy_row_values_async(float* dst, const float* values, int first,
                                                      int T) {
  constexpr int kRounds = (ROWS + THREADS - 1) / THREADS;
#pragma unroll
  for (int round = 0; round < kRounds; round++) {
    const int r = round * THREADS + static_cast<int>(threadIdx.x);
    if (ROWS % THREADS != 0 && r >= ROWS) break;  // the last round is not whole
    const bool valid = first + r < T;
    copy_async_4(dst + r, valid ? values + first + r : values, valid);
  }
}

// Two floats as two 16-bit values in one register, lo in the low half.
template <typename scalar_t>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// Sum over the 4 lanes of a quad (lane ^ 1, lane ^ 2); every lane gets it.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// v as lane 0 of the warp has it (a 32-bit integer), for a value that is the
// same in every lane. Through the shuffle the compiler knows that too, and
// can keep v and what is computed from it (loop bounds, shared addresses,
// wgmma descriptors) in uniform registers, one for the whole warp.
template <typename T>
__device__ __forceinline__ T warp_uniform(T v) {
  static_assert(std::is_integral_v<T> && sizeof(T) == 4, "a 32-bit integer");
  return __shfl_sync(0xffffffffu, v, 0);
}

// The online-softmax step of a thread's two rows once its own maxima of the
// new score tile are known (tile_max: raw scores, masked keys -inf): takes
// the quad's max, updates the running maxima m (raw; -inf until a key is
// seen) and scales the partial sums l by the correction. Gives, per row, the
// new max in the log2 domain (m * scale_log2; 0 for a row with no key yet,
// so that exp2(-inf - 0) = 0) and the factor the old sums and outputs take.
__device__ __forceinline__ void update_row_max(float (&tile_max)[2], float (&m)[2], float (&l)[2],
                                               float scale_log2, float (&m_scaled)[2],
                                               float (&correction)[2]) {
#pragma unroll
  for (int i = 0; i < 2; i++) {
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
    const float m_new = fmaxf(m[i], tile_max[i]);
    m_scaled[i] = m_new == -INFINITY ? 0.f : m_new * scale_log2;
    correction[i] = exp2_approx(m[i] * scale_log2 - m_scaled[i]);
    m[i] = m_new;
    l[i] *= correction[i];
  }
}

// Natural-log log-sum-exp of a row from its max m (raw score) and its full
// sum l of exp2(s * scale_log2 - m * scale_log2).
__device__ __forceinline__ float row_lse(float m, float l, float scale_log2) {
  return (m * scale_log2 + log2f(l)) * kLn2;
}

// ---------------------------------------------------------------------------
// Block order (attention_mma.cu and the wgmma kernels alike).

// The order of an attention kernel's blocks: which tile of which (batch,
// head) this block takes, in a grid of `tiles` tiles per head (rank 0: the
// tile with the most work, rank tiles - 1 the least) times heads = B * n_head.
// Heads go in l2_groups() groups of as even a size as they divide into (the
// first heads % groups groups one head more); within a group, rank-major
// (every head's rank-0 tile, then every head's rank 1, ...), groups one
// after the other. Most work first evens out the causal imbalance (the
// blocks that finish last are short); the grouping keeps the heads that the
// resident blocks stream the other operand of (k and v in the forward and
// grad_q, q and dO in grad_kv) few enough for L2 to hold them. Rank-major
// over all heads streamed every head at once: at 48 heads, T = 4096 (48 MiB
// of k and v) the wgmma forward hit L2 on 68% of its reads against cuDNN's
// 84% (H200, session 10's ncu). Even sizes, because a small last group
// starts its longest tiles last, when few blocks are left to run beside
// them: groups of as many heads as fit, 42, 42, 42 and 2 of 128 heads at
// T = 1024, head dim 96, ran the mma forward 9% slower than 4 groups of 32
// (H200, session 11).
struct BlockTile {
  int rank, bh;
};

// The fewest groups whose heads each have their streamed operand (two
// [T][HD] 16-bit tensors) in kL2GroupBytes, at least one head a group.
constexpr int64_t kL2GroupBytes = int64_t(16) << 20;

__host__ __device__ inline int l2_groups(int T, int HD, int heads) {
  const int64_t per_head = static_cast<int64_t>(T) * HD * 2 * 2;
  const int64_t fit = kL2GroupBytes / per_head < 1 ? 1 : kL2GroupBytes / per_head;
  return static_cast<int>((heads + fit - 1) / fit);
}

// Heads have T rows of HD columns; the grid is tiles x heads blocks.
__device__ __forceinline__ BlockTile block_tile(int tiles, int T, int HD) {
  const int block = static_cast<int>(blockIdx.x);
  const int heads = static_cast<int>(gridDim.x) / tiles;  // B * n_head
  const int groups = l2_groups(T, HD, heads);
  const int small = heads / groups;                 // heads of a small group
  const int large_groups = heads - small * groups;  // groups of small + 1 heads, first
  const int large_blocks = large_groups * (small + 1) * tiles;
  int in_group, first_head, i;  // (as selects instead of two branches: 2 more
                                // registers in the default wgmma forward)
  if (block < large_blocks) {
    in_group = small + 1;
    const int g = block / (in_group * tiles);
    first_head = g * in_group;
    i = block - g * in_group * tiles;
  } else {
    in_group = small;
    const int rest = block - large_blocks;
    const int g = rest / (in_group * tiles);
    first_head = large_groups * (small + 1) + g * in_group;
    i = rest - g * in_group * tiles;
  }
  // Through warp_uniform: the divisions run on the vector ALU, and without it
  // ptxas kept their results, and what it derives from them, in vector
  // registers (the default wgmma forward spilled 32 bytes).
  return {warp_uniform(i / in_group), warp_uniform(first_head + i % in_group)};
}

// ---------------------------------------------------------------------------
// Non-finite values on the causal diagonal (attention_mma.cu's header and
// wgmma.cuh's say why and how): finding them, zeroing them, and adding the
// exact kind of the products that a row sees.

// acc (two 16-bit lanes) after adding w * 0: stays +0 while every value of w
// seen is finite (x * 0 + 0 is +0), turns NaN for a NaN or an Inf.
template <typename scalar_t>
__device__ __forceinline__ uint32_t accumulate_nonfinite(uint32_t acc, uint4 w) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int wi = 0; wi < 4; wi++) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      asm("fma.rn.bf16x2 %0, %1, %2, %0;" : "+r"(acc) : "r"(words[wi]), "r"(0u));
    } else {
      asm("fma.rn.f16x2 %0, %1, %2, %0;" : "+r"(acc) : "r"(words[wi]), "r"(0u));
    }
  }
  return acc;
}

// w's two 16-bit values with the non-finite ones replaced by 0.
template <typename scalar_t>
__device__ __forceinline__ uint32_t zero_nonfinite(uint32_t w) {
  constexpr uint32_t kExponent = std::is_same_v<scalar_t, at::BFloat16> ? 0x7f80u : 0x7c00u;
  if ((w & kExponent) == kExponent) w &= 0xffff0000u;
  if ((w >> 16 & kExponent) == kExponent) w &= 0x0000ffffu;
  return w;
}

template <typename scalar_t>
__device__ __forceinline__ float2 unpack2(uint32_t w) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
}

// The kind of a sum of non-finite products, 2 bits an element: the sum of
// non-finite values has the same kind in any order (NaN where any is NaN or
// both infinities meet), so adding one value of that kind gives the exact
// kind of acc + the sum.
enum : uint32_t { kNone = 0, kNaN = 1, kPlusInf = 2, kMinusInf = 3 };

// Merges the kind of the non-finite product x into element i of bits.
__device__ __forceinline__ void merge_kind(uint32_t* bits, int i, float x) {
  const uint32_t kind = isnan(x) ? kNaN : x > 0.f ? kPlusInf : kMinusInf;
  const uint32_t old = bits[i / 16] >> (2 * (i % 16)) & 3u;
  const uint32_t merged = old == kNone || old == kind ? kind : kNaN;
  bits[i / 16] ^= (old ^ merged) << (2 * (i % 16));
}

// acc plus a value of element i's kind, if it has one.
__device__ __forceinline__ void add_kind(float& acc, const uint32_t* bits, int i) {
  const uint32_t kind = bits[i / 16] >> (2 * (i % 16)) & 3u;
  if (kind != kNone) {
    acc += kind == kNaN ? __int_as_float(0x7fffffff) : kind == kPlusInf ? INFINITY : -INFINITY;
  }
}

}  // namespace nanoblock::cuda
