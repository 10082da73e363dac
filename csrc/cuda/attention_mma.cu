// Causal attention on the tensor cores, for float16 / bfloat16 and head dims
// 32, 64, 80, 96, 128: the same computation as the generic path in
// attention.cu (read that file's header first), with every matrix product
// done by mma.sync.m16n8k16 (fp16/bf16 operands, float32 accumulators).
//
//   forward  [grid: B * n_head * query tiles of 64]   S = q k^T, online
//            softmax, out = P v  -> out [B, T, C], lse [B, n_head, T]
//   grad_kv  [grid: B * n_head * key tiles of 64]     walks query tiles of 32
//            from the diagonal: dv += P^T dO, dk += dS^T q
//   grad_q   [grid: B * n_head * query tiles of 64]   walks key tiles of 32
//            up to the diagonal: dq += dS k
// As in the generic path, each output element is owned by one thread and
// summed in a fixed order: deterministic, no atomics.
//
// A block is 4 warps; each warp owns 16 rows of its tile (queries, or keys in
// grad_kv). Fragment layout of m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16 (row major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
//                        a3 = (g+8, 2t+8..), two 16-bit values per register;
//   B 16x8 (k x n):      b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t+8.., n = g);
//   C 16x8 (float):      c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1).
// The C layout of two neighbouring 8-column tiles is the A layout of one
// 16-wide k step, so probabilities go from the score accumulators straight
// into the next product without shared memory (FlashAttention-2's trick).
// A B operand needs its k index contiguous in shared memory, so a tile that
// is a B operand with k along its rows (v in P v; q, dO in grad_kv; k in
// grad_q) is also stored transposed. Rows are padded by 8 elements (16 bytes)
// so the fragment loads of a warp hit 32 different banks.
//
// Scores are kept in the log2 domain (scaled by scale * log2 e) and
// exponentiated with exp2f; lse is written and read in natural log units.
#include "../check.h"
#include "attention_mma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>
#include <type_traits>

namespace nanoblock::cuda {

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------
// Tensor-core and packing primitives.

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

// Two neighbouring 16-bit elements as one register.
template <typename scalar_t>
__device__ __forceinline__ uint32_t ld2(const scalar_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// The A fragment of the 16 x 16 block at `tile` (row stride `stride`), k step ks.
template <typename scalar_t>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const scalar_t* tile, int stride, int ks,
                                       int g, int t) {
  const scalar_t* p = tile + g * stride + ks * 16 + 2 * t;
  a[0] = ld2(p);
  a[1] = ld2(p + 8 * stride);
  a[2] = ld2(p + 8);
  a[3] = ld2(p + 8 * stride + 8);
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

// Copies rows first .. first + ROWS - 1 (zeros at or past T) of one head's HD
// columns (rows row_stride apart in global memory) with 16-byte loads into
// shared memory: row major into rows_dst [ROWS][HD + 8] and/or transposed into
// cols_dst [HD][ROWS + 8] (either may be null).
template <int ROWS, int HD, typename scalar_t>
__device__ __forceinline__ void load_tile(scalar_t* rows_dst, scalar_t* cols_dst,
                                          const scalar_t* src, int64_t row_stride, int first,
                                          int T) {
  constexpr int kChunks = HD / 8;
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kThreads) {
    // Row major only: neighbouring threads take neighbouring chunks of a row
    // (coalesced). With a transposed copy, neighbouring threads take
    // neighbouring rows instead, so the 2-byte transposed stores of a warp
    // land in consecutive addresses rather than all in one bank.
    const bool rows_fastest = cols_dst != nullptr;
    const int r = rows_fastest ? idx % ROWS : idx / kChunks;
    const int c = rows_fastest ? idx / ROWS : idx % kChunks;
    const int row = first + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < T) v = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(row) * row_stride + c * 8);
    if (rows_dst != nullptr) *reinterpret_cast<uint4*>(rows_dst + r * (HD + 8) + c * 8) = v;
    if (cols_dst != nullptr) {
      const scalar_t* e = reinterpret_cast<const scalar_t*>(&v);
#pragma unroll
      for (int k = 0; k < 8; k++) cols_dst[(c * 8 + k) * (ROWS + 8) + r] = e[k];
    }
  }
}

// ---------------------------------------------------------------------------
// Forward.
template <typename scalar_t, int HD>
__global__ void __launch_bounds__(kThreads)
    mma_forward_kernel(const scalar_t* __restrict__ qkv, scalar_t* __restrict__ out,
                       float* __restrict__ lse, int T, int n_head, int64_t C, float scale_log2) {
  constexpr int BQ = 64, BK = 64, S = HD + 8, ST = BK + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* q_s = reinterpret_cast<scalar_t*>(smem_raw);  // [BQ][S]
  scalar_t* k_s = q_s + BQ * S;                             // [BK][S]
  scalar_t* vt_s = k_s + BK * S;                            // [HD][ST] (v transposed)

  const int tiles = (T + BQ - 1) / BQ;
  const int qt = tiles - 1 - static_cast<int>(blockIdx.x % tiles);  // longest rows first
  const int bh = static_cast<int>(blockIdx.x / tiles);
  const int b = bh / n_head, h = bh % n_head;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t row_stride = 3 * C;
  const scalar_t* head = qkv + static_cast<int64_t>(b) * T * row_stride + h * HD;

  const int q0 = qt * BQ;
  load_tile<BQ, HD>(q_s, static_cast<scalar_t*>(nullptr), head, row_stride, q0, T);
  __syncthreads();
  uint32_t qa[HD / 16][4];
#pragma unroll
  for (int ks = 0; ks < HD / 16; ks++) load_a(qa[ks], q_s + warp * 16 * S, S, ks, g, t);

  const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  const int last_row = q0 + warp * 16 + 15;
  float o[HD / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int kt = 0; kt <= qt; kt++) {
    const int k0 = kt * BK;
    __syncthreads();  // everyone is done with the previous k / v tile
    load_tile<BK, HD>(k_s, static_cast<scalar_t*>(nullptr), head + C, row_stride, k0, T);
    load_tile<BK, HD>(static_cast<scalar_t*>(nullptr), vt_s, head + 2 * C, row_stride, k0, T);
    __syncthreads();
    if (k0 > last_row) continue;  // the whole tile is above this warp's rows

    float s[BK / 8][4] = {};
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++) {
#pragma unroll
      for (int nt = 0; nt < BK / 8; nt++) {
        const scalar_t* p = k_s + (nt * 8 + g) * S + ks * 16 + 2 * t;
        mma_16816<scalar_t>(s[nt], qa[ks], ld2(p), ld2(p + 8));
      }
    }

    // Mask, scale, and the new row maxima (a row lives in the 4 lanes of a quad).
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = k0 + nt * 8 + 2 * t + (e & 1);
        const bool visible = key <= row[e >> 1] && key < T;
        s[nt][e] = visible ? s[nt][e] * scale_log2 : -INFINITY;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[nt][e]);
      }
    }
    float correction[2], m_safe[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
      const float m_new = fmaxf(m[i], tile_max[i]);
      // A row that has seen no key yet keeps max -inf; exp2(-inf - 0) = 0 then.
      m_safe[i] = m_new == -INFINITY ? 0.f : m_new;
      correction[i] = exp2f(m[i] - m_safe[i]);
      m[i] = m_new;
      l[i] *= correction[i];
    }
#pragma unroll
    for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        s[nt][e] = exp2f(s[nt][e] - m_safe[e >> 1]);
        l[e >> 1] += s[nt][e];
      }
    }
#pragma unroll
    for (int nd = 0; nd < HD / 8; nd++) {
      o[nd][0] *= correction[0];
      o[nd][1] *= correction[0];
      o[nd][2] *= correction[1];
      o[nd][3] *= correction[1];
    }

    // o += P v.
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
      uint32_t pa[4];
      c_to_a<scalar_t>(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int nd = 0; nd < HD / 8; nd++) {
        const scalar_t* p = vt_s + (nd * 8 + g) * ST + kk * 16 + 2 * t;
        mma_16816<scalar_t>(o[nd], pa, ld2(p), ld2(p + 8));
      }
    }
  }

  // Normalize, write out and lse (natural log).
#pragma unroll
  for (int i = 0; i < 2; i++) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    if (row[i] >= T) continue;
    const float inv = 1.f / l[i];
    scalar_t* out_row = out + (static_cast<int64_t>(b) * T + row[i]) * C + h * HD;
#pragma unroll
    for (int nd = 0; nd < HD / 8; nd++) {
      *reinterpret_cast<uint32_t*>(out_row + nd * 8 + 2 * t) =
          pack2<scalar_t>(o[nd][2 * i] * inv, o[nd][2 * i + 1] * inv);
    }
    if (t == 0) lse[static_cast<int64_t>(bh) * T + row[i]] = (m[i] + log2f(l[i])) * kLn2;
  }
}

// ---------------------------------------------------------------------------
// Backward, dk and dv: one block per key tile of 64 (16 keys a warp), query
// tiles of 32 from the diagonal on. The products run transposed (keys as
// rows): S^T = k q^T, dP^T = v dO^T, then dv += P^T dO, dk += dS^T q.
template <typename scalar_t, int HD>
__global__ void __launch_bounds__(kThreads)
    mma_grad_kv_kernel(const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ grad_out,
                       const float* __restrict__ lse, const float* __restrict__ row_dot,
                       scalar_t* __restrict__ grad_qkv, int T, int n_head, int64_t C,
                       float scale_log2, float scale) {
  constexpr int BK = 64, BQ = 32, S = HD + 8, SQ = BQ + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* k_s = reinterpret_cast<scalar_t*>(smem_raw);  // [BK][S]
  scalar_t* v_s = k_s + BK * S;                             // [BK][S]
  scalar_t* q_s = v_s + BK * S;                             // [BQ][S]
  scalar_t* do_s = q_s + BQ * S;                            // [BQ][S]
  scalar_t* qt_s = do_s + BQ * S;                           // [HD][SQ] (q transposed)
  scalar_t* dot_s = qt_s + HD * SQ;                         // [HD][SQ] (dO transposed)
  float* lse_s = reinterpret_cast<float*>(dot_s + HD * SQ); // [BQ], log2 units
  float* d_s = lse_s + BQ;                                  // [BQ]

  const int key_tiles = (T + BK - 1) / BK;
  const int query_tiles = (T + BQ - 1) / BQ;
  const int kt = static_cast<int>(blockIdx.x % key_tiles);  // small kt = most work, first
  const int bh = static_cast<int>(blockIdx.x / key_tiles);
  const int b = bh / n_head, h = bh % n_head;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t row_stride = 3 * C;
  const scalar_t* head = qkv + static_cast<int64_t>(b) * T * row_stride + h * HD;
  const scalar_t* grad_head = grad_out + static_cast<int64_t>(b) * T * C + h * HD;

  const int k0 = kt * BK;
  load_tile<BK, HD>(k_s, static_cast<scalar_t*>(nullptr), head + C, row_stride, k0, T);
  load_tile<BK, HD>(v_s, static_cast<scalar_t*>(nullptr), head + 2 * C, row_stride, k0, T);
  const scalar_t* k_w = k_s + warp * 16 * S;
  const scalar_t* v_w = v_s + warp * 16 * S;
  const int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
  float dk[HD / 8][4] = {}, dv[HD / 8][4] = {};

  for (int qt = k0 / BQ; qt < query_tiles; qt++) {
    const int q0 = qt * BQ;
    __syncthreads();  // everyone is done with the previous query tile
    load_tile<BQ, HD>(q_s, qt_s, head, row_stride, q0, T);
    load_tile<BQ, HD>(do_s, dot_s, grad_head, C, q0, T);
    if (threadIdx.x < BQ) {
      const int query = q0 + threadIdx.x;
      lse_s[threadIdx.x] = query < T ? lse[static_cast<int64_t>(bh) * T + query] * kLog2e : 0.f;
      d_s[threadIdx.x] = query < T ? row_dot[static_cast<int64_t>(bh) * T + query] : 0.f;
    }
    __syncthreads();
    if (q0 + BQ - 1 < k0 + warp * 16) continue;  // every query is before this warp's keys

    float st[BQ / 8][4] = {}, dpt[BQ / 8][4] = {};
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++) {
      uint32_t ka[4], va[4];
      load_a(ka, k_w, S, ks, g, t);
      load_a(va, v_w, S, ks, g, t);
#pragma unroll
      for (int nt = 0; nt < BQ / 8; nt++) {
        const scalar_t* pq = q_s + (nt * 8 + g) * S + ks * 16 + 2 * t;
        mma_16816<scalar_t>(st[nt], ka, ld2(pq), ld2(pq + 8));
        const scalar_t* pd = do_s + (nt * 8 + g) * S + ks * 16 + 2 * t;
        mma_16816<scalar_t>(dpt[nt], va, ld2(pd), ld2(pd + 8));
      }
    }
    // P^T and dS^T in place of S^T and dP^T.
#pragma unroll
    for (int nt = 0; nt < BQ / 8; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int i = nt * 8 + 2 * t + (e & 1);
        const int query = q0 + i;
        const bool visible = key[e >> 1] <= query && query < T;
        const float p = visible ? exp2f(st[nt][e] * scale_log2 - lse_s[i]) : 0.f;
        st[nt][e] = p;
        dpt[nt][e] = p * (dpt[nt][e] - d_s[i]) * scale;
      }
    }
#pragma unroll
    for (int kk = 0; kk < BQ / 16; kk++) {
      uint32_t pa[4], dsa[4];
      c_to_a<scalar_t>(pa, st[2 * kk], st[2 * kk + 1]);
      c_to_a<scalar_t>(dsa, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
      for (int nd = 0; nd < HD / 8; nd++) {
        const scalar_t* pd = dot_s + (nd * 8 + g) * SQ + kk * 16 + 2 * t;
        mma_16816<scalar_t>(dv[nd], pa, ld2(pd), ld2(pd + 8));
        const scalar_t* pq = qt_s + (nd * 8 + g) * SQ + kk * 16 + 2 * t;
        mma_16816<scalar_t>(dk[nd], dsa, ld2(pq), ld2(pq + 8));
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 2; i++) {
    if (key[i] >= T) continue;
    scalar_t* grad_row = grad_qkv + (static_cast<int64_t>(b) * T + key[i]) * row_stride + h * HD;
#pragma unroll
    for (int nd = 0; nd < HD / 8; nd++) {
      *reinterpret_cast<uint32_t*>(grad_row + C + nd * 8 + 2 * t) =
          pack2<scalar_t>(dk[nd][2 * i], dk[nd][2 * i + 1]);
      *reinterpret_cast<uint32_t*>(grad_row + 2 * C + nd * 8 + 2 * t) =
          pack2<scalar_t>(dv[nd][2 * i], dv[nd][2 * i + 1]);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward, dq: one block per query tile of 64 (16 queries a warp), key tiles
// of 32 up to the diagonal: S = q k^T, dP = dO v^T, dq += dS k.
template <typename scalar_t, int HD>
__global__ void __launch_bounds__(kThreads)
    mma_grad_q_kernel(const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ grad_out,
                      const float* __restrict__ lse, const float* __restrict__ row_dot,
                      scalar_t* __restrict__ grad_qkv, int T, int n_head, int64_t C,
                      float scale_log2, float scale) {
  constexpr int BQ = 64, BK = 32, S = HD + 8, SK = BK + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* q_s = reinterpret_cast<scalar_t*>(smem_raw);  // [BQ][S]
  scalar_t* do_s = q_s + BQ * S;                            // [BQ][S]
  scalar_t* k_s = do_s + BQ * S;                            // [BK][S]
  scalar_t* v_s = k_s + BK * S;                             // [BK][S]
  scalar_t* kt_s = v_s + BK * S;                            // [HD][SK] (k transposed)

  const int query_tiles = (T + BQ - 1) / BQ;
  const int key_tiles = (T + BK - 1) / BK;
  const int qt = query_tiles - 1 - static_cast<int>(blockIdx.x % query_tiles);
  const int bh = static_cast<int>(blockIdx.x / query_tiles);
  const int b = bh / n_head, h = bh % n_head;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t row_stride = 3 * C;
  const scalar_t* head = qkv + static_cast<int64_t>(b) * T * row_stride + h * HD;
  const scalar_t* grad_head = grad_out + static_cast<int64_t>(b) * T * C + h * HD;

  const int q0 = qt * BQ;
  load_tile<BQ, HD>(q_s, static_cast<scalar_t*>(nullptr), head, row_stride, q0, T);
  load_tile<BQ, HD>(do_s, static_cast<scalar_t*>(nullptr), grad_head, C, q0, T);
  const scalar_t* q_w = q_s + warp * 16 * S;
  const scalar_t* do_w = do_s + warp * 16 * S;
  const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  float lse_row[2], dot_row[2];
#pragma unroll
  for (int i = 0; i < 2; i++) {
    lse_row[i] = row[i] < T ? lse[static_cast<int64_t>(bh) * T + row[i]] * kLog2e : 0.f;
    dot_row[i] = row[i] < T ? row_dot[static_cast<int64_t>(bh) * T + row[i]] : 0.f;
  }
  float dq[HD / 8][4] = {};

  const int kt_end = min(key_tiles, (q0 + BQ - 1) / BK + 1);
  for (int kt = 0; kt < kt_end; kt++) {
    const int k0 = kt * BK;
    __syncthreads();
    load_tile<BK, HD>(k_s, kt_s, head + C, row_stride, k0, T);
    load_tile<BK, HD>(v_s, static_cast<scalar_t*>(nullptr), head + 2 * C, row_stride, k0, T);
    __syncthreads();
    if (k0 > q0 + warp * 16 + 15) continue;

    float s[BK / 8][4] = {}, dp[BK / 8][4] = {};
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++) {
      uint32_t qa[4], da[4];
      load_a(qa, q_w, S, ks, g, t);
      load_a(da, do_w, S, ks, g, t);
#pragma unroll
      for (int nt = 0; nt < BK / 8; nt++) {
        const scalar_t* pk = k_s + (nt * 8 + g) * S + ks * 16 + 2 * t;
        mma_16816<scalar_t>(s[nt], qa, ld2(pk), ld2(pk + 8));
        const scalar_t* pv = v_s + (nt * 8 + g) * S + ks * 16 + 2 * t;
        mma_16816<scalar_t>(dp[nt], da, ld2(pv), ld2(pv + 8));
      }
    }
    // dS in place of S.
#pragma unroll
    for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int i = e >> 1;
        const int key = k0 + nt * 8 + 2 * t + (e & 1);
        const bool visible = key <= row[i] && row[i] < T;
        const float p = visible ? exp2f(s[nt][e] * scale_log2 - lse_row[i]) : 0.f;
        s[nt][e] = p * (dp[nt][e] - dot_row[i]) * scale;
      }
    }
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
      uint32_t dsa[4];
      c_to_a<scalar_t>(dsa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int nd = 0; nd < HD / 8; nd++) {
        const scalar_t* pk = kt_s + (nd * 8 + g) * SK + kk * 16 + 2 * t;
        mma_16816<scalar_t>(dq[nd], dsa, ld2(pk), ld2(pk + 8));
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 2; i++) {
    if (row[i] >= T) continue;
    scalar_t* grad_row = grad_qkv + (static_cast<int64_t>(b) * T + row[i]) * row_stride + h * HD;
#pragma unroll
    for (int nd = 0; nd < HD / 8; nd++) {
      *reinterpret_cast<uint32_t*>(grad_row + nd * 8 + 2 * t) =
          pack2<scalar_t>(dq[nd][2 * i], dq[nd][2 * i + 1]);
    }
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
                           const Tensor& lse) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3, hd = C / n_head;
  const float scale_log2 = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd))) * kLog2e;
  const int64_t blocks = B * n_head * ceil_div(T, 64);
  const cudaStream_t stream = current_stream();
  dispatch_half_types(qkv.scalar_type(), [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    with_head_dim(hd, [&](auto hd_constant) {
      constexpr int HD = decltype(hd_constant)::value;
      const size_t smem = sizeof(scalar_t) * (2 * 64 * (HD + 8) + HD * (64 + 8));
      auto kernel = mma_forward_kernel<scalar_t, HD>;
      allow_shared_memory(kernel, smem);
      kernel<<<blocks, kThreads, smem, stream>>>(
          qkv.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          lse.mutable_data_ptr<float>(), static_cast<int>(T), static_cast<int>(n_head), C,
          scale_log2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void mma_attention_backward(const Tensor& grad_out, const Tensor& qkv, const Tensor& lse,
                            const Tensor& row_dot, int64_t n_head, const Tensor& grad_qkv) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3, hd = C / n_head;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const float scale_log2 = scale * kLog2e;
  const cudaStream_t stream = current_stream();
  dispatch_half_types(qkv.scalar_type(), [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    with_head_dim(hd, [&](auto hd_constant) {
      constexpr int HD = decltype(hd_constant)::value;
      const scalar_t* qkv_ptr = qkv.const_data_ptr<scalar_t>();
      const scalar_t* grad_out_ptr = grad_out.const_data_ptr<scalar_t>();
      const float* lse_ptr = lse.const_data_ptr<float>();
      const float* dot_ptr = row_dot.const_data_ptr<float>();
      scalar_t* grad_ptr = grad_qkv.mutable_data_ptr<scalar_t>();

      const size_t kv_smem = sizeof(scalar_t) * (2 * 64 * (HD + 8) + 2 * 32 * (HD + 8) +
                                                 2 * HD * (32 + 8)) +
                             sizeof(float) * 2 * 32;
      auto kv_kernel = mma_grad_kv_kernel<scalar_t, HD>;
      allow_shared_memory(kv_kernel, kv_smem);
      kv_kernel<<<B * n_head * ceil_div(T, 64), kThreads, kv_smem, stream>>>(
          qkv_ptr, grad_out_ptr, lse_ptr, dot_ptr, grad_ptr, static_cast<int>(T),
          static_cast<int>(n_head), C, scale_log2, scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      const size_t q_smem =
          sizeof(scalar_t) * (2 * 64 * (HD + 8) + 2 * 32 * (HD + 8) + HD * (32 + 8));
      auto q_kernel = mma_grad_q_kernel<scalar_t, HD>;
      allow_shared_memory(q_kernel, q_smem);
      q_kernel<<<B * n_head * ceil_div(T, 64), kThreads, q_smem, stream>>>(
          qkv_ptr, grad_out_ptr, lse_ptr, dot_ptr, grad_ptr, static_cast<int>(T),
          static_cast<int>(n_head), C, scale_log2, scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace nanoblock::cuda
