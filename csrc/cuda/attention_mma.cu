// Causal attention on the tensor cores, for float16 / bfloat16 and head dims
// 32, 64, 80, 96, 128: the same computation as the generic path in
// attention.cu (read that file's header first), with every matrix product
// done by mma.sync.m16n8k16 (fp16/bf16 operands, float32 accumulators).
//
//   forward  [grid: query tiles x (B * n_head)]  S = q k^T, online softmax,
//            out = P v  -> out [B, T, C], lse [B, n_head, T]
//   grad_kv  [grid: key tiles x (B * n_head)]    walks query tiles from the
//            diagonal on: dv += P^T dO, dk += dS^T q
//   grad_q   [grid: query tiles x (B * n_head)]  walks key tiles up to the
//            diagonal: dq += dS k
// Each output element is owned by one thread and summed in a fixed order:
// deterministic, no atomics. Blocks take their (tile, head) from block_tile
// (tensor_core.cuh): the blocks with the most work first, within groups of
// heads whose streamed operand (k and v; q and dO in grad_kv) L2 holds.
//
// A block is 4 warps; each warp owns 16 (or 32) rows of the block's tile:
// queries in the forward and grad_q, keys in grad_kv. The other operand
// streams through shared memory in tiles that are copied asynchronously
// (cp.async) into two buffers: tile i + 1 is in flight while tile i is used.
//
// Fragment layout of m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16 (row major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
//                        a3 = (g+8, 2t+8..), two 16-bit values per register;
//   B 16x8 (k x n):      b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t+8.., n = g);
//   C 16x8 (float):      c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1).
// Fragments come from shared memory by ldmatrix; a B operand stored with its
// n index along rows ([n][k]: k in q k^T) is read as is, one stored with k
// along rows ([k][n]: v in P v) through ldmatrix's transpose, so every tile
// is kept once, row major, as it lies in global memory. Rows are padded by 8
// elements (16 bytes) so the 8 row addresses of an ldmatrix hit 8 different
// 16-byte bank groups.
// The C layout of two neighbouring 8-column tiles is the A layout of one
// 16-wide k step, so probabilities (and dS) go from the score accumulators
// straight into the next product without shared memory.
//
// Scores are kept in the log2 domain (scaled by scale * log2 e) and
// exponentiated with exp2_approx (common.cuh); lse is written and read
// in natural log units. The backward's dS = P o (dP - D) leaves the softmax
// scale out: dk and dq take it once, when stored (dk = dS^T q scale,
// dq = dS k scale; dv = P^T dO takes none), as attention_wgmma_backward.cu
// does: a multiply a score less. dS is rounded to 16 bits unscaled, so the
// bits match scaling it first only where the scale is a power of two (head
// dim 64, away from float16's subnormal range).
//
// The causal mask (keys after the query, or at or past T) touches only the
// tiles on a warp's diagonal and the tiles that cross T. So each kernel's
// loop over a tile's elements (mask and online softmax in the forward, P
// and dS in the backward) is a lambda that takes std::true_type (with the
// mask) or std::false_type (without it: not one compare), as the wgmma
// forward's tiles do (for_each_key_tile, wgmma.cuh). A run-time test of
// every element, even when false, cost the tile its compares and selects:
// at head dim 80 (bfloat16, sm_90a) an unmasked forward tile ran 492
// instructions from its first product to its last, 367 without the test
// (53 ISETP, 34 FSEL and 32 PLOP3 fewer; 80 HMMA both). grad_q with
// dropout keeps the run-time test (see there). Masking an element that needs
// no mask changes no bit, so which tiles take the masked loop leaves the
// results as they were.
//
// Dropout (each kernel's DROPOUT flag; attention.cu's header has the math):
// every probability a thread holds is multiplied by its multiplier Z (0 or
// 1 / (1 - p)), made from its (query, key) (DeviceMask, common.cuh): the
// same (query, key) as the causal mask's. A thread makes the keep bits of
// its fragments of a tile before the tile's products (fragment_keep_bits:
// fewer registers are live there) and applies them where the causal mask is
// applied. In the forward and grad_q a fragment holds keys key, key + 1 of
// a query, neighbours in the mask, so a pair takes one Philox call (two
// where it straddles a group of four); grad_kv's transposed fragments hold
// queries q, q + 1 of a key, T apart in the mask, one Philox call each.
#include "../check.h"
#include "attention_mma.cuh"
#include "tensor_core.cuh"

#include <cstdlib>
#include <type_traits>

namespace nanoblock::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// ---------------------------------------------------------------------------
// Primitives (asynchronous copies and 16-bit packing: tensor_core.cuh),
// ldmatrix, mma.

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
}

template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// c += a * (the two 8-wide n tiles in b): b[0..1] is n tile 0, b[2..3] n tile 1.
template <typename scalar_t>
__device__ __forceinline__ void mma_pair(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[4]) {
  mma_16816<scalar_t>(c0, a, b[0], b[1]);
  mma_16816<scalar_t>(c1, a, b[2], b[3]);
}

// Probabilities (or dS) of two neighbouring C tiles as the A fragment of one
// 16-wide k step.
template <typename scalar_t>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<scalar_t>(lo[0], lo[1]);
  a[1] = pack2<scalar_t>(lo[2], lo[3]);
  a[2] = pack2<scalar_t>(hi[0], hi[1]);
  a[3] = pack2<scalar_t>(hi[2], hi[3]);
}

// Fragments from a shared tile with row stride STRIDE (elements):
// the A fragment of rows row0..row0+15, columns col0..col0+15;
template <int STRIDE, typename scalar_t>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const scalar_t* tile, int row0, int col0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, tile + (row0 + lane % 16) * STRIDE + col0 + (lane / 16) * 8);
}
// the B fragments of n tiles n0.., n0+8.. over k = k0..k0+15, from a tile
// stored [n][k] (rows are n);
template <int STRIDE, typename scalar_t>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const scalar_t* tile, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(b, tile + (n0 + (lane / 16) * 8 + lane % 8) * STRIDE + k0 + (lane / 8 % 2) * 8);
}
// the same from a tile stored [k][n] (rows are k), transposed by ldmatrix.
template <int STRIDE, typename scalar_t>
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[4], const scalar_t* tile, int k0,
                                             int n0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(b, tile + (k0 + (lane / 8 % 2) * 8 + lane % 8) * STRIDE + n0 + (lane / 16) * 8);
}

// Starts copying rows first .. first + ROWS - 1 (zeros at or past T) of one
// head's HD columns, rows row_stride apart in global memory, into the shared
// tile dst [ROWS][HD + 8]. Neighbouring threads take neighbouring 16-byte
// chunks of a row (coalesced), in rounds counted at compile time
// (copy_row_values_async, tensor_core.cuh, says why). Unrolled at every
// head dim: at 80 the forward then holds 196 registers instead of 161-168
// (2 blocks an SM instead of 3), yet the rolled copies (unroll 1) ran it
// 3.5% slower at head dims 80 and 96 (H200, session 11).
template <int ROWS, int HD, typename scalar_t>
__device__ __forceinline__ void copy_tile_async(scalar_t* dst, const scalar_t* src,
                                                int64_t row_stride, int first, int T) {
  constexpr int kChunks = HD / 8;
  constexpr int kRounds = (ROWS * kChunks + kThreads - 1) / kThreads;
#pragma unroll
  for (int round = 0; round < kRounds; round++) {
    const int idx = round * kThreads + static_cast<int>(threadIdx.x);
    // The last round is not whole at 32 rows of head dim 80 (320 chunks).
    if (ROWS * kChunks % kThreads != 0 && idx >= ROWS * kChunks) break;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = first + r < T;
    const scalar_t* from = valid ? src + static_cast<int64_t>(first + r) * row_stride + c * 8 : src;
    copy_async_16(dst + r * (HD + 8) + c * 8, from, valid);
  }
}

// Starts copying key tile kt (rows kt * ROWS ..) of one head's k and v (at
// head + C and head + 2 C) into buffer kt % 2 of k_s, v_s [2][ROWS][HD + 8],
// as one commit group.
template <int ROWS, int HD, typename scalar_t>
__device__ __forceinline__ void copy_key_tile_async(scalar_t* k_s, scalar_t* v_s,
                                                    const scalar_t* head, int64_t row_stride,
                                                    int64_t C, int kt, int T) {
  const int buffer = (kt % 2) * ROWS * (HD + 8);
  copy_tile_async<ROWS, HD>(k_s + buffer, head + C, row_stride, kt * ROWS, T);
  copy_tile_async<ROWS, HD>(v_s + buffer, head + 2 * C, row_stride, kt * ROWS, T);
  copy_async_commit();
}

// Writes the fragment rows `row` (g) and `row + 8` of a [16][HD] float
// accumulator held as acc[HD / 8][4] into dst (rows row_stride apart), as
// 16-bit values; rows at or past T are skipped.
template <typename scalar_t, int HD>
__device__ __forceinline__ void store_rows(scalar_t* dst, int64_t row_stride, int row, int T,
                                           const float (&acc)[HD / 8][4], float scale0 = 1.f,
                                           float scale1 = 1.f) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int half = 0; half < 2; half++) {
    if (row + 8 * half >= T) continue;
    const float scale = half == 0 ? scale0 : scale1;
    scalar_t* p = dst + static_cast<int64_t>(row + 8 * half) * row_stride + 2 * t;
#pragma unroll
    for (int nd = 0; nd < HD / 8; nd++) {
      *reinterpret_cast<uint32_t*>(p + nd * 8) =
          pack2<scalar_t>(acc[nd][2 * half] * scale, acc[nd][2 * half + 1] * scale);
    }
  }
}

// ---------------------------------------------------------------------------
// NaN and Inf on the diagonal. A masked probability (or dS) is an exact 0,
// but a product that includes it still multiplies the other operand's row of
// a later position (v, dO, q or k) inside the mma: 0 x NaN is NaN, and a
// NaN or Inf would reach earlier positions. Only the 16 x 16 chunks on the
// diagonal mix masked and visible pairs: the chunks past it, all masked, are
// skipped (acc is unchanged by a zero product, so skipping changes no bit).
// So on a diagonal tile a warp first checks the rows of b that its diagonal
// chunks read (rows_finite, a vote); while they are finite, nothing else
// changes. Otherwise (rare) it finds, in scalar code out of line, the kind
// of the products of each non-finite value with the probabilities of the
// rows that see it (nonfinite_products), runs the chunks' products with
// those values replaced by 0, and adds a value of that kind: the rows that
// do not see them get the bits of a run where they were finite, the rows
// that do get a non-finite sum whose kind (NaN, +Inf, -Inf) is the exact one
// whatever the order.
//
// Coordinates are the tile's: chunk (slice mi, k step kk) pairs rows
// 16 (diag + mi) .. (the warp's rows, numbered as columns of the tile) with
// columns 16 kk ..; diag is the k step of slice 0's diagonal chunk. Row r
// sees column c when c <= r (rows are queries: forward, grad_q), or when
// c >= r (TRANSPOSED, rows are keys: grad_kv).

// Whether rows first .. first + ROWS - 1 of a shared tile [*][S] (HD
// columns) are all finite, voted over the warp (accumulate_nonfinite).
template <int ROWS, int HD, int S, typename scalar_t>
__device__ __forceinline__ bool rows_finite(const scalar_t* tile, int first) {
  constexpr int kChunks = HD / 8;  // 16 bytes each
  const int lane = threadIdx.x % 32;
  static_assert(ROWS * kChunks % 32 == 0, "whole loads per lane");
  uint32_t acc = 0;
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / 32; i++) {
    const int idx = lane + 32 * i;
    const uint4 w = *reinterpret_cast<const uint4*>(tile + (first + idx / kChunks) * S +
                                                    idx % kChunks * 8);
    acc = accumulate_nonfinite<scalar_t>(acc, w);
  }
  return !__any_sync(0xffffffffu, acc != 0u);
}

// Which chunks of a tile accumulate_product multiplies: all, or on a
// diagonal tile those with a visible pair, with (the slow path) or without
// the non-finite values of b in the diagonal k steps diag .. diag + M - 1
// replaced by 0.
enum class Chunks { kAll, kVisible, kVisibleSanitized };

// acc += P B for one warp's M slices of 16 rows: P [16 M][K] held as score
// accumulators (C fragments, rounded to 16 bits on the way into the A
// operand), B a shared tile [K][S] (k along rows, read transposed), acc
// [16 M][HD]: out += P v in the forward, dq += dS k, dv += P^T dO and
// dk += dS^T q in the backward. Chunk (mi, kk) has a visible pair when
// kk <= diag + mi (TRANSPOSED: >=).
template <int M, int K, int HD, int S, Chunks CHUNKS = Chunks::kAll, bool TRANSPOSED = false,
          typename scalar_t>
__device__ __forceinline__ void accumulate_product(float (&acc)[M][HD / 8][4],
                                                   const float (&p)[M][K / 8][4],
                                                   const scalar_t* b, int diag = 0) {
  constexpr bool kAll = CHUNKS == Chunks::kAll;
#pragma unroll
  for (int kk = 0; kk < K / 16; kk++) {
    if (!kAll && (TRANSPOSED ? kk < diag : kk > diag + M - 1)) continue;  // all masked
    uint32_t pa[M][4];
#pragma unroll
    for (int mi = 0; mi < M; mi++) c_to_a<scalar_t>(pa[mi], p[mi][2 * kk], p[mi][2 * kk + 1]);
#pragma unroll
    for (int np = 0; np < HD / 16; np++) {
      uint32_t fb[4];
      load_b_trans<S>(fb, b, kk * 16, np * 16);
      if (CHUNKS == Chunks::kVisibleSanitized && kk >= diag && kk < diag + M) {
#pragma unroll
        for (int i = 0; i < 4; i++) fb[i] = zero_nonfinite<scalar_t>(fb[i]);
      }
#pragma unroll
      for (int mi = 0; mi < M; mi++) {
        if (kAll || (TRANSPOSED ? kk >= diag + mi : kk <= diag + mi)) {
          mma_pair<scalar_t>(acc[mi][2 * np], acc[mi][2 * np + 1], pa[mi], fb);
        }
      }
    }
  }
}

// The slow path's scalar part, kept out of line (__noinline__, its
// arguments and result by value) so that its registers do not add to the
// kernel's: the kind (kNone, kNaN, kPlusInf, kMinusInf) of the sum of
// p[row][c] * b[c][d] over the non-finite b[c][d] of the diagonal k steps
// that row sees, for each element of acc that the thread holds (element i
// of acc[mi][nd] has index (mi * HD / 8 + nd) * 4 + i), 2 bits each. The sum
// of non-finite values has the same kind in any order (NaN where any is NaN
// or both infinities meet), so adding one value of that kind to acc gives
// the exact kind of acc + the sum (merge_kind, add_kind: tensor_core.cuh).
// p[row][c] is held by lane 4 g + (c % 8) / 2 of the row's quad.
template <int M, int K>
struct Fragments {
  float p[M][K / 8][4];
};

template <int M, int HD>
struct Kinds {
  uint32_t bits[(M * HD + 31) / 32];  // M * HD / 8 * 4 elements, 2 bits each
};

template <int M, int K, int HD, int S, bool TRANSPOSED, typename scalar_t>
__device__ __noinline__ Kinds<M, HD> nonfinite_products(const Fragments<M, K> f,
                                                        const scalar_t* b, int diag) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  Kinds<M, HD> kinds = {};
  for (int c = 16 * diag; c < 16 * (diag + M); c++) {
    float pc[M][2];  // p of rows g, g + 8 of each slice at column c
    for (int mi = 0; mi < M; mi++) {
      for (int h = 0; h < 2; h++) {
        pc[mi][h] = __shfl_sync(0xffffffffu, f.p[mi][c / 8][2 * h + (c & 1)], 4 * g + c % 8 / 2);
      }
    }
    for (int nd = 0; nd < HD / 8; nd++) {
      const float2 v2 = unpack2<scalar_t>(
          *reinterpret_cast<const uint32_t*>(b + c * S + nd * 8 + 2 * t));
      for (int e = 0; e < 2; e++) {
        const float v = e == 0 ? v2.x : v2.y;
        if (isfinite(v)) continue;
        for (int mi = 0; mi < M; mi++) {
          for (int h = 0; h < 2; h++) {
            const int row = 16 * (diag + mi) + g + 8 * h;
            if (TRANSPOSED ? c < row : c > row) continue;  // row does not see c
            const float x = pc[mi][h] * v;
            merge_kind(kinds.bits, (mi * HD / 8 + nd) * 4 + 2 * h + e, x);
          }
        }
      }
    }
  }
  return kinds;
}

// acc += P b on a tile whose diagonal k step is diag (see above), exact for
// non-finite values in b.
template <int M, int K, int HD, int S, bool TRANSPOSED, typename scalar_t>
__device__ __forceinline__ void accumulate_product_causal(float (&acc)[M][HD / 8][4],
                                                          const float (&p)[M][K / 8][4],
                                                          const scalar_t* b, int diag) {
  if (rows_finite<16 * M, HD, S>(b, 16 * diag)) {
    accumulate_product<M, K, HD, S, Chunks::kVisible, TRANSPOSED>(acc, p, b, diag);
    return;
  }
  Fragments<M, K> f;
#pragma unroll
  for (int mi = 0; mi < M; mi++)
#pragma unroll
    for (int nt = 0; nt < K / 8; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) f.p[mi][nt][e] = p[mi][nt][e];
  const Kinds<M, HD> kinds = nonfinite_products<M, K, HD, S, TRANSPOSED>(f, b, diag);
  accumulate_product<M, K, HD, S, Chunks::kVisibleSanitized, TRANSPOSED>(acc, p, b, diag);
#pragma unroll
  for (int mi = 0; mi < M; mi++) {
#pragma unroll
    for (int nd = 0; nd < HD / 8; nd++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        add_kind(acc[mi][nd][e], kinds.bits, (mi * HD / 8 + nd) * 4 + e);
      }
    }
  }
}

// Dropout of the probabilities of head bh that a thread holds as the C
// fragments of one warp's M slices of 16 rows by TILES 8-wide n tiles:
// element e of tile nt of slice mi is at row row0 + 16 mi + 8 (e >> 1),
// column col0 + 8 nt + (e & 1) (row0 = the warp's first row + g, col0 = the
// tile's first column + 2 t). Rows are queries and columns keys (forward,
// grad_q), or the transpose (grad_kv). Sets bit 4 nt + e of bits[mi] when
// that element is kept.
template <int M, int TILES, bool ROWS_ARE_QUERIES>
__device__ __forceinline__ void fragment_keep_bits(uint32_t (&bits)[M], const DeviceMask& mask,
                                                   int bh, int T, int row0, int col0) {
  static_assert(TILES * 4 <= 32, "one bit per element in a 32-bit word");
#pragma unroll
  for (int mi = 0; mi < M; mi++) {
    bits[mi] = 0;
#pragma unroll 1
    for (int nt = 0; nt < TILES; nt++) {
#pragma unroll
      for (int half = 0; half < 2; half++) {
        const int row = row0 + 16 * mi + 8 * half, col = col0 + 8 * nt;
        bool keep[2];
        if constexpr (ROWS_ARE_QUERIES) {  // keys col, col + 1: neighbours in the mask
          mask.kept(probability_index(bh, T, row, col), keep);
        } else {  // queries col, col + 1 of key row: T apart in the mask
          keep[0] = mask.kept(probability_index(bh, T, col, row));
          keep[1] = mask.kept(probability_index(bh, T, col + 1, row));
        }
        bits[mi] |= (static_cast<uint32_t>(keep[0]) | static_cast<uint32_t>(keep[1]) << 1)
                    << (4 * nt + 2 * half);
      }
    }
  }
}

// The multiplier of element e of n tile nt under fragment_keep_bits' bits:
// keep_scale = 1 / (1 - p) when kept, else 0.
__device__ __forceinline__ float fragment_multiplier(uint32_t bits, int nt, int e,
                                                     float keep_scale) {
  return (bits >> (4 * nt + e)) & 1u ? keep_scale : 0.f;
}

// ---------------------------------------------------------------------------
// Forward. A warp owns SLICES x 16 queries; key tiles of 64.
template <int HD, int SLICES>
struct ForwardShape {
  static constexpr int kSlices = SLICES;  // 16-query slices per warp
  static constexpr int kQueries = kWarps * 16 * kSlices;
  static constexpr int kKeys = 64;
  static constexpr int kStride = HD + 8;
  // q [kQueries][kStride], k and v [2][kKeys][kStride] (two buffers each)
  static constexpr int kSharedElements = kStride * (kQueries + 4 * kKeys);
};

template <typename scalar_t, int HD, typename Shape, bool DROPOUT>
__global__ void __launch_bounds__(kThreads)
    mma_forward_kernel(const scalar_t* __restrict__ qkv, scalar_t* __restrict__ out,
                       float* __restrict__ lse, int T, int n_head, int64_t C, float scale_log2,
                       DropoutArgs dropout) {
  constexpr int M = Shape::kSlices, BQ = Shape::kQueries, BK = Shape::kKeys, S = Shape::kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* q_s = reinterpret_cast<scalar_t*>(smem_raw);  // [BQ][S]
  scalar_t* k_s = q_s + BQ * S;                             // [2][BK][S]
  scalar_t* v_s = k_s + 2 * BK * S;                         // [2][BK][S]

  const int tiles = (T + BQ - 1) / BQ;
  const BlockTile place = block_tile(tiles, T, HD);
  const int qt = tiles - 1 - place.rank;  // longest rows first
  const int bh = place.bh;
  const int b = bh / n_head, h = bh % n_head;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t row_stride = 3 * C;
  const scalar_t* head = qkv + static_cast<int64_t>(b) * T * row_stride + h * HD;

  const int q0 = qt * BQ;
  const int warp_q0 = q0 + warp * 16 * M;  // this warp's first query
  const int key_tiles = (min(q0 + BQ, T) - 1) / BK + 1;
  const DeviceMask mask(dropout, DROPOUT);
  const float keep_scale = static_cast<float>(dropout.scale);

  copy_tile_async<BQ, HD>(q_s, head, row_stride, q0, T);
  copy_key_tile_async<BK, HD>(k_s, v_s, head, row_stride, C, 0, T);

  uint32_t qa[M][HD / 16][4];
  float o[M][HD / 8][4] = {};
  // Row maxima (of raw scores) and partial row sums of rows g and g + 8 of each slice.
  float m[M][2], l[M][2] = {};
#pragma unroll
  for (int mi = 0; mi < M; mi++) m[mi][0] = m[mi][1] = -INFINITY;

  for (int kt = 0; kt < key_tiles; kt++) {
    copy_async_wait_all();
    __syncthreads();  // tile kt is in; everyone is done with tile kt - 1
    if (kt == 0) {
#pragma unroll
      for (int mi = 0; mi < M; mi++)
#pragma unroll
        for (int ks = 0; ks < HD / 16; ks++) load_a<S>(qa[mi][ks], q_s, (warp * M + mi) * 16, ks * 16);
    }
    if (kt + 1 < key_tiles) copy_key_tile_async<BK, HD>(k_s, v_s, head, row_stride, C, kt + 1, T);
    const int k0 = kt * BK;
    if (k0 > warp_q0 + 16 * M - 1) continue;  // the whole tile is after this warp's queries
    const scalar_t* kb = k_s + (kt % 2) * BK * S;
    const scalar_t* vb = v_s + (kt % 2) * BK * S;
    uint32_t keep[M];  // dropout: made before the products, while fewer registers are live
    if constexpr (DROPOUT) {
      fragment_keep_bits<M, BK / 8, true>(keep, mask, bh, T, warp_q0 + g, k0 + 2 * t);
    }

    float s[M][BK / 8][4] = {};
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++) {
#pragma unroll
      for (int np = 0; np < BK / 16; np++) {
        uint32_t bk[4];
        load_b<S>(bk, kb, np * 16, ks * 16);
#pragma unroll
        for (int mi = 0; mi < M; mi++) mma_pair<scalar_t>(s[mi][2 * np], s[mi][2 * np + 1], qa[mi][ks], bk);
      }
    }

    // Causal mask, then the online softmax. A row lives in the 4 lanes of a
    // quad. Only the tiles where some key follows some query of the warp, or
    // lies past T, need the mask; the others run the loop without it (see
    // the header).
    const auto online_softmax = [&](auto with_mask) {
#pragma unroll
      for (int mi = 0; mi < M; mi++) {
        const int row0 = warp_q0 + mi * 16 + g;
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
          for (int e = 0; e < 4; e++) {
            if constexpr (decltype(with_mask)::value) {
              const int key = k0 + nt * 8 + 2 * t + (e & 1);
              if (key > row0 + 8 * (e >> 1) || key >= T) s[mi][nt][e] = -INFINITY;
            }
            tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[mi][nt][e]);
          }
        }
        float m_scaled[2], correction[2];
        update_row_max(tile_max, m[mi], l[mi], scale_log2, m_scaled, correction);
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
          for (int e = 0; e < 4; e++) {
            s[mi][nt][e] = exp2_approx(fmaf(s[mi][nt][e], scale_log2, -m_scaled[e >> 1]));
            l[mi][e >> 1] += s[mi][nt][e];
          }
        }
        if constexpr (DROPOUT) {  // o sums (P o Z) v; l (so lse) stays the sum of P
#pragma unroll
          for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {  // x 0 keeps a NaN, as on the CPU
              s[mi][nt][e] *= fragment_multiplier(keep[mi], nt, e, keep_scale);
            }
          }
        }
#pragma unroll
        for (int nd = 0; nd < HD / 8; nd++) {
          o[mi][nd][0] *= correction[0];
          o[mi][nd][1] *= correction[0];
          o[mi][nd][2] *= correction[1];
          o[mi][nd][3] *= correction[1];
        }
      }
    };
    if (k0 + BK - 1 > warp_q0 || k0 + BK > T) {
      online_softmax(std::true_type{});
    } else {
      online_softmax(std::false_type{});
    }

    if (warp_q0 < k0 + BK) {  // o += P v; this tile holds the warp's diagonal
      accumulate_product_causal<M, BK, HD, S, false>(o, s, vb, (warp_q0 - k0) / 16);
    } else {
      accumulate_product<M, BK, HD, S>(o, s, vb);
    }
  }

  // Normalize, write out and lse (natural log).
  scalar_t* out_head = out + static_cast<int64_t>(b) * T * C + h * HD;
#pragma unroll
  for (int mi = 0; mi < M; mi++) {
    const int row0 = warp_q0 + mi * 16 + g;
    float inv[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
      l[mi][i] = quad_sum(l[mi][i]);
      inv[i] = 1.f / l[mi][i];
      const int row = row0 + 8 * i;
      if (t == 0 && row < T) {
        lse[static_cast<int64_t>(bh) * T + row] = row_lse(m[mi][i], l[mi][i], scale_log2);
      }
    }
    store_rows<scalar_t, HD>(out_head, C, row0, T, o[mi], inv[0], inv[1]);
  }
}

// The two score-like products of the backward for one warp's M slices of 16
// rows (row0..): c1 += A1 B1^T and c2 += A2 B2^T over k = 0..HD-1, with A1,
// A2 rows of shared tiles [*][S] and B1, B2 shared tiles [N][S] (n = rows):
// S = q k^T and dP = dO v^T in grad_q, their transposes in grad_kv.
template <int M, int N, int HD, int S, typename scalar_t>
__device__ __forceinline__ void two_products(float (&c1)[M][N / 8][4], float (&c2)[M][N / 8][4],
                                             const scalar_t* a1, const scalar_t* a2, int row0,
                                             const scalar_t* b1, const scalar_t* b2) {
#pragma unroll
  for (int ks = 0; ks < HD / 16; ks++) {
    uint32_t f1[M][4], f2[M][4];
#pragma unroll
    for (int mi = 0; mi < M; mi++) {
      load_a<S>(f1[mi], a1, row0 + mi * 16, ks * 16);
      load_a<S>(f2[mi], a2, row0 + mi * 16, ks * 16);
    }
#pragma unroll
    for (int np = 0; np < N / 16; np++) {
      uint32_t g1[4], g2[4];
      load_b<S>(g1, b1, np * 16, ks * 16);
#pragma unroll
      for (int mi = 0; mi < M; mi++) mma_pair<scalar_t>(c1[mi][2 * np], c1[mi][2 * np + 1], f1[mi], g1);
      load_b<S>(g2, b2, np * 16, ks * 16);
#pragma unroll
      for (int mi = 0; mi < M; mi++) mma_pair<scalar_t>(c2[mi][2 * np], c2[mi][2 * np + 1], f2[mi], g2);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward, dk and dv: one block per key tile (a warp owns SLICES x 16
// keys), query tiles of QUERIES from the diagonal on. The products run
// transposed (keys as rows): S^T = k q^T, dP^T = v dO^T, then dv += P^T dO,
// dk += dS^T q.
template <int HD, int SLICES, int QUERIES>
struct GradKvShape {
  static constexpr int kSlices = SLICES;
  static constexpr int kKeys = kWarps * 16 * SLICES;
  static constexpr int kQueries = QUERIES;  // per query tile
  static constexpr int kStride = HD + 8;
  // k, v [kKeys][kStride]; q, dO [2][kQueries][kStride] (two buffers each)
  static constexpr int kSharedElements = kStride * (2 * kKeys + 4 * kQueries);
  // lse, D [2][kQueries] floats after them
  static constexpr int kSharedFloats = 4 * kQueries;
};

template <typename scalar_t, int HD, typename Shape, bool DROPOUT>
__global__ void __launch_bounds__(kThreads)
    mma_grad_kv_kernel(const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ grad_out,
                       const float* __restrict__ lse, const float* __restrict__ row_dot,
                       scalar_t* __restrict__ grad_qkv, int T, int n_head, int64_t C,
                       float scale_log2, float scale, DropoutArgs dropout) {
  constexpr int M = Shape::kSlices, BK = Shape::kKeys, BQ = Shape::kQueries, S = Shape::kStride;
  static_assert(BK % BQ == 0, "a key tile starts at a query tile");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* k_s = reinterpret_cast<scalar_t*>(smem_raw);  // [BK][S]
  scalar_t* v_s = k_s + BK * S;                             // [BK][S]
  scalar_t* q_s = v_s + BK * S;                             // [2][BQ][S]
  scalar_t* do_s = q_s + 2 * BQ * S;                        // [2][BQ][S]
  float* lse_s = reinterpret_cast<float*>(do_s + 2 * BQ * S);  // [2][BQ]
  float* d_s = lse_s + 2 * BQ;                                 // [2][BQ]

  const int key_tiles = (T + BK - 1) / BK;
  const BlockTile place = block_tile(key_tiles, T, HD);
  const int kt = place.rank;  // small kt = most work, first
  const int bh = place.bh;
  const int b = bh / n_head, h = bh % n_head;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t row_stride = 3 * C;
  const scalar_t* head = qkv + static_cast<int64_t>(b) * T * row_stride + h * HD;
  const scalar_t* grad_head = grad_out + static_cast<int64_t>(b) * T * C + h * HD;
  const float* lse_head = lse + static_cast<int64_t>(bh) * T;
  const float* dot_head = row_dot + static_cast<int64_t>(bh) * T;

  const int k0 = kt * BK;
  const int warp_k0 = k0 + warp * 16 * M;  // this warp's first key
  const int first_tile = k0 / BQ, query_tiles = (T + BQ - 1) / BQ;
  const DeviceMask mask(dropout, DROPOUT);
  const float keep_scale = static_cast<float>(dropout.scale);
  const auto copy_query_tile = [&](int qt, int buffer) {
    copy_tile_async<BQ, HD>(q_s + buffer * BQ * S, head, row_stride, qt * BQ, T);
    copy_tile_async<BQ, HD>(do_s + buffer * BQ * S, grad_head, C, qt * BQ, T);
    copy_row_values_async<BQ, kThreads>(lse_s + buffer * BQ, lse_head, qt * BQ, T);
    copy_row_values_async<BQ, kThreads>(d_s + buffer * BQ, dot_head, qt * BQ, T);
    copy_async_commit();
  };
  copy_tile_async<BK, HD>(k_s, head + C, row_stride, k0, T);
  copy_tile_async<BK, HD>(v_s, head + 2 * C, row_stride, k0, T);
  copy_query_tile(first_tile, 0);

  float dk[M][HD / 8][4] = {}, dv[M][HD / 8][4] = {};
  for (int qt = first_tile; qt < query_tiles; qt++) {
    copy_async_wait_all();
    __syncthreads();  // tile qt is in; everyone is done with tile qt - 1
    const int buffer = (qt - first_tile) % 2;
    if (qt + 1 < query_tiles) copy_query_tile(qt + 1, 1 - buffer);
    const int q0 = qt * BQ;
    if (q0 + BQ - 1 < warp_k0) continue;  // every query is before this warp's keys
    const scalar_t* qb = q_s + buffer * BQ * S;
    const scalar_t* dob = do_s + buffer * BQ * S;
    const float* lse_b = lse_s + buffer * BQ;
    const float* d_b = d_s + buffer * BQ;
    uint32_t keep[M];  // dropout: made before the products, while fewer registers are live
    if constexpr (DROPOUT) {
      fragment_keep_bits<M, BQ / 8, false>(keep, mask, bh, T, warp_k0 + g, q0 + 2 * t);
    }

    float st[M][BQ / 8][4] = {}, dpt[M][BQ / 8][4] = {};
    two_products<M, BQ, HD, S>(st, dpt, k_s, v_s, warp * M * 16, qb, dob);
    // P^T and dS^T in place of S^T and dP^T, then dv += P^T dO, dk += dS^T q.
    // Only the tiles on the warp's diagonal or past T need the mask (query
    // rows past T have lse 0, not -inf); the others run the loop without it
    // (see the header), and hold no diagonal, so their products skip that
    // test too. With dropout, (P o Z)^T and (P o (Z o dP - D))^T. A masked dS
    // is set to 0, not multiplied by P's 0: dP holds a later position's NaN
    // or Inf.
    const auto accumulate_dv_dk = [&](auto with_mask) {
#pragma unroll
      for (int nt = 0; nt < BQ / 8; nt++) {
        const float2 lse2 = *reinterpret_cast<const float2*>(lse_b + nt * 8 + 2 * t);
        const float2 d2 = *reinterpret_cast<const float2*>(d_b + nt * 8 + 2 * t);
#pragma unroll
        for (int mi = 0; mi < M; mi++) {
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const float row_lse = (e & 1) ? lse2.y : lse2.x;
            const float row_d = (e & 1) ? d2.y : d2.x;
            float p = exp2_approx(fmaf(st[mi][nt][e], scale_log2, -row_lse * kLog2e));
            bool masked = false;
            if constexpr (decltype(with_mask)::value) {
              const int query = q0 + nt * 8 + 2 * t + (e & 1);
              const int key = warp_k0 + mi * 16 + g + 8 * (e >> 1);
              masked = query < key || query >= T;
              if (masked) p = 0.f;
            }
            if constexpr (DROPOUT) {
              const float z = fragment_multiplier(keep[mi], nt, e, keep_scale);
              st[mi][nt][e] = p * z;
              dpt[mi][nt][e] = p * (z * dpt[mi][nt][e] - row_d);
            } else {
              st[mi][nt][e] = p;
              dpt[mi][nt][e] = p * (dpt[mi][nt][e] - row_d);
            }
            if (masked) dpt[mi][nt][e] = 0.f;
          }
        }
      }
      if (decltype(with_mask)::value && warp_k0 >= q0) {  // this tile holds the warp's diagonal
        const int diag = (warp_k0 - q0) / 16;
        accumulate_product_causal<M, BQ, HD, S, true>(dv, st, dob, diag);  // dv += P^T dO
        accumulate_product_causal<M, BQ, HD, S, true>(dk, dpt, qb, diag);  // dk += dS^T q
      } else {
        accumulate_product<M, BQ, HD, S>(dv, st, dob);
        accumulate_product<M, BQ, HD, S>(dk, dpt, qb);
      }
    };
    if (q0 < warp_k0 + 16 * M - 1 || q0 + BQ > T) {
      accumulate_dv_dk(std::true_type{});
    } else {
      accumulate_dv_dk(std::false_type{});
    }
  }

  scalar_t* grad_head_kv = grad_qkv + static_cast<int64_t>(b) * T * row_stride + h * HD;
#pragma unroll
  for (int mi = 0; mi < M; mi++) {
    store_rows<scalar_t, HD>(grad_head_kv + C, row_stride, warp_k0 + mi * 16 + g, T, dk[mi],
                             scale, scale);  // dk = dS^T q scale
    store_rows<scalar_t, HD>(grad_head_kv + 2 * C, row_stride, warp_k0 + mi * 16 + g, T, dv[mi]);
  }
}

// ---------------------------------------------------------------------------
// Backward, dq: one block per query tile (a warp owns SLICES x 16 queries),
// key tiles of KEYS up to the diagonal: S = q k^T, dP = dO v^T, dq += dS k.
template <int HD, int SLICES, int KEYS>
struct GradQShape {
  static constexpr int kSlices = SLICES;
  static constexpr int kQueries = kWarps * 16 * SLICES;
  static constexpr int kKeys = KEYS;  // per key tile
  static constexpr int kStride = HD + 8;
  // q, dO [kQueries][kStride]; k, v [2][kKeys][kStride] (two buffers each)
  static constexpr int kSharedElements = kStride * (2 * kQueries + 4 * kKeys);
};

template <typename scalar_t, int HD, typename Shape, bool DROPOUT>
__global__ void __launch_bounds__(kThreads)
    mma_grad_q_kernel(const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ grad_out,
                      const float* __restrict__ lse, const float* __restrict__ row_dot,
                      scalar_t* __restrict__ grad_qkv, int T, int n_head, int64_t C,
                      float scale_log2, float scale, DropoutArgs dropout) {
  constexpr int M = Shape::kSlices, BQ = Shape::kQueries, BK = Shape::kKeys, S = Shape::kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* q_s = reinterpret_cast<scalar_t*>(smem_raw);  // [BQ][S]
  scalar_t* do_s = q_s + BQ * S;                            // [BQ][S]
  scalar_t* k_s = do_s + BQ * S;                            // [2][BK][S]
  scalar_t* v_s = k_s + 2 * BK * S;                         // [2][BK][S]

  const int query_tiles = (T + BQ - 1) / BQ;
  const BlockTile place = block_tile(query_tiles, T, HD);
  const int qt = query_tiles - 1 - place.rank;  // longest first
  const int bh = place.bh;
  const int b = bh / n_head, h = bh % n_head;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t row_stride = 3 * C;
  const scalar_t* head = qkv + static_cast<int64_t>(b) * T * row_stride + h * HD;
  const scalar_t* grad_head = grad_out + static_cast<int64_t>(b) * T * C + h * HD;

  const int q0 = qt * BQ;
  const int warp_q0 = q0 + warp * 16 * M;  // this warp's first query
  const int key_tiles = (min(q0 + BQ, T) - 1) / BK + 1;
  const DeviceMask mask(dropout, DROPOUT);
  const float keep_scale = static_cast<float>(dropout.scale);
  copy_tile_async<BQ, HD>(q_s, head, row_stride, q0, T);
  copy_tile_async<BQ, HD>(do_s, grad_head, C, q0, T);
  copy_key_tile_async<BK, HD>(k_s, v_s, head, row_stride, C, 0, T);

  // lse (log2 units) and D of rows g and g + 8 of each slice.
  float lse_row[M][2], dot_row[M][2];
#pragma unroll
  for (int mi = 0; mi < M; mi++) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int row = warp_q0 + mi * 16 + g + 8 * i;
      lse_row[mi][i] = row < T ? lse[static_cast<int64_t>(bh) * T + row] * kLog2e : 0.f;
      dot_row[mi][i] = row < T ? row_dot[static_cast<int64_t>(bh) * T + row] : 0.f;
    }
  }
  float dq[M][HD / 8][4] = {};

  for (int kt = 0; kt < key_tiles; kt++) {
    copy_async_wait_all();
    __syncthreads();  // tile kt is in; everyone is done with tile kt - 1
    if (kt + 1 < key_tiles) copy_key_tile_async<BK, HD>(k_s, v_s, head, row_stride, C, kt + 1, T);
    const int k0 = kt * BK;
    if (k0 > warp_q0 + 16 * M - 1) continue;  // the whole tile is after this warp's queries
    const scalar_t* kb = k_s + (kt % 2) * BK * S;
    const scalar_t* vb = v_s + (kt % 2) * BK * S;
    uint32_t keep[M];  // dropout: made before the products, while fewer registers are live
    if constexpr (DROPOUT) {
      fragment_keep_bits<M, BK / 8, true>(keep, mask, bh, T, warp_q0 + g, k0 + 2 * t);
    }

    float s[M][BK / 8][4] = {}, dp[M][BK / 8][4] = {};
    two_products<M, BK, HD, S>(s, dp, q_s, do_s, warp * M * 16, kb, vb);
    // dS in place of S; with dropout P o (Z o dP - D). A masked dS is set to
    // 0, not multiplied by P's 0: dP holds a later position's NaN or Inf.
    // Only the tiles on the warp's diagonal, or where its rows cross T, need
    // the mask; without dropout the others run the loop without it (see the
    // header). With dropout every tile runs the loop with the test: split,
    // that kernel took 166-168 registers instead of 128 at head dim 32 (3
    // blocks an SM instead of 4) and spilled at 64 and 128 on sm_80 and at 96
    // on sm_90a.
    const bool needs_mask = k0 + BK - 1 > warp_q0 || warp_q0 + 16 * M > T;
    const auto scores_to_ds = [&](auto with_mask) {
#pragma unroll
      for (int mi = 0; mi < M; mi++) {
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const int i = e >> 1;
            float p = exp2_approx(fmaf(s[mi][nt][e], scale_log2, -lse_row[mi][i]));
            bool masked = false;
            if (decltype(with_mask)::value && needs_mask) {
              const int key = k0 + nt * 8 + 2 * t + (e & 1);
              const int row = warp_q0 + mi * 16 + g + 8 * i;
              masked = key > row || row >= T;
              if (masked) p = 0.f;
            }
            if constexpr (DROPOUT) {
              const float z = fragment_multiplier(keep[mi], nt, e, keep_scale);
              s[mi][nt][e] = p * (z * dp[mi][nt][e] - dot_row[mi][i]);
            } else {
              s[mi][nt][e] = p * (dp[mi][nt][e] - dot_row[mi][i]);
            }
            if (masked) s[mi][nt][e] = 0.f;
          }
        }
      }
    };
    if (needs_mask || DROPOUT) {
      scores_to_ds(std::true_type{});
    } else {
      scores_to_ds(std::false_type{});
    }
    if (warp_q0 < k0 + BK) {  // dq += dS k; this tile holds the warp's diagonal
      accumulate_product_causal<M, BK, HD, S, false>(dq, s, kb, (warp_q0 - k0) / 16);
    } else {
      accumulate_product<M, BK, HD, S>(dq, s, kb);
    }
  }

  scalar_t* grad_head_q = grad_qkv + static_cast<int64_t>(b) * T * row_stride + h * HD;
#pragma unroll
  for (int mi = 0; mi < M; mi++) {
    store_rows<scalar_t, HD>(grad_head_q, row_stride, warp_q0 + mi * 16 + g, T, dq[mi], scale,
                             scale);  // dq = dS k scale
  }
}

// ---------------------------------------------------------------------------
// Launchers.

// Calls fn(std::integral_constant<int, HD>) for the head dims built here.
template <typename Fn>
void with_head_dim(int64_t hd, const Fn& fn) {
  switch (hd) {
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    case 80: fn(std::integral_constant<int, 80>{}); break;
    case 96: fn(std::integral_constant<int, 96>{}); break;
    case 128: fn(std::integral_constant<int, 128>{}); break;
    default: ::nanoblock::fail("nanoblock: no tensor-core attention kernel for head dim ", hd);
  }
}

template <typename Fn>
void dispatch_half_types(at::ScalarType dtype, const Fn& fn) {
  if (dtype == at::kBFloat16) {
    fn(at::BFloat16{});
  } else {
    fn(at::Half{});
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Tile shapes per head dim, picked by timing each kernel on an H200 (bf16,
// head dim 64, (B, T, n_head) = (16, 1024, 12) and (4, 4096, 12)): the
// forward's warps own 32 queries where the accumulators fit in registers
// (head dims up to 64; 16 queries: 7-10% slower); grad_kv walks query tiles
// of 32 (64: 20% slower, 16: 22-27% slower, 32 keys a warp: 17% slower);
// grad_q walks key tiles of 64 up to head dim 64 (32: 4-9% slower; 32
// queries a warp: 32-34% slower).
template <int HD>
using ForwardTiles = ForwardShape<HD, HD <= 64 ? 2 : 1>;
template <int HD>
using GradKvTiles = GradKvShape<HD, 1, 32>;
template <int HD>
using GradQTiles = GradQShape<HD, 1, HD <= 64 ? 64 : 32>;

template <typename scalar_t, int HD, typename Shape, bool DROPOUT>
void launch_forward(const Tensor& qkv, int64_t n_head, const Tensor& out, const Tensor& lse,
                    float scale_log2, const DropoutArgs& dropout) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  const size_t smem = sizeof(scalar_t) * Shape::kSharedElements;
  auto kernel = mma_forward_kernel<scalar_t, HD, Shape, DROPOUT>;
  allow_shared_memory(kernel, smem);
  kernel<<<B * n_head * ceil_div(T, Shape::kQueries), kThreads, smem, current_stream()>>>(
      qkv.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
      lse.mutable_data_ptr<float>(), static_cast<int>(T), static_cast<int>(n_head), C,
      scale_log2, dropout);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The two backward kernels (grad_kv, grad_q) share their arguments.
struct BackwardArgs {
  const Tensor& grad_out;
  const Tensor& qkv;
  const Tensor& lse;
  const Tensor& row_dot;
  int64_t n_head;
  const Tensor& grad_qkv;
  float scale_log2, scale;
  DropoutArgs dropout;
};

template <typename scalar_t, typename Kernel>
void launch_backward_kernel(Kernel kernel, const BackwardArgs& a, int64_t rows_per_block,
                            size_t smem) {
  const int64_t B = a.qkv.size(0), T = a.qkv.size(1), C = a.qkv.size(2) / 3;
  allow_shared_memory(kernel, smem);
  kernel<<<B * a.n_head * ceil_div(T, rows_per_block), kThreads, smem, current_stream()>>>(
      a.qkv.const_data_ptr<scalar_t>(), a.grad_out.const_data_ptr<scalar_t>(),
      a.lse.const_data_ptr<float>(), a.row_dot.const_data_ptr<float>(),
      a.grad_qkv.mutable_data_ptr<scalar_t>(), static_cast<int>(T), static_cast<int>(a.n_head),
      C, a.scale_log2, a.scale, a.dropout);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int HD, typename Shape, bool DROPOUT>
void launch_grad_kv(const BackwardArgs& a) {
  launch_backward_kernel<scalar_t>(mma_grad_kv_kernel<scalar_t, HD, Shape, DROPOUT>, a,
                                   Shape::kKeys,
                                   sizeof(scalar_t) * Shape::kSharedElements +
                                       sizeof(float) * Shape::kSharedFloats);
}

template <typename scalar_t, int HD, typename Shape, bool DROPOUT>
void launch_grad_q(const BackwardArgs& a) {
  launch_backward_kernel<scalar_t>(mma_grad_q_kernel<scalar_t, HD, Shape, DROPOUT>, a,
                                   Shape::kQueries, sizeof(scalar_t) * Shape::kSharedElements);
}

}  // namespace

bool mma_attention_supported(const Tensor& qkv, int64_t hd, const Tensor& other) {
  // NANOBLOCK_NO_MMA=1 forces the generic path (for debugging and comparison).
  static const bool disabled = [] {
    const char* v = std::getenv("NANOBLOCK_NO_MMA");
    return v != nullptr && v[0] == '1';
  }();
  const auto dtype = qkv.scalar_type();
  return !disabled && (dtype == at::kHalf || dtype == at::kBFloat16) &&
         (hd == 32 || hd == 64 || hd == 80 || hd == 96 || hd == 128) &&
         aligned16(qkv.const_data_ptr()) && (!other.defined() || aligned16(other.const_data_ptr()));
}

void mma_attention_forward(const Tensor& qkv, int64_t n_head, const Tensor& out,
                           const Tensor& lse, const DropoutArgs& dropout) {
  const int64_t hd = qkv.size(2) / 3 / n_head;
  const float scale_log2 = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd))) * kLog2e;
  dispatch_half_types(qkv.scalar_type(), [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    with_head_dim(hd, [&](auto hd_constant) {
      constexpr int HD = decltype(hd_constant)::value;
      with_dropout(dropout, [&](auto dropout_constant) {
        constexpr bool DROPOUT = decltype(dropout_constant)::value;
        launch_forward<scalar_t, HD, ForwardTiles<HD>, DROPOUT>(qkv, n_head, out, lse,
                                                                scale_log2, dropout);
      });
    });
  });
}

void mma_attention_backward(const Tensor& grad_out, const Tensor& qkv, const Tensor& lse,
                            const Tensor& row_dot, int64_t n_head, const Tensor& grad_qkv,
                            const DropoutArgs& dropout) {
  const int64_t hd = qkv.size(2) / 3 / n_head;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const BackwardArgs args{grad_out, qkv, lse, row_dot, n_head, grad_qkv,
                          scale * kLog2e, scale, dropout};
  dispatch_half_types(qkv.scalar_type(), [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    with_head_dim(hd, [&](auto hd_constant) {
      constexpr int HD = decltype(hd_constant)::value;
      with_dropout(dropout, [&](auto dropout_constant) {
        constexpr bool DROPOUT = decltype(dropout_constant)::value;
        launch_grad_kv<scalar_t, HD, GradKvTiles<HD>, DROPOUT>(args);
        launch_grad_q<scalar_t, HD, GradQTiles<HD>, DROPOUT>(args);
      });
    });
  });
}

}  // namespace nanoblock::cuda
