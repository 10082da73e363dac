// Hopper warpgroup MMA (wgmma.mma_async, sm_90a) pieces shared by the wgmma
// attention kernels (attention_wgmma.cu: forward; attention_wgmma_backward.cu:
// grad_kv and grad_q): the 128-byte-swizzled shared-memory tiles, their
// asynchronous copies and matrix descriptors, the wgmma instructions, fences
// and waits, and the accumulator-to-A-operand conversion. Device code:
// include from .cu files only. Everything except NANOBLOCK_WGMMA_DEVICE and
// the constants exists only in the sm_90a device pass.
//
// References: NVIDIA PTX ISA (version 8.x / 9.0), section "Asynchronous
// Warpgroup Level Matrix Multiply-Accumulate Instructions" (9.7.15 in the
// 9.0 manual): 9.7.15.5.1.1.1 "Matrix Fragments for wgmma.mma_async.m64nNk16"
// (register layouts of A and D), 9.7.15.5.1.2 "Shared Memory Matrix Layout"
// (swizzle atoms, K-major / MN-major), 9.7.15.5.1.2.1 "Major-ness supported
// by Strides" (what the leading and stride byte offsets mean, and the
// "Canonical Layouts" table), 9.7.15.5.1.2.2 "Matrix Descriptor Format",
// 9.7.15.6/7 (wgmma.mma_async,
// wgmma.fence, commit_group, wait_group); and the memory consistency
// model's "async proxy" (fence.proxy.async). Section numbers move between
// manual versions; the titles do not.
//
// ---------------------------------------------------------------------------
// (a) Shared-memory layout: 128-byte swizzle.
//
// Every tile (Q [BQ][HD], K [BK][HD], V [BK][HD], 16-bit elements) is kept as
// HD / 64 column PANELS, panel p holding columns 64p .. 64p + 63 of every row
// of the tile: a panel is [rows][64] elements, one row = 128 bytes, panels
// one after the other (panel p at byte p * rows * 128). Within a panel, the
// 16-byte chunk c (elements 8c .. 8c + 7, c = 0..7) of row r lies at byte
//     r * 128 + ((c ^ (r % 8)) * 16)
// i.e. address bits [4:6] are XORed with bits [7:9]: the 128-byte swizzle
// ("Swizzle<3,4,3>"), whose pattern repeats every 8 rows (1024 bytes). Every
// panel starts on a 1024-byte boundary (the dynamic shared memory is aligned
// up to 1024 by hand), so the descriptors' "matrix base offset" is 0 and the
// XOR the tensor cores undo is the one the copies did (they XOR the same
// absolute address bits). swizzled_offset() is the one place computing it.
//
// Matrix descriptor (64 bits, 9.7.15.5.1.2.2):
//   bits  0-13  (start address & 0x3FFFF) >> 4   (shared-space address)
//   bits 16-29  leading dimension byte offset >> 4 (LBO)
//   bits 32-45  stride dimension byte offset >> 4  (SBO)
//   bits 49-51  matrix base offset: 0 (patterns start 1024-byte aligned)
//   bits 62-63  swizzle mode: 1 = 128-byte swizzle
// The canonical layouts (CuTe notation, T = 8 16-bit elements = 16 bytes,
// strides in elements, then Swizzle<3,4,3>):
//   K-major  128B: ((8,m),(T,2k)):((8T,SBO),(1,T))
//   MN-major 128B: ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))
// K-major operands (Q as A and K as B of S = Q K^T: the reduction index hd
// runs along the rows in memory): a swizzle atom is 8 rows x 128 bytes;
// SBO = 1024 (from one group of 8 rows to the next, along M or N); LBO is
// not used for swizzled K-major layouts (set to 16 bytes, encoded 1). One
// instruction reads K = 16 elements = 32 bytes of each row: k step ks uses
// panel ks / 4 and starts (ks % 4) * 32 bytes into it (the hardware applies
// the XOR to the full address, so moving the start 32 bytes right inside the
// atom is how the k steps are walked, as for any 128B-swizzled K-major tile).
// MN-major operand (V as B of O = P V: its reduction index is the key, along
// the tile's rows, and N = hd runs along memory): the swizzle atom is the
// same 8 rows (8 keys) x 64 elements (128 bytes of N); SBO = 1024 (from 8
// keys to the next 8), LBO = rows * 128 (from one 64-wide N panel to the
// next; used only when HD = 128). Key step kk (16 keys) starts at row 16 kk:
// byte kk * 2048, a multiple of 1024. imm-trans-b = 1 selects MN-major.
//
// (b) Accumulator (D) layout of wgmma m64nNk16 with float32 (9.7.15.5.1.1.1,
// "register fragment layout for accumulator matrix D"): thread x of the
// warpgroup, w = x / 32 (warp in the warpgroup), g = (x % 32) / 4,
// t = x % 4, holds N / 2 floats d[0 .. N/2 - 1]; for column chunk j (0 ..
// N/8 - 1) and e = 0..3:
//     d[4j + e] = D[16w + g + 8 (e / 2)][8j + 2t + (e % 2)]
// So a thread holds 2 rows (16w + g and 16w + g + 8) and, of each, 2
// neighbouring columns of every chunk of 8; the 4 lanes of a quad (same g,
// t = 0..3) hold one row together: row max and row sum reduce with
// __shfl_xor_sync over lane masks 1 and 2. The causal mask, the softmax and
// the output store below use this formula (key = k0 + 8j + 2t + e % 2,
// query = q0 + 16w + g + 8 (e / 2)).
//
// (c) A from registers (9.7.15.5.1.1.1, "register fragment layout for matrix
// A", 16-bit types): four 32-bit registers a[0..3] of two elements each
// (low half = lower column), warp w holding rows 16w .. 16w + 15:
//     a[0] = A[16w + g][2t, 2t+1]       a[1] = A[16w + g + 8][2t, 2t+1]
//     a[2] = A[16w + g][2t+8, 2t+9]     a[3] = A[16w + g + 8][2t+8, 2t+9]
// (the mma.m16n8k16 A layout, a warp per 16 rows). For the k step kk of
// O += P V (keys 16kk .. 16kk + 15 of the tile), the P columns 16kk + 2t..
// are chunk j = 2kk of S and 16kk + 8 + 2t.. chunk j = 2kk + 1, in the same
// rows, so
//     a[0] = pack(s[8kk+0], s[8kk+1])   a[1] = pack(s[8kk+2], s[8kk+3])
//     a[2] = pack(s[8kk+4], s[8kk+5])   a[3] = pack(s[8kk+6], s[8kk+7])
// with no data exchanged between threads (scores_to_a below).
//
// Ordering rules kept here: wgmma.fence before the first wgmma that reads
// registers written by ordinary instructions (the S registers the softmax
// wrote, O after rescaling, the P fragments); wgmma.commit_group, then
// wgmma.wait_group N before the accumulators are read (N = 0, or 1 when the
// group to read is the older of two: groups complete in commit order);
// every accumulator and P register is tied by empty asm statements
// (keep_in_order) so that the compiler moves no ordinary read of them above
// the wait, nor a write below the fence. cp.async writes to shared memory
// are generic-proxy writes that the tensor cores read through the async
// proxy: each thread waits for its copies, issues
// fence.proxy.async.shared::cta, then the block barrier.
#pragma once

#include "tensor_core.cuh"

#include <cstdint>
#include <type_traits>

// wgmma exists only in the architecture-specific sm_90a target, whose device
// pass defines __CUDA_ARCH_FEAT_SM90_ALL. Any other target (or the host pass)
// compiles the kernel bodies empty; wgmma_attention_available() reports it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NANOBLOCK_WGMMA_DEVICE 1
#else
#define NANOBLOCK_WGMMA_DEVICE 0
#endif

namespace nanoblock::cuda {

constexpr int kWarpgroupThreads = 128;
constexpr int kWarpgroupRows = 64;  // M of every wgmma
constexpr int kRowBytes = 128;      // one swizzled panel row: 64 16-bit elements
constexpr int kPanelCols = 64;
constexpr int kAtomBytes = 1024;    // 8 rows of 128 bytes: the swizzle's period

#if NANOBLOCK_WGMMA_DEVICE

// This thread's warpgroup, through warp_uniform: what follows from it (loop
// bounds and counters, shared addresses, wgmma descriptors) can then stay in
// uniform registers, off the vector ALU that the softmax needs.
__device__ __forceinline__ int warpgroup_index() {
  return warp_uniform(static_cast<int>(threadIdx.x) / kWarpgroupThreads);
}

// This thread's copies (cp.async, tensor_core.cuh) are in shared memory and
// ordered before what the async proxy (the tensor cores) reads after the
// next barrier.
__device__ __forceinline__ void copy_async_wait_all_for_tensor_cores() {
  copy_async_wait_all();
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The same for the copies of this thread's older commit groups: all but the
// newest N are in (groups complete in commit order) and fenced.
template <int N>
__device__ __forceinline__ void copy_async_wait_for_tensor_cores() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N of this warpgroup's committed groups are pending
// (groups complete in commit order).
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// An empty asm that "reads and writes" every register of r: ordinary code
// that uses r stays on its side of the wgmma fence / wait next to it
// (accumulators; and the P fragments, written just before the fence).
template <int N>
__device__ __forceinline__ void keep_in_order(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void keep_in_order(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; i++) {
#pragma unroll
    for (int j = 0; j < 4; j++) asm volatile("" : "+r"(r[i][j])::"memory");
  }
}

// Byte offset, in a swizzled tile of ROWS rows (layout (a) in the header), of
// 16-byte chunk `chunk` (elements 8 chunk .. 8 chunk + 7 of the head dim) of
// row `row`.
template <int ROWS>
__device__ __forceinline__ uint32_t swizzled_offset(int row, int chunk) {
  const int panel = chunk / 8, c = chunk % 8;
  return static_cast<uint32_t>(panel * ROWS * kRowBytes + row * kRowBytes + ((c ^ (row % 8)) << 4));
}

// Starts copying rows first .. first + ROWS - 1 (zeros at or past T) of one
// head's HD columns, rows row_stride elements apart in global memory, into
// the swizzled tile at shared address `tile`. Neighbouring threads take
// neighbouring 16-byte chunks of a row (coalesced reads). UNROLL: rounds
// unrolled (all by default; the producer warpgroup of attention_wgmma.cu
// takes 1, or ptxas keeps every round's addresses live across its tile loop
// and spills them at the producer's small register limit).
template <int ROWS, int HD, int THREADS, typename scalar_t, int UNROLL = ROWS * (HD / 8) / THREADS>
__device__ __forceinline__ void copy_tile_async(uint32_t tile, const scalar_t* src,
                                                int64_t row_stride, int first, int T) {
  constexpr int kChunks = HD / 8;
  static_assert(ROWS * kChunks % THREADS == 0, "whole rounds of chunks");
#pragma unroll UNROLL
  for (int round = 0; round < ROWS * kChunks / THREADS; round++) {
    const int idx = round * THREADS + static_cast<int>(threadIdx.x);
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = first + r < T;
    const scalar_t* from = valid ? src + static_cast<int64_t>(first + r) * row_stride + c * 8 : src;
    copy_async_16(tile + swizzled_offset<ROWS>(r, c), from, valid);
  }
}

// copy_tile_async's copies for tiles taken in order (tile i: rows first +
// i * ROWS), with this thread's share worked out once: round r of its chunks
// lies r * kRowsPerRound rows below round 0's, at the same swizzle (a
// multiple of 8 rows), and the next tile's chunk is one pointer add away. A
// tile then costs a bounds test and an address add a round instead of the
// division, swizzle and 64-bit products of every chunk (about 60 vector
// instructions a key tile in the 64-key forward's loop, sm_90a SASS, where
// the softmax wants the ALU). A walk can fill two tiles a step from rows a
// fixed distance apart (K and V in qkv).
template <int ROWS, int HD, int THREADS, typename scalar_t>
struct TileCopyWalk {
  static constexpr int kChunks = HD / 8;
  static constexpr int kRounds = ROWS * kChunks / THREADS;
  static constexpr int kRowsPerRound = THREADS / kChunks;
  static_assert(ROWS * kChunks % THREADS == 0 && THREADS % kChunks == 0, "whole rounds of rows");
  static_assert(kRowsPerRound % 8 == 0, "every round at round 0's swizzle");

  const scalar_t* src;   // given for the rows at or past T (nothing is read there)
  const scalar_t* from;  // this thread's round-0 chunk in the next tile
  int64_t row_stride;    // elements
  int row;               // that chunk's row
  uint32_t smem;         // byte offset of that chunk in a swizzled tile

  // Rows row_stride elements apart from src; the first tile starts at row first.
  __device__ __forceinline__ TileCopyWalk(const scalar_t* src_, int64_t row_stride_, int first)
      : src(src_), row_stride(row_stride_) {
    const int r = static_cast<int>(threadIdx.x) % THREADS / kChunks;
    const int c = static_cast<int>(threadIdx.x) % kChunks;
    row = first + r;
    from = src + row * row_stride + c * 8;
    smem = swizzled_offset<ROWS>(r, c);
  }

  // The next tile (zeros at or past row T) into the swizzled tile at shared
  // address `tile`; with tile2, also the rows `apart` elements further on
  // into tile2. Then steps to the tile after.
  __device__ __forceinline__ void copy_next(uint32_t tile, int T) {
    copy_next<false>(tile, 0, 0, T);
  }
  __device__ __forceinline__ void copy_next(uint32_t tile, uint32_t tile2, int64_t apart, int T) {
    copy_next<true>(tile, tile2, apart, T);
  }

 private:
  template <bool kTwo>
  __device__ __forceinline__ void copy_next(uint32_t tile, uint32_t tile2, int64_t apart, int T) {
#pragma unroll
    for (int round = 0; round < kRounds; round++) {
      const bool valid = row + round * kRowsPerRound < T;
      const scalar_t* chunk = valid ? from + round * kRowsPerRound * row_stride : src;
      const uint32_t at = smem + round * kRowsPerRound * kRowBytes;
      copy_async_16(tile + at, chunk, valid);
      if constexpr (kTwo) copy_async_16(tile2 + at, valid ? chunk + apart : src, valid);
    }
    from += ROWS * row_stride;
    row += ROWS;
  }
};

// Matrix descriptor of a 128B-swizzled operand at shared address `start`
// (layout (a) in the header). Built from the address as it comes: taking
// start through warp_uniform put the descriptors in uniform registers (no
// R2UR before each wgmma, 114 instead of 128 registers in the hd-64
// forward) but measured no faster on the H200 (forward 1-4% slower, fwd+bwd
// within 1%, session 11), so it was left out.
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t start, uint32_t leading_bytes,
                                                    uint32_t stride_bytes) {
  return static_cast<uint64_t>((start & 0x3FFFF) >> 4) |
         static_cast<uint64_t>((leading_bytes & 0x3FFFF) >> 4) << 16 |
         static_cast<uint64_t>((stride_bytes & 0x3FFFF) >> 4) << 32 |
         static_cast<uint64_t>(1) << 62;
}

// The descriptor of the operand `bytes` (a multiple of 16) after the one of
// `desc`, both in the same shared memory: the start field (address / 16, 14
// bits: shared addresses stay below 2^18) grows by bytes / 16 without a
// carry out of the low word, so one 32-bit add instead of the mask, shift
// and packing of smem_descriptor (4-5 instructions a wgmma in the forward's
// loop, sm_90a SASS).
__device__ __forceinline__ uint64_t descriptor_plus(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = static_cast<uint32_t>(desc) + (bytes >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | lo;
}

// The wgmma instructions used: D (N/2 floats a thread) += A B with
//   wgmma_ss: A, B from shared memory, both K-major (imm-trans-a = imm-trans-b = 0);
//   wgmma_rs: A from registers (4 x b32), B from shared memory MN-major
//             (imm-trans-b = 1).
// accumulate = 0 makes D = A B (scale-d false). The operand lists are long,
// so they are spelled by the macros below: NANOBLOCK_D32 / _D64 name the
// registers %0..%31 / %0..%63, NANOBLOCK_ACC32 / _ACC64 bind them to d[].
#define NANOBLOCK_D32                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define NANOBLOCK_D64                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "     \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, " \
  "%31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, " \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, " \
  "%61, %62, %63}"
#define NANOBLOCK_ACC8(d, i)                                                           \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]),         \
      "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define NANOBLOCK_ACC32(d, i) \
  NANOBLOCK_ACC8(d, i), NANOBLOCK_ACC8(d, i + 8), NANOBLOCK_ACC8(d, i + 16), NANOBLOCK_ACC8(d, i + 24)
#define NANOBLOCK_ACC64(d) NANOBLOCK_ACC32(d, 0), NANOBLOCK_ACC32(d, 32)
// One wgmma with A and B descriptors; operands: D, then %A %B (descriptors),
// %P (accumulate flag).
#define NANOBLOCK_WGMMA_SS(SHAPE, TYPE, DREGS, A, B, P)                             \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" P ", 0;\n"                                \
  "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " " DREGS ", %" A \
  ", %" B ", p, 1, 1, 0, 0;\n}\n"
// One wgmma with A in registers %A0..%A0+3 and B a descriptor (MN-major).
#define NANOBLOCK_WGMMA_RS(SHAPE, TYPE, DREGS, A0, A1, A2, A3, B, P)                     \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" P ", 0;\n"                                     \
  "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " " DREGS ", {%" A0 \
  ", %" A1 ", %" A2 ", %" A3 "}, %" B ", p, 1, 1, 1;\n}\n"

template <typename scalar_t, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b,
                                         int accumulate) {
  constexpr bool bf16 = std::is_same_v<scalar_t, at::BFloat16>;
  static_assert(N == 64 || N == 128, "N");
  if constexpr (N == 64 && bf16) {
    asm volatile(NANOBLOCK_WGMMA_SS("m64n64k16", "bf16", NANOBLOCK_D32, "32", "33", "34")
                 : NANOBLOCK_ACC32(d, 0)
                 : "l"(a), "l"(b), "r"(accumulate));
  } else if constexpr (N == 64) {
    asm volatile(NANOBLOCK_WGMMA_SS("m64n64k16", "f16", NANOBLOCK_D32, "32", "33", "34")
                 : NANOBLOCK_ACC32(d, 0)
                 : "l"(a), "l"(b), "r"(accumulate));
  } else if constexpr (bf16) {
    asm volatile(NANOBLOCK_WGMMA_SS("m64n128k16", "bf16", NANOBLOCK_D64, "64", "65", "66")
                 : NANOBLOCK_ACC64(d)
                 : "l"(a), "l"(b), "r"(accumulate));
  } else {
    asm volatile(NANOBLOCK_WGMMA_SS("m64n128k16", "f16", NANOBLOCK_D64, "64", "65", "66")
                 : NANOBLOCK_ACC64(d)
                 : "l"(a), "l"(b), "r"(accumulate));
  }
}

template <typename scalar_t, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b,
                                         int accumulate) {
  constexpr bool bf16 = std::is_same_v<scalar_t, at::BFloat16>;
  static_assert(N == 64 || N == 128, "N");
  if constexpr (N == 64 && bf16) {
    asm volatile(
        NANOBLOCK_WGMMA_RS("m64n64k16", "bf16", NANOBLOCK_D32, "32", "33", "34", "35", "36", "37")
        : NANOBLOCK_ACC32(d, 0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  } else if constexpr (N == 64) {
    asm volatile(
        NANOBLOCK_WGMMA_RS("m64n64k16", "f16", NANOBLOCK_D32, "32", "33", "34", "35", "36", "37")
        : NANOBLOCK_ACC32(d, 0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  } else if constexpr (bf16) {
    asm volatile(
        NANOBLOCK_WGMMA_RS("m64n128k16", "bf16", NANOBLOCK_D64, "64", "65", "66", "67", "68", "69")
        : NANOBLOCK_ACC64(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  } else {
    asm volatile(
        NANOBLOCK_WGMMA_RS("m64n128k16", "f16", NANOBLOCK_D64, "64", "65", "66", "67", "68", "69")
        : NANOBLOCK_ACC64(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  }
}

#undef NANOBLOCK_WGMMA_RS
#undef NANOBLOCK_WGMMA_SS
#undef NANOBLOCK_ACC64
#undef NANOBLOCK_ACC32
#undef NANOBLOCK_ACC8
#undef NANOBLOCK_D64
#undef NANOBLOCK_D32

// Probabilities held as the S accumulator (layout (b)) as the A fragments of
// the BK / 16 key steps of O += P V (layout (c) in the header).
template <typename scalar_t, int BK>
__device__ __forceinline__ void scores_to_a(uint32_t (&p)[BK / 16][4], const float (&s)[BK / 2]) {
#pragma unroll
  for (int kk = 0; kk < BK / 16; kk++) {
    p[kk][0] = pack2<scalar_t>(s[8 * kk + 0], s[8 * kk + 1]);
    p[kk][1] = pack2<scalar_t>(s[8 * kk + 2], s[8 * kk + 3]);
    p[kk][2] = pack2<scalar_t>(s[8 * kk + 4], s[8 * kk + 5]);
    p[kk][3] = pack2<scalar_t>(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// Issues (does not commit) S = Q K^T for one warpgroup: q_wg its 64 rows of
// the query tile (panel stride BQ rows), kb a key tile (panel stride BK
// rows). k steps of 16 along hd: panel ks / 4, (ks % 4) * 32 bytes in.
// (Any product of two K-major tiles over hd: the backward also takes dP =
// dO V^T, and S^T = K Q^T with the key tile as A.)
template <typename scalar_t, int HD, int BQ, int BK>
__device__ __forceinline__ void issue_scores(float (&s)[BK / 2], uint32_t q_wg, uint32_t kb) {
  const uint64_t a0 = smem_descriptor(q_wg, 16, kAtomBytes);
  const uint64_t b0 = smem_descriptor(kb, 16, kAtomBytes);
#pragma unroll
  for (int ks = 0; ks < HD / 16; ks++) {
    const uint32_t panel = ks / 4, in_row = (ks % 4) * 32;
    const uint64_t a = descriptor_plus(a0, panel * BQ * kRowBytes + in_row);
    const uint64_t b = descriptor_plus(b0, panel * BK * kRowBytes + in_row);
    wgmma_ss<scalar_t, BK>(s, a, b, ks > 0);  // the first k step overwrites s
  }
}

// Issues (does not commit) O += P V for one warpgroup: key steps of 16, V
// (tile vb) MN-major, LBO = one 64-column panel of the tile (BK rows).
// (Any product of register fragments and a tile reduced over its rows: the
// backward also takes dq += dS k, dv += P^T dO, dk += dS^T q.)
template <typename scalar_t, int HD, int BK>
__device__ __forceinline__ void issue_values(float (&o)[HD / 2], const uint32_t (&p)[BK / 16][4],
                                             uint32_t vb) {
  const uint64_t b0 = smem_descriptor(vb, BK * kRowBytes, kAtomBytes);
#pragma unroll
  for (int kk = 0; kk < BK / 16; kk++) {
    const uint64_t b = descriptor_plus(b0, kk * 16 * kRowBytes);
    wgmma_rs<scalar_t, HD>(o, p[kk], b, 1);
  }
}

// ---------------------------------------------------------------------------
// (d) NaN and Inf on the causal diagonal. A masked probability (or dS) is an
// exact 0 (set by select), but the value products multiply it with the B
// tile's row of a later position (V in the forward, dO and Q in grad_kv, K
// in grad_q) inside the tensor cores: 0 x NaN is NaN, and one instruction
// covers 64 rows, so masked chunks cannot be skipped as attention_mma.cu
// does. So, on the tiles where some pair is masked (the diagonal ones), the
// block votes right after the barrier that made the tile visible
// (zero_nonfinite_tiles: reads and one __syncthreads_or; nothing else on
// finite data). Rarely, when some element is not finite, the block zeroes
// those elements in shared memory, the products run on the zeroed tile, and
// each warpgroup then adds, out of line, the exact kind (NaN, +Inf, -Inf) of
// the products of the non-finite values (read again from global memory) with
// the A values of the rows that see them (add_nonfinite_products). Rows that
// do not see them get the bits of a run where they were finite. (In the
// backward the score products S, dP read the zeroed tile too; the rows that
// see a non-finite value are non-finite through lse or D anyway, but their
// kind can differ from exact math's where inputs of both signs meet.)

// Barriers of part of a block: hardware barrier ID (0 is __syncthreads's)
// over THREADS threads, each warp of them taking part whole.
template <int ID, int THREADS>
__device__ __forceinline__ void barrier_sync() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(THREADS) : "memory");
}
// The same barrier, giving every thread whether `vote` was true in any.
template <int ID, int THREADS>
__device__ __forceinline__ bool barrier_any(bool vote) {
  uint32_t any;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, %2, %3, p;\n"
      "selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(any)
      : "r"(static_cast<uint32_t>(vote)), "n"(ID), "n"(THREADS)
      : "memory");
  return any != 0u;
}

// The causal loop over one warpgroup's key tiles [begin, end) (forward and
// grad_q): tile(kt, std::false_type{}) for the tiles before first_masked,
// which lie wholly at or before the warpgroup's first query and need no
// mask, then tile(kt, std::true_type{}) for the rest, so the unmasked body
// is compiled without the mask's compares. Returns end (or begin, if
// larger): the tile the caller's drain goes on from.
template <typename Tile>
__device__ __forceinline__ int for_each_key_tile(int begin, int first_masked, int end,
                                                 Tile&& tile) {
  int kt = begin;
  for (; kt < first_masked; kt++) tile(kt, std::false_type{});
  for (; kt < end; kt++) tile(kt, std::true_type{});
  return kt;
}

// Block-wide (every thread, right after the barrier that made the tiles
// visible): whether some element of the N shared tiles of BYTES bytes is not
// finite; if so, sets those elements to 0, fences the writes for the tensor
// cores (async proxy) and ends with a barrier. BARRIER = 0: the block's
// barrier (THREADS = the block); else threads 0 .. THREADS - 1 alone (the
// producer warpgroup), with that named barrier.
template <typename scalar_t, int BYTES, int THREADS, int N, int BARRIER = 0>
__device__ __forceinline__ bool zero_nonfinite_tiles(const uint32_t (&tiles)[N]) {
  static_assert(BYTES % (16 * THREADS) == 0, "whole 16-byte chunks per thread");
  constexpr int kChunks = BYTES / 16 / THREADS;
  uint32_t acc = 0;
#pragma unroll
  for (int n = 0; n < N; n++) {
#pragma unroll
    for (int i = 0; i < kChunks; i++) {
      uint4 w;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
                   : "r"(tiles[n] + 16 * (threadIdx.x + i * THREADS)));
      acc = accumulate_nonfinite<scalar_t>(acc, w);
    }
  }
  const bool any =
      BARRIER == 0 ? __syncthreads_or(acc != 0u) != 0 : barrier_any<BARRIER, THREADS>(acc != 0u);
  if (!any) return false;
  for (int n = 0; n < N; n++) {
    for (int i = 0; i < kChunks; i++) {
      const uint32_t address = tiles[n] + 16 * (threadIdx.x + i * THREADS);
      uint4 w;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
                   : "r"(address));
      asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(address),
                   "r"(zero_nonfinite<scalar_t>(w.x)), "r"(zero_nonfinite<scalar_t>(w.y)),
                   "r"(zero_nonfinite<scalar_t>(w.z)), "r"(zero_nonfinite<scalar_t>(w.w))
                   : "memory");
    }
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  if constexpr (BARRIER == 0) {
    __syncthreads();
  } else {
    barrier_sync<BARRIER, THREADS>();
  }
  return true;
}

// By value, so that the out-of-line function below keeps its registers off
// the kernel's: the A fragments of a product over N columns (layout (c)),
// and the kinds (merge_kind, tensor_core.cuh) of a [64][HD] accumulator's
// HD / 2 elements a thread holds, 2 bits each.
template <int N>
struct AFragments {
  uint32_t a[N / 16][4];
};
template <int HD>
struct AccumulatorKinds {
  uint32_t bits[HD / 16];
};

// For acc += A B of one warpgroup (A [64][N] as fragments, B [N][HD]): the
// kind of the sum of A[r][c] B[c][d] over the non-finite B[c][d] (read from
// global memory: row c at b + c * b_stride) of the columns c that row r
// sees, for each accumulator element the thread holds (rows row, row + 8).
// Column c is position c0 + c; a row sees it when it is at or before the
// row (after it: TRANSPOSED, rows are keys), both before T. A[r][c] is the
// 16-bit value the tensor cores multiplied, held by lane 4 g + (c % 8) / 2.
template <int N, int HD, bool TRANSPOSED, typename scalar_t>
__device__ __noinline__ AccumulatorKinds<HD> nonfinite_kinds(const AFragments<N> f,
                                                             const scalar_t* b, int64_t b_stride,
                                                             int row, int c0, int T) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  AccumulatorKinds<HD> kinds = {};
  for (int c = 0; c < N && c0 + c < T; c++) {
    const int w = c % 16, position = c0 + c;
    float a[2];  // A of rows row, row + 8 at column c
    for (int h = 0; h < 2; h++) {
      const float2 pair =
          unpack2<scalar_t>(__shfl_sync(0xffffffffu, f.a[c / 16][(w >= 8 ? 2 : 0) + h],
                                        4 * g + w % 8 / 2));
      a[h] = c & 1 ? pair.y : pair.x;
    }
    for (int j = 0; j < HD / 8; j++) {
      const float2 v2 =
          unpack2<scalar_t>(*reinterpret_cast<const uint32_t*>(b + c * b_stride + 8 * j + 2 * t));
      for (int e = 0; e < 2; e++) {
        const float v = e == 0 ? v2.x : v2.y;
        if (isfinite(v)) continue;
        for (int h = 0; h < 2; h++) {
          const int r = row + 8 * h;
          if (r >= T || (TRANSPOSED ? position < r : position > r)) continue;
          merge_kind(kinds.bits, 4 * j + 2 * h + e, a[h] * v);
        }
      }
    }
  }
  return kinds;
}

// acc plus the kinds of nonfinite_kinds (every lane of the warpgroup calls
// it, after the product into acc was waited for).
template <int N, int HD, bool TRANSPOSED, typename scalar_t>
__device__ __forceinline__ void add_nonfinite_products(float (&acc)[HD / 2],
                                                       const uint32_t (&a)[N / 16][4],
                                                       const scalar_t* b, int64_t b_stride,
                                                       int row, int c0, int T) {
  AFragments<N> f;
#pragma unroll
  for (int kk = 0; kk < N / 16; kk++)
#pragma unroll
    for (int i = 0; i < 4; i++) f.a[kk][i] = a[kk][i];
  const AccumulatorKinds<HD> kinds = nonfinite_kinds<N, HD, TRANSPOSED>(f, b, b_stride, row, c0, T);
#pragma unroll
  for (int i = 0; i < HD / 2; i++) add_kind(acc[i], kinds.bits, i);
}

// ---------------------------------------------------------------------------
// (e) Warp specialization (attention_wgmma.cu's producer schedule): one
// warpgroup copies, the others multiply, and they hand the shared-memory
// stages to each other through mbarriers (PTX "Parallel Synchronization and
// Communication Instructions: mbarrier"): 8-byte objects in shared memory
// that complete a phase when the expected number of threads have arrived;
// arrive is a release and a successful wait an acquire (CTA scope), so what
// a thread wrote before arriving is seen by whoever waited for that phase.
// Phases alternate parity 0, 1, 0, ..; a wait names the parity of the phase
// it waits for. setmaxnreg moves registers between warpgroups of a block.

// One thread, before a block barrier that every user of bar passes after.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  uint64_t state;  // the phase arrived on; not needed
  asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];\n" : "=l"(state) : "r"(bar) : "memory");
}
// Returns once the phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// Every thread of a warpgroup: this warpgroup's register limit becomes N a
// thread (dec: gives registers back to the block's pool; inc: waits until
// the pool has them). ptxas allocates the code after it within N.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

#endif  // NANOBLOCK_WGMMA_DEVICE

}  // namespace nanoblock::cuda
