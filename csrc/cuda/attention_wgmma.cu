// Causal attention forward on Hopper's warpgroup MMA (wgmma.mma_async,
// sm_90a), for float16 / bfloat16 and head dims 64 and 128: the forward of
// attention_mma.cu (read that file's header first) with the two matrix
// products issued a warpgroup (4 warps, 128 threads) at a time.
// A PROTOTYPE: not yet in the op dispatch nor in setup.py;
// scripts/try_wgmma.py builds it and checks it against PyTorch.
//
//   in   qkv [B, T, 3C] (q, k, v of head h at columns h*hd, C + h*hd,
//        2C + h*hd of each row), any T >= 1
//   out  out [B, T, C], lse [B, n_head, T] float32 (natural log of the row
//        sums of exp(scale * q k^T) over keys 0..row), scale = 1/sqrt(hd)
//
// Block: WG warpgroups ("consumers"), each owning 64 consecutive queries of
// the block's query tile (64 * WG queries). Every thread also copies tiles
// in (cp.async; no producer warp yet). Shared memory holds the query tile
// and two (three when pipelined) buffers each of a key tile and a value
// tile (BK keys): tile kt + 1 is copied while tile kt is used. Per key tile
// and warpgroup:
//   S = Q K^T     wgmma m64n{BK}k16, A (Q) and B (K) from shared memory,
//                 HD / 16 instructions, float32 accumulators in registers
//   online softmax on those registers (mask, row max, exp2, row sum)
//   O += P V      wgmma m64n{HD}k16, A (P, rounded to 16 bits) from
//                 registers, B (V) from shared memory, BK / 16 instructions
// in that order ("serial"), or with S of tile kt issued before P V of tile
// kt - 1 so that the softmax overlaps a product ("pipelined"; the kernel's
// comment has the schedules). Blocks are ordered longest query tiles first
// (as in attention_mma.cu).
// Scores are kept in the log2 domain (scaled by scale * log2 e) and
// exponentiated with exp2f; lse is written in natural log units.
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
// the wait, nor a write below the fence. cp.async writes to shared memory are generic-proxy writes that the
// tensor cores read through the async proxy: each thread waits for its
// copies, issues fence.proxy.async.shared::cta, then the block barrier.
#include "../check.h"
#include "attention_wgmma.cuh"
#include "common.cuh"
#include "tensor_core.cuh"

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

namespace {

constexpr int kWarpgroupThreads = 128;
constexpr int kWarpgroupRows = 64;  // M of every wgmma
constexpr int kRowBytes = 128;      // one swizzled panel row: 64 16-bit elements
constexpr int kPanelCols = 64;
constexpr int kAtomBytes = 1024;    // 8 rows of 128 bytes: the swizzle's period

// Tile shape and schedule of one kernel: HD head dim, BK keys per key tile,
// WG consumer warpgroups (64 queries each), MIN_BLOCKS blocks per
// multiprocessor asked of the compiler (a register cap of 64K / (threads *
// MIN_BLOCKS)), PIPELINED the schedule (see the kernel): false = serial
// (S, softmax, P V, one after the other; 2 key/value buffers), true = S of
// tile kt issued before P V of tile kt - 1, so the softmax of one overlaps
// the other product (3 key/value buffers).
template <int HD, int BK, int WG, int MIN_BLOCKS, bool PIPELINED>
struct WgmmaTiles {
  static_assert(HD % kPanelCols == 0, "head dim: whole 64-column panels");
  static_assert(BK == 64 || BK == 128, "wgmma N for S: 64 or 128 keys");
  static_assert(HD == 64 || HD == 128, "wgmma N for O: 64 or 128");
  static constexpr int kHeadDim = HD;
  static constexpr int kKeys = BK;
  static constexpr int kMinBlocks = MIN_BLOCKS;
  static constexpr bool kPipelined = PIPELINED;
  static constexpr int kBuffers = PIPELINED ? 3 : 2;  // key / value tiles in flight
  static constexpr int kQueries = kWarpgroupRows * WG;
  static constexpr int kThreads = kWarpgroupThreads * WG;
  static constexpr int kQBytes = kQueries * HD * 2;  // 16-bit elements
  static constexpr int kKvBytes = BK * HD * 2;       // one K (or V) tile
  // q, then k [kBuffers], then v [kBuffers]; plus the slack to align the
  // start to 1024.
  static constexpr int kSharedBytes = kQBytes + 2 * kBuffers * kKvBytes + kAtomBytes;
  static_assert(kQBytes % kAtomBytes == 0 && kKvBytes % kAtomBytes == 0, "1024-aligned tiles");
  static_assert(kSharedBytes <= 227 * 1024, "shared memory of one block");
};

// ---------------------------------------------------------------------------
// Kernels. Everything below that the device compiles exists only in the
// sm_90a pass; the host pass and other targets see empty kernel bodies.

// Writes 1 when this binary's kernels were compiled with wgmma (sm_90a).
__global__ void wgmma_probe_kernel(int* built) { *built = NANOBLOCK_WGMMA_DEVICE; }

#if NANOBLOCK_WGMMA_DEVICE

// This thread's copies (cp.async, tensor_core.cuh) are in shared memory and
// ordered before what the async proxy (the tensor cores) reads after the
// next barrier.
__device__ __forceinline__ void copy_async_wait_all_for_tensor_cores() {
  copy_async_wait_all();
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
// neighbouring 16-byte chunks of a row (coalesced reads).
template <int ROWS, int HD, int THREADS, typename scalar_t>
__device__ __forceinline__ void copy_tile_async(uint32_t tile, const scalar_t* src,
                                                int64_t row_stride, int first, int T) {
  constexpr int kChunks = HD / 8;
  static_assert(ROWS * kChunks % THREADS == 0, "whole rounds of chunks");
#pragma unroll
  for (int round = 0; round < ROWS * kChunks / THREADS; round++) {
    const int idx = round * THREADS + static_cast<int>(threadIdx.x);
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = first + r < T;
    const scalar_t* from = valid ? src + static_cast<int64_t>(first + r) * row_stride + c * 8 : src;
    copy_async_16(tile + swizzled_offset<ROWS>(r, c), from, valid);
  }
}

// Matrix descriptor of a 128B-swizzled operand at shared address `start`
// (layout (a) in the header).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t start, uint32_t leading_bytes,
                                                    uint32_t stride_bytes) {
  return static_cast<uint64_t>((start & 0x3FFFF) >> 4) |
         static_cast<uint64_t>((leading_bytes & 0x3FFFF) >> 4) << 16 |
         static_cast<uint64_t>((stride_bytes & 0x3FFFF) >> 4) << 32 |
         static_cast<uint64_t>(1) << 62;
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

// One step of the online softmax for this thread's two rows (row, row + 8)
// of a score tile s (raw q.k, layout (b): keys k0 + 8j + 2t + e % 2):
// masks keys after the row or at/past T (when needs_mask), updates the row
// maxima m (raw scores; -inf until a key is seen) and the partial row sums l
// (this thread's columns only; summed over the quad at the end), leaves
// exp2(s * scale_log2 - m * scale_log2) in s and gives the factor the rows'
// outputs so far take (rescale()).
template <int BK>
__device__ __forceinline__ void online_softmax(float (&s)[BK / 2], float (&m)[2], float (&l)[2],
                                               int row, int k0, int T, bool needs_mask,
                                               float scale_log2, float (&correction)[2]) {
  const int t = threadIdx.x % 4;
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < BK / 8; j++) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
      if (needs_mask) {
        const int key = k0 + 8 * j + 2 * t + (e & 1);
        if (key > row + 8 * (e >> 1) || key >= T) s[4 * j + e] = -INFINITY;
      }
      tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[4 * j + e]);
    }
  }
  // The 4 lanes of a quad (lane ^ 1, lane ^ 2) hold the rest of each row.
  float m_scaled[2];
  update_row_max(tile_max, m, l, scale_log2, m_scaled, correction);
#pragma unroll
  for (int j = 0; j < BK / 8; j++) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
      s[4 * j + e] = exp2f(fmaf(s[4 * j + e], scale_log2, -m_scaled[e >> 1]));
      l[e >> 1] += s[4 * j + e];
    }
  }
}

// o (layout (b), N = HD) times each row's correction.
template <int HD>
__device__ __forceinline__ void rescale(float (&o)[HD / 2], const float (&correction)[2]) {
#pragma unroll
  for (int j = 0; j < HD / 8; j++) {
#pragma unroll
    for (int e = 0; e < 4; e++) o[4 * j + e] *= correction[e >> 1];
  }
}

// Issues (does not commit) S = Q K^T for one warpgroup: q_wg its 64 rows of
// the query tile (panel stride BQ rows), kb a key tile (panel stride BK
// rows). k steps of 16 along hd: panel ks / 4, (ks % 4) * 32 bytes in.
template <typename scalar_t, int HD, int BQ, int BK>
__device__ __forceinline__ void issue_scores(float (&s)[BK / 2], uint32_t q_wg, uint32_t kb) {
#pragma unroll
  for (int ks = 0; ks < HD / 16; ks++) {
    const uint32_t panel = ks / 4, in_row = (ks % 4) * 32;
    const uint64_t a = smem_descriptor(q_wg + panel * BQ * kRowBytes + in_row, 16, kAtomBytes);
    const uint64_t b = smem_descriptor(kb + panel * BK * kRowBytes + in_row, 16, kAtomBytes);
    wgmma_ss<scalar_t, BK>(s, a, b, ks > 0);  // the first k step overwrites s
  }
}

// Issues (does not commit) O += P V for one warpgroup: key steps of 16, V
// (tile vb) MN-major, LBO = one 64-column panel of the tile (BK rows).
template <typename scalar_t, int HD, int BK>
__device__ __forceinline__ void issue_values(float (&o)[HD / 2], const uint32_t (&p)[BK / 16][4],
                                             uint32_t vb) {
#pragma unroll
  for (int kk = 0; kk < BK / 16; kk++) {
    const uint64_t b = smem_descriptor(vb + kk * 16 * kRowBytes, BK * kRowBytes, kAtomBytes);
    wgmma_rs<scalar_t, HD>(o, p[kk], b, 1);
  }
}

#endif  // NANOBLOCK_WGMMA_DEVICE

// One block: query tile qt (64 * WG queries) of one (batch, head); grid
// [query tiles x (B * n_head)], longest tiles first.
//
// Schedules (per warpgroup; tile kt lies in buffer kt % kBuffers, copied
// during iteration kt - 1, and every iteration starts with a block barrier):
//   serial:    S_kt = Q K_kt; wait; softmax; O *= c; O += P_kt V_kt; wait.
//   pipelined: S_kt issued, then O += P_{kt-1} V_{kt-1} issued; wait for
//              S_kt only (wait_group 1); softmax of S_kt while the tensor
//              cores run P V; wait for P V; O *= c_kt; P_kt kept for the
//              next iteration (one more iteration drains the last P V).
//              The copy made in iteration kt goes to buffer (kt + 1) % 3,
//              which last held tile kt - 2, whose P V every warpgroup waited
//              for in iteration kt - 1, before this iteration's barrier.
// A warpgroup takes part in every barrier and copy but skips the products
// for tiles wholly after its queries (tile kt >= my_tiles).
template <typename scalar_t, typename Tiles>
__global__ void __launch_bounds__(Tiles::kThreads, Tiles::kMinBlocks)
    wgmma_forward_kernel(const scalar_t* __restrict__ qkv, scalar_t* __restrict__ out,
                         float* __restrict__ lse, int T, int n_head, int64_t C,
                         float scale_log2) {
#if NANOBLOCK_WGMMA_DEVICE
  constexpr int HD = Tiles::kHeadDim, BK = Tiles::kKeys, BQ = Tiles::kQueries;
  constexpr int kThreads = Tiles::kThreads, kBuffers = Tiles::kBuffers;
  extern __shared__ unsigned char smem_raw[];
  // Shared-space addresses; every tile 1024-byte aligned (layout (a)).
  const uint32_t q_s = (shared_address(smem_raw) + kAtomBytes - 1) & ~uint32_t(kAtomBytes - 1);
  const uint32_t k_s = q_s + Tiles::kQBytes;              // [kBuffers] key tiles
  const uint32_t v_s = k_s + kBuffers * Tiles::kKvBytes;  // [kBuffers] value tiles

  const int tiles = (T + BQ - 1) / BQ;
  const int heads = static_cast<int>(gridDim.x) / tiles;  // B * n_head
  const int qt = tiles - 1 - static_cast<int>(blockIdx.x) / heads;  // longest rows first
  const int bh = static_cast<int>(blockIdx.x) % heads;
  const int b = bh / n_head, h = bh % n_head;
  const int wg = threadIdx.x / kWarpgroupThreads;
  const int warp = threadIdx.x % kWarpgroupThreads / 32, lane = threadIdx.x % 32;
  const int64_t row_stride = 3 * C;
  const scalar_t* head = qkv + static_cast<int64_t>(b) * T * row_stride + h * HD;

  const int q0 = qt * BQ;
  const int wg_q0 = q0 + kWarpgroupRows * wg;  // this warpgroup's first query
  const int row = wg_q0 + 16 * warp + lane / 4;  // this thread's rows: row, row + 8
  const int key_tiles = (min(q0 + BQ, T) - 1) / BK + 1;
  // Tiles this warpgroup multiplies (warpgroup-uniform): none when its rows
  // all lie past T, else up to the one holding its last row.
  const int my_tiles = wg_q0 >= T ? 0 : min(key_tiles, (wg_q0 + kWarpgroupRows - 1) / BK + 1);

  const auto key_buffer = [&](int kt) { return k_s + (kt % kBuffers) * Tiles::kKvBytes; };
  const auto value_buffer = [&](int kt) { return v_s + (kt % kBuffers) * Tiles::kKvBytes; };
  const auto copy_key_tile = [&](int kt) {
    copy_tile_async<BK, HD, kThreads>(key_buffer(kt), head + C, row_stride, kt * BK, T);
    copy_tile_async<BK, HD, kThreads>(value_buffer(kt), head + 2 * C, row_stride, kt * BK, T);
    copy_async_commit();
  };
  copy_tile_async<BQ, HD, kThreads>(q_s, head, row_stride, q0, T);
  copy_key_tile(0);  // one commit group with the query tile

  float s[BK / 2] = {};
  float o[HD / 2] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t p[BK / 16][4] = {};
  // This warpgroup's 64 rows of Q: panel p at q_s + p * BQ * 128 + wg * 64 * 128.
  const uint32_t q_wg = q_s + wg * kWarpgroupRows * kRowBytes;
  // Softmax of the scores now in s (tile kt): P in s, correction of the rows.
  const auto softmax = [&](int kt, float (&correction)[2]) {
    const int k0 = kt * BK;
    // The causal mask is needed where some key of the tile follows some
    // query of the warpgroup, or lies past T.
    const bool needs_mask = k0 + BK - 1 > wg_q0 || k0 + BK > T;
    online_softmax<BK>(s, m, l, row, k0, T, needs_mask, scale_log2, correction);
  };

  if constexpr (!Tiles::kPipelined) {
    for (int kt = 0; kt < key_tiles; kt++) {
      copy_async_wait_all_for_tensor_cores();
      __syncthreads();  // tile kt is in; both warpgroups are done with tile kt - 1
      if (kt + 1 < key_tiles) copy_key_tile(kt + 1);
      if (kt >= my_tiles) continue;

      keep_in_order(s);
      wgmma_fence();
      issue_scores<scalar_t, HD, BQ, BK>(s, q_wg, key_buffer(kt));
      wgmma_commit();
      wgmma_wait<0>();
      keep_in_order(s);

      float correction[2];
      softmax(kt, correction);
      rescale<HD>(o, correction);
      scores_to_a<scalar_t, BK>(p, s);

      keep_in_order(o);
      keep_in_order(p);
      wgmma_fence();
      issue_values<scalar_t, HD, BK>(o, p, value_buffer(kt));
      wgmma_commit();
      wgmma_wait<0>();
      keep_in_order(o);
    }
  } else {
    // Iteration kt: its barrier and copy (next_tile), then for this
    // warpgroup: kt = 0 S only; 0 < kt < my_tiles both products (step); kt =
    // my_tiles P V only (the drain); later ones nothing. Between the issue of
    // a product and the wait for it the code is straight-line (no branch that
    // ptxas could take for divergent, which makes it serialize the wgmmas):
    // the steps that need the causal mask run in a loop of their own.
    const auto next_tile = [&](int kt) {
      copy_async_wait_all_for_tensor_cores();
      __syncthreads();  // tile kt is in; buffer (kt + 1) % 3 is free (see above)
      if (kt + 1 < key_tiles) copy_key_tile(kt + 1);
    };
    const auto step = [&](int kt, auto mask) {  // S_kt and O += P_{kt-1} V_{kt-1}
      keep_in_order(s);
      keep_in_order(o);
      keep_in_order(p);
      wgmma_fence();
      issue_scores<scalar_t, HD, BQ, BK>(s, q_wg, key_buffer(kt));
      wgmma_commit();
      issue_values<scalar_t, HD, BK>(o, p, value_buffer(kt - 1));
      wgmma_commit();
      wgmma_wait<1>();  // S_kt is done; P V may still run
      keep_in_order(s);
      float correction[2];
      online_softmax<BK>(s, m, l, row, kt * BK, T, decltype(mask)::value, scale_log2, correction);
      wgmma_wait<0>();  // P_{kt-1} V_{kt-1} is in o; p is free
      keep_in_order(o);
      rescale<HD>(o, correction);
      scores_to_a<scalar_t, BK>(p, s);
    };
    next_tile(0);
    if (my_tiles > 0) {
      keep_in_order(s);
      wgmma_fence();
      issue_scores<scalar_t, HD, BQ, BK>(s, q_wg, key_buffer(0));
      wgmma_commit();
      wgmma_wait<0>();
      keep_in_order(s);
      float correction[2];  // o is still 0: nothing to rescale
      softmax(0, correction);
      scores_to_a<scalar_t, BK>(p, s);
    }
    // Tiles before first_masked lie wholly at or before this warpgroup's
    // first query (and so before T): (kt + 1) * BK <= wg_q0 + 1.
    const int first_masked = min(my_tiles, (wg_q0 + 1) / BK);
    int kt = 1;
    for (; kt < first_masked; kt++) {
      next_tile(kt);
      step(kt, std::false_type{});
    }
    for (; kt < my_tiles; kt++) {
      next_tile(kt);
      step(kt, std::true_type{});
    }
    if (my_tiles > 0) {  // the drain, in iteration kt = my_tiles
      if (kt < key_tiles) next_tile(kt);
      kt++;
      keep_in_order(o);
      keep_in_order(p);
      wgmma_fence();
      issue_values<scalar_t, HD, BK>(o, p, value_buffer(my_tiles - 1));
      wgmma_commit();
      wgmma_wait<0>();
      keep_in_order(o);
    }
    for (; kt < key_tiles; kt++) next_tile(kt);  // every thread: key_tiles barriers
  }

  // Normalize, write out (layout (b): columns 8j + 2t, 8j + 2t + 1 of rows
  // row and row + 8) and lse (natural log).
  const int t = lane % 4;
  scalar_t* out_head = out + static_cast<int64_t>(b) * T * C + h * HD;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    l[i] = quad_sum(l[i]);  // before the branch: all 32 lanes take part
    const int r = row + 8 * i;
    if (r >= T) continue;
    const float inv = 1.f / l[i];
    if (t == 0) lse[static_cast<int64_t>(bh) * T + r] = row_lse(m[i], l[i], scale_log2);
    scalar_t* dst = out_head + static_cast<int64_t>(r) * C + 2 * t;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
      *reinterpret_cast<uint32_t*>(dst + 8 * j) =
          pack2<scalar_t>(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
    }
  }
#endif  // NANOBLOCK_WGMMA_DEVICE
}

// ---------------------------------------------------------------------------
// Launchers.

template <typename scalar_t, typename Tiles>
void launch_wgmma_forward(const Tensor& qkv, int64_t n_head, const Tensor& out, const Tensor& lse,
                          float scale_log2) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  if (B * T == 0) return;
  const size_t smem = Tiles::kSharedBytes;
  auto kernel = wgmma_forward_kernel<scalar_t, Tiles>;
  allow_shared_memory(kernel, smem);
  kernel<<<B * n_head * ceil_div(T, Tiles::kQueries), Tiles::kThreads, smem, current_stream()>>>(
      qkv.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
      lse.mutable_data_ptr<float>(), static_cast<int>(T), static_cast<int>(n_head), C,
      scale_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A tile shape asked for by name (wgmma_attention_forward_tiles).
struct TileChoice {
  int64_t key_tile, warpgroups;
  bool pipelined;
};

// Launches the first of Tiles... that `want` names; false when none does.
template <typename scalar_t, typename... Tiles>
bool launch_matching(const TileChoice& want, const Tensor& qkv, int64_t n_head, const Tensor& out,
                     const Tensor& lse, float scale_log2) {
  const auto matches = [&](auto tiles) {
    using Shape = decltype(tiles);
    return want.key_tile == Shape::kKeys && want.warpgroups * kWarpgroupRows == Shape::kQueries &&
           want.pipelined == Shape::kPipelined;
  };
  return ((matches(Tiles{}) &&
           (launch_wgmma_forward<scalar_t, Tiles>(qkv, n_head, out, lse, scale_log2), true)) ||
          ...);
}

// The tile shapes built, per head dim; the first of each list is the
// default. Not yet timed on a GPU: scripts/try_wgmma.py times them all.
template <typename scalar_t>
bool launch_built(int64_t hd, const TileChoice& want, const Tensor& qkv, int64_t n_head,
                  const Tensor& out, const Tensor& lse, float scale_log2) {
  if (hd == 64) {
    return launch_matching<scalar_t, WgmmaTiles<64, 128, 2, 1, false>,
                           WgmmaTiles<64, 128, 2, 1, true>, WgmmaTiles<64, 64, 2, 2, false>,
                           WgmmaTiles<64, 128, 1, 2, false>>(want, qkv, n_head, out, lse,
                                                              scale_log2);
  }
  return launch_matching<scalar_t, WgmmaTiles<128, 64, 2, 1, false>,
                         WgmmaTiles<128, 64, 2, 1, true>, WgmmaTiles<128, 128, 2, 1, false>,
                         WgmmaTiles<128, 128, 2, 1, true>>(want, qkv, n_head, out, lse,
                                                            scale_log2);
}

}  // namespace

bool wgmma_attention_available() {
  // Asked once per process: the device's capability and whether the kernels
  // were compiled with wgmma (an sm_90a build).
  static const bool available = [] {
    int device = 0, major = 0, minor = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    if (major != 9 || minor != 0) return false;
    const Tensor built = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device));
    wgmma_probe_kernel<<<1, 1, 0, current_stream()>>>(built.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return built.item<int>() == 1;
  }();
  return available;
}

std::tuple<Tensor, Tensor> wgmma_attention_forward_tiles(const Tensor& qkv_in, int64_t n_head,
                                                         int64_t key_tile, int64_t warpgroups,
                                                         bool pipelined) {
  NANOBLOCK_CHECK(qkv_in.is_cuda() && qkv_in.dim() == 3,
                  "wgmma_attention_forward: qkv must be a 3-d CUDA tensor [B, T, 3C]");
  const auto dtype = qkv_in.scalar_type();
  NANOBLOCK_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
                  "wgmma_attention_forward: qkv must be float16 or bfloat16");
  NANOBLOCK_CHECK(n_head > 0 && qkv_in.size(2) % (3 * n_head) == 0,
                  "wgmma_attention_forward: last dim ", qkv_in.size(2),
                  " is not 3 * n_head * head_dim for n_head ", n_head);
  const int64_t B = qkv_in.size(0), T = qkv_in.size(1), C = qkv_in.size(2) / 3;
  const int64_t hd = C / n_head;
  NANOBLOCK_CHECK(hd == 64 || hd == 128, "wgmma_attention_forward: head dim ", hd,
                  " (only 64 and 128 are built)");
  NANOBLOCK_CHECK(T < (int64_t{1} << 31), "wgmma_attention_forward: T too large");
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  NANOBLOCK_CHECK(wgmma_attention_available(),
                  "wgmma_attention_forward: needs a compute capability 9.0 GPU and a build for "
                  "sm_90a (-gencode=arch=compute_90a,code=sm_90a)");
  const Tensor qkv = qkv_in.contiguous();
  NANOBLOCK_CHECK(reinterpret_cast<uintptr_t>(qkv.const_data_ptr()) % 16 == 0,
                  "wgmma_attention_forward: qkv must be 16-byte aligned");
  Tensor out = at::empty({B, T, C}, qkv.options());
  Tensor lse = at::empty({B, n_head, T}, qkv.options().dtype(at::kFloat));
  const float scale_log2 = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd))) * kLog2e;
  const TileChoice want{key_tile, warpgroups, pipelined};
  const bool launched =
      dtype == at::kBFloat16
          ? launch_built<at::BFloat16>(hd, want, qkv, n_head, out, lse, scale_log2)
          : launch_built<at::Half>(hd, want, qkv, n_head, out, lse, scale_log2);
  NANOBLOCK_CHECK(launched, "wgmma_attention_forward: no kernel built for head dim ", hd,
                  " with key tile ", key_tile, ", ", warpgroups, " warpgroups, ",
                  pipelined ? "pipelined" : "serial");
  return {out, lse};
}

std::tuple<Tensor, Tensor> wgmma_attention_forward(const Tensor& qkv, int64_t n_head) {
  const int64_t hd = qkv.dim() == 3 && n_head > 0 ? qkv.size(2) / 3 / n_head : 0;
  return wgmma_attention_forward_tiles(qkv, n_head, hd == 128 ? 64 : 128, 2, false);
}

}  // namespace nanoblock::cuda
