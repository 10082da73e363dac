// Causal self-attention on CUDA, FlashAttention-2 style, straight from
// c_attn's output.
//
// Input qkv [B, T, 3C]: for head h (hd = C / n_head columns), q is columns
// h*hd .. (h+1)*hd, k is C + h*hd .., v is 2C + h*hd ..; the kernels read
// them in place by strides, nothing is split or transposed.
//
// Forward, per (batch, head):
//   S = q k^T * scale (scale = 1/sqrt(hd)), causal (key j <= query i),
//   P = softmax(S) over keys, out = P v   -> out [B, T, C] (heads merged)
//   lse = logsumexp of each row of S       -> lse [B, n_head, T] (acc_t)
// Backward, from the saved out and lse only (P is recomputed, nothing of
// size T x T is stored):
//   D_i = rowsum(dO_i * O_i)                               -> [B, n_head, T]
//   P = exp(S - lse), dP = dO v^T, dS = P * (dP - D) * scale
//   dv = P^T dO, dk = dS^T q, dq = dS k     -> grad_qkv [B, T, 3C]
// Dropout of the probabilities (kernel_api.h), Z the multipliers (0 or
// 1 / (1 - p)) of probability (query i, key j), made from rng where the
// causal mask is applied (DeviceMask, common.cuh; mask index
// ((b * n_head + h) * T + i) * T + j, the same elements as on the CPU):
//   forward:  out = (P o Z) v; the row sums, so lse, are those of P
//   backward: dv = (P o Z)^T dO, dS = P * (Z o dP - D) * scale, D unchanged
//             (sum_j P_ij Z_ij (dO_i . v_j) = dO_i . O_i)
// Each kernel has a DROPOUT flag: the DROPOUT = false instantiation is the
// plain kernel, and never reads rng.
//
// The backward is deterministic without atomics: one kernel runs over key
// tiles and owns dk, dv of its keys (walking the query tiles in order), a
// second runs over query tiles and owns dq of its queries (walking the key
// tiles in order). Every output element is written by one thread, with its
// sum in a fixed order.
//
// This file holds the generic path, for every dtype and any head dim up to
// 128: tiles of 32 queries by 32 keys in shared memory in acc_t (float32,
// float64 for float64), scalar FMAs. A block is 4 warps; a warp owns 8 rows
// of the block's 32 (queries in the forward and dq kernels, keys in the dk/dv
// kernel). For the scores a lane takes one column of the other tile (one key,
// or one query), so the warp computes an 8 x 32 block of S with each
// shared-memory load reused 8 times; for the products with v, q, k or dO a
// lane takes head-dim columns lane, lane + 32, .. (DPL of them, "dims per
// lane"). Key tiles above the diagonal are never loaded, and the products
// with v, q, k or dO skip the masked pairs of a diagonal tile instead of
// multiplying by their 0 probability, so a NaN or Inf at one position never
// reaches an earlier position's output or a later position's gradient
// (0 x NaN is NaN); on finite data skipping changes no bit.
//
// float16 / bfloat16 with head dims 32, 64, 80, 96, 128 go to the
// tensor-core kernels of attention_mma.cu instead (same layouts, same
// determinism); on a compute capability 9.0 GPU of an sm_90a build, head
// dims 64 and 128 without dropout go to Hopper's wgmma kernels
// (attention_wgmma.cu, attention_wgmma_backward.cu) unless
// allow_wgmma_attention(false) (kernels.h). The launchers below pick the path.
#include "../check.h"
#include "attention_mma.cuh"
#include "attention_wgmma.cuh"
#include "common.cuh"

#include <atomic>
#include <cstdlib>

namespace nanoblock::cuda {

namespace {

constexpr int kTile = 32;          // queries and keys per tile
constexpr int kWarps = 4;          // warps per block
constexpr int kRowsPerWarp = 8;    // kTile / kWarps
constexpr int kThreads = kWarps * 32;
constexpr int kMaxHeadDim = 128;   // 4 dims per lane
static_assert(kWarps * kRowsPerWarp == kTile, "each warp owns kRowsPerWarp rows of a tile");

// Copies rows first .. first + kTile - 1 (zeros at or past T) of one head's
// hd columns into shared memory tile [kTile][stride] (acc_t). `src` points at
// the head's column block of position 0 of this batch; rows are row_stride
// apart.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(acc_t* tile, int stride, const scalar_t* src,
                                          int64_t row_stride, int first, int T, int hd) {
  for (int idx = threadIdx.x; idx < kTile * hd; idx += kThreads) {
    const int r = idx / hd, d = idx - r * hd;
    const int row = first + r;
    tile[r * stride + d] =
        row < T ? static_cast<acc_t>(src[static_cast<int64_t>(row) * row_stride + d]) : acc_t(0);
  }
}

// The dropout multiplier of probability (query, key) of head bh: keep_scale
// = 1 / (1 - p) when it is visible and kept, else 0.
template <typename acc_t>
__device__ __forceinline__ acc_t probability_multiplier(const DeviceMask& mask, acc_t keep_scale,
                                                        bool visible, int bh, int T, int query,
                                                        int key) {
  return visible && mask.kept(probability_index(bh, T, query, key)) ? keep_scale : acc_t(0);
}

// ---------------------------------------------------------------------------
// Forward. One block per (batch, head, query tile); the longest rows (last
// query tiles) are scheduled first.
template <typename scalar_t, int DPL, bool DROPOUT>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(const scalar_t* __restrict__ qkv, scalar_t* __restrict__ out,
                             acc_type<scalar_t>* __restrict__ lse, int T, int n_head, int hd,
                             int64_t C, acc_type<scalar_t> scale, DropoutArgs dropout) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // [kTile][hd]
  acc_t* k_s = q_s + kTile * hd;                      // [kTile][hd + 1] (padded: lane = key)
  acc_t* v_s = k_s + kTile * (hd + 1);                // [kTile][hd]
  acc_t* p_s = v_s + kTile * hd;                      // [kWarps][kRowsPerWarp][kTile]

  const int query_tiles = (T + kTile - 1) / kTile;
  const int qt = query_tiles - 1 - static_cast<int>(blockIdx.x % query_tiles);
  const int bh = static_cast<int>(blockIdx.x / query_tiles);
  const int b = bh / n_head, h = bh % n_head;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row_stride = 3 * C;
  const scalar_t* head = qkv + static_cast<int64_t>(b) * T * row_stride + h * hd;

  const int q0 = qt * kTile;
  load_tile(q_s, hd, head, row_stride, q0, T, hd);
  const acc_t* q_w = q_s + warp * kRowsPerWarp * hd;  // this warp's rows
  acc_t* p_w = p_s + warp * kRowsPerWarp * kTile;
  const int row0 = q0 + warp * kRowsPerWarp;          // this warp's first query
  const DeviceMask mask(dropout, DROPOUT);
  const acc_t keep_scale = static_cast<acc_t>(dropout.scale);

  acc_t m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][DPL];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; r++) {
    m[r] = neg_infinity<acc_t>();
    l[r] = 0;  // this lane's share of the row sum; the lanes are added at the end
#pragma unroll
    for (int c = 0; c < DPL; c++) o[r][c] = 0;
  }

  for (int kt = 0; kt <= qt; kt++) {
    const int k0 = kt * kTile;
    __syncthreads();  // everyone is done with the previous k/v tile
    load_tile(k_s, hd + 1, head + C, row_stride, k0, T, hd);
    load_tile(v_s, hd, head + 2 * C, row_stride, k0, T, hd);
    __syncthreads();
    if (k0 > row0 + kRowsPerWarp - 1) continue;  // the whole tile is above this warp's rows

    // Scores of the warp's rows against key k0 + lane.
    acc_t s[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; r++) s[r] = 0;
    const acc_t* k_row = k_s + lane * (hd + 1);
    for (int d = 0; d < hd; d++) {
      const acc_t kd = k_row[d];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; r++) s[r] += q_w[r * hd + d] * kd;
    }

    // Online softmax: new running max, rescale what was summed so far.
    const int key = k0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; r++) {
      const int query = row0 + r;
      const bool visible = key <= query && query < T;
      const acc_t score = visible ? s[r] * scale : neg_infinity<acc_t>();
      const acc_t m_new = max(m[r], warp_max(score));
      // m_new is -inf only for padding rows (query >= T), which see no key.
      const acc_t p = visible ? exp_acc(score - m_new) : acc_t(0);
      const acc_t correction = m_new == neg_infinity<acc_t>() ? acc_t(1) : exp_acc(m[r] - m_new);
      l[r] = l[r] * correction + p;
#pragma unroll
      for (int c = 0; c < DPL; c++) o[r][c] *= correction;
      m[r] = m_new;
      if constexpr (DROPOUT) {  // o sums (P o Z) v; l stays the sum of P
        p_w[r * kTile + lane] =
            p * probability_multiplier(mask, keep_scale, visible, bh, T, query, key);
      } else {
        p_w[r * kTile + lane] = p;
      }
    }
    __syncwarp();

    // o += P v over the pairs each row sees: keys past the warp's last query
    // are masked for all its rows; key k0 + j past row0 is seen by rows
    // r >= k0 + j - row0 only, and the others skip it rather than multiply
    // its v (a later position's, maybe NaN) by their 0.
    const int key_end = min(kTile, row0 + kRowsPerWarp - k0);
    const auto add_key = [&](int j, int first_row) {
      acc_t v[DPL];
#pragma unroll
      for (int c = 0; c < DPL; c++) {
        const int d = lane + 32 * c;
        v[c] = d < hd ? v_s[j * hd + d] : acc_t(0);
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; r++) {
        if (r < first_row) continue;
        const acc_t pj = p_w[r * kTile + j];
#pragma unroll
        for (int c = 0; c < DPL; c++) o[r][c] += pj * v[c];
      }
    };
    int j = 0;
    for (; j < min(key_end, row0 - k0 + 1); j++) add_key(j, 0);
    for (; j < key_end; j++) add_key(j, k0 + j - row0);
    __syncwarp();
  }

  // Normalize and write out (heads merged) and lse = max + log(sum).
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; r++) {
    const int query = row0 + r;
    if (query >= T) break;  // uniform across the warp
    const acc_t total = warp_sum(l[r]);
    const acc_t inv = acc_t(1) / total;
    scalar_t* out_row = out + (static_cast<int64_t>(b) * T + query) * C + h * hd;
#pragma unroll
    for (int c = 0; c < DPL; c++) {
      const int d = lane + 32 * c;
      if (d < hd) out_row[d] = static_cast<scalar_t>(o[r][c] * inv);
    }
    if (lane == 0) lse[(static_cast<int64_t>(b) * n_head + h) * T + query] = m[r] + log_acc(total);
  }
}

// ---------------------------------------------------------------------------
// Backward, D = rowsum(dO * O) per (batch, head, query). Eight lanes per
// row, VEC elements (up to 16 bytes) per load; the lanes' sums are added in
// a fixed tree.
constexpr int kRowDotLanes = 8;

template <typename scalar_t, int VEC>
__global__ void attention_row_dot_kernel(const scalar_t* __restrict__ grad_out,
                                         const scalar_t* __restrict__ out,
                                         acc_type<scalar_t>* __restrict__ row_dot, int64_t rows,
                                         int T, int n_head, int hd) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kRowDotLanes;
  const int sub = threadIdx.x % kRowDotLanes;
  // row enumerates (b, t, h) in memory order of out [B, T, C].
  const int64_t offset = row * hd;  // == (b * T + t) * C + h * hd
  acc_t dot = 0;
  if (row < rows) {
    for (int d = sub * VEC; d < hd; d += kRowDotLanes * VEC) {
      const auto g = load_vec<scalar_t, VEC>(grad_out + offset + d);
      const auto o = load_vec<scalar_t, VEC>(out + offset + d);
#pragma unroll
      for (int k = 0; k < VEC; k++) dot += static_cast<acc_t>(g.v[k]) * static_cast<acc_t>(o.v[k]);
    }
  }
#pragma unroll
  for (int width = kRowDotLanes / 2; width > 0; width /= 2) {
    dot += __shfl_xor_sync(0xffffffffu, dot, width);
  }
  if (row < rows && sub == 0) {
    const int h = static_cast<int>(row % n_head);
    const int64_t bt = row / n_head;
    const int64_t b = bt / T, t = bt % T;
    row_dot[(b * n_head + h) * T + t] = dot;
  }
}

// ---------------------------------------------------------------------------
// Backward, dk and dv. One block per (batch, head, key tile), which walks the
// query tiles from its diagonal to the end; a warp owns 8 keys.
template <typename scalar_t, int DPL, bool DROPOUT>
__global__ void __launch_bounds__(kThreads)
    attention_grad_kv_kernel(const scalar_t* __restrict__ qkv,
                             const scalar_t* __restrict__ grad_out,
                             const acc_type<scalar_t>* __restrict__ lse,
                             const acc_type<scalar_t>* __restrict__ row_dot,
                             scalar_t* __restrict__ grad_qkv, int T, int n_head, int hd,
                             int64_t C, acc_type<scalar_t> scale, DropoutArgs dropout) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* k_s = reinterpret_cast<acc_t*>(smem_raw);  // [kTile][hd]
  acc_t* v_s = k_s + kTile * hd;                      // [kTile][hd]
  acc_t* q_s = v_s + kTile * hd;                      // [kTile][hd + 1] (lane = query)
  acc_t* do_s = q_s + kTile * (hd + 1);               // [kTile][hd + 1]
  acc_t* lse_s = do_s + kTile * (hd + 1);             // [kTile]
  acc_t* dot_s = lse_s + kTile;                       // [kTile]
  acc_t* p_s = dot_s + kTile;                         // [kWarps][kRowsPerWarp][kTile]
  acc_t* ds_s = p_s + kWarps * kRowsPerWarp * kTile;  // [kWarps][kRowsPerWarp][kTile]

  const int tiles = (T + kTile - 1) / kTile;
  const int kt = static_cast<int>(blockIdx.x % tiles);  // small kt = most work, first
  const int bh = static_cast<int>(blockIdx.x / tiles);
  const int b = bh / n_head, h = bh % n_head;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row_stride = 3 * C;
  const scalar_t* head = qkv + static_cast<int64_t>(b) * T * row_stride + h * hd;
  const scalar_t* grad_head = grad_out + static_cast<int64_t>(b) * T * C + h * hd;
  const acc_t* lse_head = lse + static_cast<int64_t>(bh) * T;
  const acc_t* dot_head = row_dot + static_cast<int64_t>(bh) * T;

  const int k0 = kt * kTile;
  load_tile(k_s, hd, head + C, row_stride, k0, T, hd);
  load_tile(v_s, hd, head + 2 * C, row_stride, k0, T, hd);
  const acc_t* k_w = k_s + warp * kRowsPerWarp * hd;
  const acc_t* v_w = v_s + warp * kRowsPerWarp * hd;
  acc_t* p_w = p_s + warp * kRowsPerWarp * kTile;
  acc_t* ds_w = ds_s + warp * kRowsPerWarp * kTile;
  const int key0 = k0 + warp * kRowsPerWarp;  // this warp's first key
  const DeviceMask mask(dropout, DROPOUT);
  const acc_t keep_scale = static_cast<acc_t>(dropout.scale);

  acc_t dk[kRowsPerWarp][DPL], dv[kRowsPerWarp][DPL];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; r++) {
#pragma unroll
    for (int c = 0; c < DPL; c++) dk[r][c] = dv[r][c] = 0;
  }

  for (int qt = kt; qt < tiles; qt++) {
    const int q0 = qt * kTile;
    __syncthreads();  // everyone is done with the previous query tile
    load_tile(q_s, hd + 1, head, row_stride, q0, T, hd);
    load_tile(do_s, hd + 1, grad_head, C, q0, T, hd);
    if (threadIdx.x < kTile) {
      const int query = q0 + threadIdx.x;
      lse_s[threadIdx.x] = query < T ? lse_head[query] : acc_t(0);
      dot_s[threadIdx.x] = query < T ? dot_head[query] : acc_t(0);
    }
    __syncthreads();

    // S and dP of the warp's keys against query q0 + lane.
    acc_t s[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; r++) s[r] = dp[r] = 0;
    const acc_t* q_row = q_s + lane * (hd + 1);
    const acc_t* do_row = do_s + lane * (hd + 1);
    for (int d = 0; d < hd; d++) {
      const acc_t qd = q_row[d], dod = do_row[d];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; r++) {
        s[r] += k_w[r * hd + d] * qd;
        dp[r] += v_w[r * hd + d] * dod;
      }
    }
    const int query = q0 + lane;
    const acc_t lse_q = lse_s[lane], dot_q = dot_s[lane];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; r++) {
      const bool visible = key0 + r <= query && query < T;
      const acc_t p = visible ? exp_acc(s[r] * scale - lse_q) : acc_t(0);
      if constexpr (DROPOUT) {  // (P o Z)^T and (P o (Z o dP - D))^T
        const acc_t z = probability_multiplier(mask, keep_scale, visible, bh, T, query, key0 + r);
        p_w[r * kTile + lane] = p * z;
        ds_w[r * kTile + lane] = p * (z * dp[r] - dot_q) * scale;
      } else {
        p_w[r * kTile + lane] = p;
        ds_w[r * kTile + lane] = p * (dp[r] - dot_q) * scale;
      }
    }
    __syncwarp();

    // dv += P^T dO, dk += dS^T q over the pairs each key sees: queries before
    // the warp's first key see none of its keys; query q0 + i before key0 + 7
    // is seen by keys r <= q0 + i - key0 only, and the others skip it rather
    // than multiply its dO and q (maybe NaN) by their 0.
    const int query_begin = max(0, key0 - q0);
    const int query_end = min(kTile, T - q0);
    const auto add_query = [&](int i, int last_row) {
      acc_t dov[DPL], qv[DPL];
#pragma unroll
      for (int c = 0; c < DPL; c++) {
        const int d = lane + 32 * c;
        dov[c] = d < hd ? do_s[i * (hd + 1) + d] : acc_t(0);
        qv[c] = d < hd ? q_s[i * (hd + 1) + d] : acc_t(0);
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; r++) {
        if (r > last_row) continue;
        const acc_t pi = p_w[r * kTile + i], dsi = ds_w[r * kTile + i];
#pragma unroll
        for (int c = 0; c < DPL; c++) {
          dv[r][c] += pi * dov[c];
          dk[r][c] += dsi * qv[c];
        }
      }
    };
    int i = query_begin;
    for (; i < min(query_end, key0 - q0 + kRowsPerWarp - 1); i++) add_query(i, q0 + i - key0);
    for (; i < query_end; i++) add_query(i, kRowsPerWarp - 1);
    __syncwarp();
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; r++) {
    const int key = key0 + r;
    if (key >= T) break;
    scalar_t* grad_row = grad_qkv + (static_cast<int64_t>(b) * T + key) * row_stride + h * hd;
#pragma unroll
    for (int c = 0; c < DPL; c++) {
      const int d = lane + 32 * c;
      if (d < hd) {
        grad_row[C + d] = static_cast<scalar_t>(dk[r][c]);
        grad_row[2 * C + d] = static_cast<scalar_t>(dv[r][c]);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Backward, dq. One block per (batch, head, query tile), which walks the key
// tiles from 0 to its diagonal; a warp owns 8 queries.
template <typename scalar_t, int DPL, bool DROPOUT>
__global__ void __launch_bounds__(kThreads)
    attention_grad_q_kernel(const scalar_t* __restrict__ qkv,
                            const scalar_t* __restrict__ grad_out,
                            const acc_type<scalar_t>* __restrict__ lse,
                            const acc_type<scalar_t>* __restrict__ row_dot,
                            scalar_t* __restrict__ grad_qkv, int T, int n_head, int hd,
                            int64_t C, acc_type<scalar_t> scale, DropoutArgs dropout) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // [kTile][hd]
  acc_t* do_s = q_s + kTile * hd;                     // [kTile][hd]
  acc_t* k_s = do_s + kTile * hd;                     // [kTile][hd + 1] (lane = key)
  acc_t* v_s = k_s + kTile * (hd + 1);                // [kTile][hd + 1]
  acc_t* ds_s = v_s + kTile * (hd + 1);               // [kWarps][kRowsPerWarp][kTile]

  const int tiles = (T + kTile - 1) / kTile;
  const int qt = tiles - 1 - static_cast<int>(blockIdx.x % tiles);
  const int bh = static_cast<int>(blockIdx.x / tiles);
  const int b = bh / n_head, h = bh % n_head;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row_stride = 3 * C;
  const scalar_t* head = qkv + static_cast<int64_t>(b) * T * row_stride + h * hd;
  const scalar_t* grad_head = grad_out + static_cast<int64_t>(b) * T * C + h * hd;

  const int q0 = qt * kTile;
  load_tile(q_s, hd, head, row_stride, q0, T, hd);
  load_tile(do_s, hd, grad_head, C, q0, T, hd);
  const acc_t* q_w = q_s + warp * kRowsPerWarp * hd;
  const acc_t* do_w = do_s + warp * kRowsPerWarp * hd;
  acc_t* ds_w = ds_s + warp * kRowsPerWarp * kTile;
  const int row0 = q0 + warp * kRowsPerWarp;
  const DeviceMask mask(dropout, DROPOUT);
  const acc_t keep_scale = static_cast<acc_t>(dropout.scale);

  acc_t lse_r[kRowsPerWarp], dot_r[kRowsPerWarp], dq[kRowsPerWarp][DPL];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; r++) {
    const int query = row0 + r;
    lse_r[r] = query < T ? lse[static_cast<int64_t>(bh) * T + query] : acc_t(0);
    dot_r[r] = query < T ? row_dot[static_cast<int64_t>(bh) * T + query] : acc_t(0);
#pragma unroll
    for (int c = 0; c < DPL; c++) dq[r][c] = 0;
  }

  for (int kt = 0; kt <= qt; kt++) {
    const int k0 = kt * kTile;
    __syncthreads();
    load_tile(k_s, hd + 1, head + C, row_stride, k0, T, hd);
    load_tile(v_s, hd + 1, head + 2 * C, row_stride, k0, T, hd);
    __syncthreads();
    if (k0 > row0 + kRowsPerWarp - 1) continue;

    acc_t s[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; r++) s[r] = dp[r] = 0;
    const acc_t* k_row = k_s + lane * (hd + 1);
    const acc_t* v_row = v_s + lane * (hd + 1);
    for (int d = 0; d < hd; d++) {
      const acc_t kd = k_row[d], vd = v_row[d];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; r++) {
        s[r] += q_w[r * hd + d] * kd;
        dp[r] += do_w[r * hd + d] * vd;
      }
    }
    const int key = k0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; r++) {
      const int query = row0 + r;
      const bool visible = key <= query && query < T;
      const acc_t p = visible ? exp_acc(s[r] * scale - lse_r[r]) : acc_t(0);
      if constexpr (DROPOUT) {  // P o (Z o dP - D)
        const acc_t z = probability_multiplier(mask, keep_scale, visible, bh, T, query, key);
        ds_w[r * kTile + lane] = p * (z * dp[r] - dot_r[r]) * scale;
      } else {
        ds_w[r * kTile + lane] = p * (dp[r] - dot_r[r]) * scale;
      }
    }
    __syncwarp();

    // dq += dS k over the pairs each query sees (as o += P v in the forward:
    // a masked pair is skipped, its k may be a later position's NaN).
    const int key_end = min(kTile, row0 + kRowsPerWarp - k0);
    const auto add_key = [&](int j, int first_row) {
      acc_t kv[DPL];
#pragma unroll
      for (int c = 0; c < DPL; c++) {
        const int d = lane + 32 * c;
        kv[c] = d < hd ? k_s[j * (hd + 1) + d] : acc_t(0);
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; r++) {
        if (r < first_row) continue;
        const acc_t dsj = ds_w[r * kTile + j];
#pragma unroll
        for (int c = 0; c < DPL; c++) dq[r][c] += dsj * kv[c];
      }
    };
    int j = 0;
    for (; j < min(key_end, row0 - k0 + 1); j++) add_key(j, 0);
    for (; j < key_end; j++) add_key(j, k0 + j - row0);
    __syncwarp();
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; r++) {
    const int query = row0 + r;
    if (query >= T) break;
    scalar_t* grad_row = grad_qkv + (static_cast<int64_t>(b) * T + query) * row_stride + h * hd;
#pragma unroll
    for (int c = 0; c < DPL; c++) {
      const int d = lane + 32 * c;
      if (d < hd) grad_row[d] = static_cast<scalar_t>(dq[r][c]);
    }
  }
}

// ---------------------------------------------------------------------------
// Launchers.

// Calls fn(std::integral_constant<int, DPL>) with DPL = ceil(hd / 32).
template <typename Fn>
void with_dims_per_lane(int64_t hd, const Fn& fn) {
  switch ((hd + 31) / 32) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    default: fn(std::integral_constant<int, 4>{}); break;
  }
}

void check_head_dim(const char* op, int64_t hd) {
  // The op boundary (ops.cpp) should reject this first; this keeps a direct
  // call from running past the register tiles.
  NANOBLOCK_CHECK(hd >= 1 && hd <= kMaxHeadDim, op, ": the CUDA kernels support head dims 1..",
                  kMaxHeadDim, " (n_embd / n_head), got ", hd);
}

template <typename acc_t>
size_t forward_shared_bytes(int64_t hd) {
  return sizeof(acc_t) * (kTile * hd + kTile * (hd + 1) + kTile * hd + kTile * kTile);
}

template <typename acc_t>
size_t grad_kv_shared_bytes(int64_t hd) {
  return sizeof(acc_t) * (2 * kTile * hd + 2 * kTile * (hd + 1) + 2 * kTile + 2 * kTile * kTile);
}

template <typename acc_t>
size_t grad_q_shared_bytes(int64_t hd) {
  return sizeof(acc_t) * (2 * kTile * hd + 2 * kTile * (hd + 1) + kTile * kTile);
}

// Whether the wgmma kernels take this call: float16 / bfloat16 (the mma
// path's checks: dtype, alignment), head dim 64 or 128, no dropout, allowed,
// and a compute capability 9.0 device with sm_90a code in the build.
bool use_wgmma(const Tensor& qkv, int64_t hd, const Tensor& other, const DropoutArgs& drop) {
  return (hd == 64 || hd == 128) && drop.p == 0 && wgmma_attention_allowed() &&
         mma_attention_supported(qkv, hd, other) && wgmma_attention_available();
}

// Read once, when the library loads; then changed only by
// allow_wgmma_attention (the op nanoblock::attention_kernels).
std::atomic<bool> wgmma_allowed{[] {
  const char* v = std::getenv("NANOBLOCK_ATTENTION_KERNELS");
  return v == nullptr || std::string(v) != "mma";
}()};

}  // namespace

bool wgmma_attention_allowed() { return wgmma_allowed.load(std::memory_order_relaxed); }
void allow_wgmma_attention(bool allowed) {
  wgmma_allowed.store(allowed, std::memory_order_relaxed);
}

std::tuple<Tensor, Tensor> causal_attention_forward(const Tensor& qkv, int64_t n_head,
                                                    const Dropout& dropout) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  Tensor out = at::empty({B, T, C}, qkv.options());
  Tensor lse = at::empty({B, n_head, T}, qkv.options().dtype(stats_dtype(qkv.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  const int64_t hd = C / n_head;
  check_head_dim("nanoblock.causal_attention_forward", hd);
  const DropoutArgs drop = dropout_args(dropout);
  if (use_wgmma(qkv, hd, Tensor(), drop)) {
    wgmma_attention_forward_into(qkv, n_head, out, lse);
    return {out, lse};
  }
  if (mma_attention_supported(qkv, hd, Tensor())) {
    mma_attention_forward(qkv, n_head, out, lse, drop);
    return {out, lse};
  }
  const cudaStream_t stream = current_stream();
  NANOBLOCK_DISPATCH(qkv.scalar_type(), "causal_attention_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(hd));
    const int64_t blocks = B * n_head * ceil_div(T, kTile);
    const size_t smem = forward_shared_bytes<acc_t>(hd);
    with_dims_per_lane(hd, [&](auto dpl_constant) {
      constexpr int DPL = decltype(dpl_constant)::value;
      with_dropout(drop, [&](auto dropout_constant) {
        constexpr bool DROPOUT = decltype(dropout_constant)::value;
        auto kernel = attention_forward_kernel<scalar_t, DPL, DROPOUT>;
        allow_shared_memory(kernel, smem);
        kernel<<<blocks, kThreads, smem, stream>>>(
            qkv.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
            lse.mutable_data_ptr<acc_t>(), static_cast<int>(T), static_cast<int>(n_head),
            static_cast<int>(hd), C, scale, drop);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {out, lse};
}

Tensor causal_attention_backward(const Tensor& grad_out, const Tensor& qkv, const Tensor& out,
                                 const Tensor& lse, int64_t n_head, const Dropout& dropout) {
  Tensor grad_qkv = at::empty_like(qkv);
  if (grad_qkv.numel() == 0) return grad_qkv;
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  const int64_t hd = C / n_head;
  check_head_dim("nanoblock.causal_attention_backward", hd);
  const DropoutArgs drop = dropout_args(dropout);
  const cudaStream_t stream = current_stream();
  NANOBLOCK_DISPATCH(qkv.scalar_type(), "causal_attention_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(hd));
    const scalar_t* qkv_ptr = qkv.const_data_ptr<scalar_t>();
    const scalar_t* grad_out_ptr = grad_out.const_data_ptr<scalar_t>();
    const acc_t* lse_ptr = lse.const_data_ptr<acc_t>();
    scalar_t* grad_ptr = grad_qkv.mutable_data_ptr<scalar_t>();

    // D = rowsum(dO * O), one warp per (b, t, h).
    Tensor row_dot = at::empty({B, n_head, T}, lse.options());
    const int64_t rows = B * T * n_head;
    const scalar_t* out_ptr = out.const_data_ptr<scalar_t>();
    const int vec = vector_width<scalar_t>(hd, {grad_out_ptr, out_ptr});
    with_vector_width<scalar_t>(vec, [&](auto vec_constant) {
      constexpr int VEC = decltype(vec_constant)::value;
      attention_row_dot_kernel<scalar_t, VEC>
          <<<ceil_div(rows * kRowDotLanes, 256), 256, 0, stream>>>(
              grad_out_ptr, out_ptr, row_dot.mutable_data_ptr<acc_t>(), rows,
              static_cast<int>(T), static_cast<int>(n_head), static_cast<int>(hd));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const acc_t* dot_ptr = row_dot.const_data_ptr<acc_t>();
    if (use_wgmma(qkv, hd, grad_out, drop)) {
      wgmma_attention_backward_into(grad_out, qkv, lse, row_dot, n_head, grad_qkv);
      return;
    }
    if (mma_attention_supported(qkv, hd, grad_out)) {
      mma_attention_backward(grad_out, qkv, lse, row_dot, n_head, grad_qkv, drop);
      return;
    }

    const int64_t blocks = B * n_head * ceil_div(T, kTile);
    with_dims_per_lane(hd, [&](auto dpl_constant) {
      constexpr int DPL = decltype(dpl_constant)::value;
      with_dropout(drop, [&](auto dropout_constant) {
        constexpr bool DROPOUT = decltype(dropout_constant)::value;
        auto kv_kernel = attention_grad_kv_kernel<scalar_t, DPL, DROPOUT>;
        const size_t kv_smem = grad_kv_shared_bytes<acc_t>(hd);
        allow_shared_memory(kv_kernel, kv_smem);
        kv_kernel<<<blocks, kThreads, kv_smem, stream>>>(
            qkv_ptr, grad_out_ptr, lse_ptr, dot_ptr, grad_ptr, static_cast<int>(T),
            static_cast<int>(n_head), static_cast<int>(hd), C, scale, drop);
        C10_CUDA_KERNEL_LAUNCH_CHECK();

        auto q_kernel = attention_grad_q_kernel<scalar_t, DPL, DROPOUT>;
        const size_t q_smem = grad_q_shared_bytes<acc_t>(hd);
        allow_shared_memory(q_kernel, q_smem);
        q_kernel<<<blocks, kThreads, q_smem, stream>>>(
            qkv_ptr, grad_out_ptr, lse_ptr, dot_ptr, grad_ptr, static_cast<int>(T),
            static_cast<int>(n_head), static_cast<int>(hd), C, scale, drop);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return grad_qkv;
}

}  // namespace nanoblock::cuda
