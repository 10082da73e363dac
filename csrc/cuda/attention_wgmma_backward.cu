// Causal attention backward on Hopper's warpgroup MMA (wgmma.mma_async,
// sm_90a), for float16 / bfloat16 and head dims 64 and 128: the two
// backward kernels of attention_mma.cu (read that file's header first) with
// every matrix product issued a warpgroup (4 warps, 128 threads) at a time.
// attention.cu's dispatch takes it on Hopper (attention_wgmma.cuh says
// when); scripts/try_wgmma_backward.py times its tile shapes.
//
//   in   qkv [B, T, 3C] (q, k, v of head h at columns h*hd, C + h*hd,
//        2C + h*hd of each row), grad_out [B, T, C], lse [B, n_head, T]
//        (float32, natural log, from the forward), row_dot [B, n_head, T]
//        (float32, D = rowsum(grad_out * out) per head), any T >= 1
//   out  grad_qkv [B, T, 3C]: grad_kv writes the k and v columns, grad_q
//        the q columns; rows past T are not written
//
//   grad_kv  [grid: key tiles x (B * n_head)], small key tiles first (most
//            work). WG warpgroups, 64 keys each (block key tile 64 WG);
//            query tiles of BQ from the diagonal on. Keys are the rows
//            (M) of every product, as in attention_mma.cu's grad_kv:
//              S^T  = K Q^T    wgmma m64n{BQ}k16, A = K, B = Q  (smem, K-major)
//              dP^T = V dO^T   wgmma m64n{BQ}k16, A = V, B = dO (smem, K-major)
//              P^T  = exp2(S^T scale_log2 - lse log2 e), masked
//              dS^T = P^T (dP^T - D)  (the softmax scale left out)
//              dV  += P^T dO   wgmma m64n{HD}k16, A = P^T (registers), B = dO
//                              (smem, MN-major)
//              dK  += dS^T Q   same, A = dS^T, B = Q; times scale when stored
//   grad_q   [grid: query tiles x (B * n_head)], longest first. WG
//            warpgroups, 64 queries each; key tiles of BK up to the diagonal:
//              S = Q K^T, dP = dO V^T (K-major, as the forward's S), P, dS,
//              dQ += dS K      A = dS (registers), B = K (smem, MN-major);
//                              times scale when stored
// The softmax scale multiplies dK and dQ once at the end instead of every
// element of dS (one multiply a score less; as FlashAttention does). At head
// dim 64 the scale is 2^-3, which commutes with every rounding on the way
// (dS in float32, dS in 16 bits, the tensor cores' sums) away from
// underflow: the same bits as scaling dS, but for float16 dS values near its
// subnormal range (by construction; not compared bit for bit on the GPU).
// Each output element is owned by one thread and summed in a fixed order:
// deterministic, no atomics (as attention_mma.cu). Masked P and dS are set
// to 0 by select; a NaN or Inf in q, k or dO stays causal: on the diagonal
// tiles the block zeroes the non-finite values of the tile that the value
// products read (q and dO in grad_kv, k in grad_q) and adds their exact
// kind to the rows that see them (wgmma.cuh, (d)).
//
// The shared-memory layout (128-byte swizzled 64-column panels), the
// descriptors, the register layouts of A and D and the ordering rules are
// wgmma.cuh's (header comment, layouts (a), (b), (c)); every product here is
// one of the forward's two kinds: issue_scores (two K-major tiles over hd)
// or issue_values (A from registers, B a tile reduced over its rows). With
// keys as rows, a thread of grad_kv holds, of the accumulator element
// st[4j + e], key  wg_k0 + 16 warp + g + 8 (e / 2) and query
// q0 + 8j + 2t + e % 2 (g = lane / 4, t = lane % 4); lse and D of those
// queries come from shared memory (copied with the query tile).
//
// Schedule per tile and warpgroup: S (and S^T) issued and committed, dP
// issued and committed; wait for S only (wait_group 1), P computed while the
// tensor cores run dP; wait; dS; the products into dV, dK (or dQ) issued in
// one group and waited for before the next block barrier. The copy of the
// next tile (two buffers) is started right after each barrier.
#include "../check.h"
#include "attention_wgmma.cuh"
#include "common.cuh"
#include "wgmma.cuh"

#include <type_traits>

namespace nanoblock::cuda {

namespace {

// The schedules of grad_kv (see the kernel).
enum GradKvSchedule : int { kSerial = 0, kOverlap = 1, kPipelined = 2 };

// grad_kv: head dim HD, BQ queries per query tile, WG warpgroups (64 keys
// each), MIN_BLOCKS blocks per multiprocessor asked of the compiler,
// SCHEDULE a GradKvSchedule.
template <int HD, int BQ, int WG, int MIN_BLOCKS, int SCHEDULE>
struct GradKvTiles {
  static_assert(HD == 64 || HD == 128, "wgmma N for dK, dV: 64 or 128");
  static_assert(BQ == 64 || BQ == 128, "wgmma N for S^T: 64 or 128 queries");
  static constexpr int kHeadDim = HD;
  static constexpr int kQueries = BQ;
  static constexpr int kKeys = kWarpgroupRows * WG;
  static constexpr int kWarpgroups = WG;
  static constexpr int kThreads = kWarpgroupThreads * WG;
  static constexpr int kMinBlocks = MIN_BLOCKS;
  static constexpr int kSchedule = SCHEDULE;
  static constexpr int kBuffers = SCHEDULE == kPipelined ? 3 : 2;  // query tiles in flight
  static constexpr int kKvBytes = kKeys * HD * 2;  // the K (or V) tile, 16-bit elements
  static constexpr int kQBytes = BQ * HD * 2;      // one Q (or dO) tile
  // k, v, then q [kBuffers], dO [kBuffers], then lse, D [kBuffers][BQ]
  // floats; plus the slack to align the start to 1024.
  static constexpr int kSharedBytes =
      2 * kKvBytes + 2 * kBuffers * kQBytes + 2 * kBuffers * BQ * 4 + kAtomBytes;
  static_assert(kQBytes % kAtomBytes == 0 && kKvBytes % kAtomBytes == 0, "1024-aligned tiles");
  static_assert(kSharedBytes <= 227 * 1024, "shared memory of one block");
};

// grad_q: head dim HD, BK keys per key tile, WG warpgroups (64 queries
// each), MIN_BLOCKS as above, SCHEDULE kSerial or kPipelined (see the
// kernel).
template <int HD, int BK, int WG, int MIN_BLOCKS, int SCHEDULE>
struct GradQTiles {
  static_assert(HD == 64 || HD == 128, "wgmma N for dQ: 64 or 128");
  static_assert(BK == 64 || BK == 128, "wgmma N for S: 64 or 128 keys");
  static constexpr int kHeadDim = HD;
  static constexpr int kKeys = BK;
  static constexpr int kQueries = kWarpgroupRows * WG;
  static constexpr int kWarpgroups = WG;
  static constexpr int kThreads = kWarpgroupThreads * WG;
  static constexpr int kMinBlocks = MIN_BLOCKS;
  static_assert(SCHEDULE == kSerial || SCHEDULE == kPipelined, "grad_q schedules");
  static constexpr int kSchedule = SCHEDULE;
  static constexpr int kBuffers = SCHEDULE == kPipelined ? 3 : 2;  // key / value tiles in flight
  static constexpr int kQBytes = kQueries * HD * 2;  // the Q (or dO) tile
  static constexpr int kKvBytes = BK * HD * 2;       // one K (or V) tile
  // q, dO, then k [kBuffers], v [kBuffers]; plus the alignment slack.
  static constexpr int kSharedBytes = 2 * kQBytes + 2 * kBuffers * kKvBytes + kAtomBytes;
  static_assert(kQBytes % kAtomBytes == 0 && kKvBytes % kAtomBytes == 0, "1024-aligned tiles");
  static_assert(kSharedBytes <= 227 * 1024, "shared memory of one block");
};

#if NANOBLOCK_WGMMA_DEVICE

// Issues acc1 = A1 B1^T and acc2 = A2 B2^T (issue_scores: K-major tiles over
// hd, A tiles of A_ROWS rows, B tiles of N rows), each in its own commit
// group, and waits for the first: acc2 is still being written on return
// (wgmma_wait<0> and keep_in_order(acc2) before it is read).
template <typename scalar_t, int HD, int A_ROWS, int N>
__device__ __forceinline__ void issue_score_pair(float (&acc1)[N / 2], uint32_t a1, uint32_t b1,
                                                 float (&acc2)[N / 2], uint32_t a2, uint32_t b2) {
  keep_in_order(acc1);
  keep_in_order(acc2);
  wgmma_fence();
  issue_scores<scalar_t, HD, A_ROWS, N>(acc1, a1, b1);
  wgmma_commit();
  issue_scores<scalar_t, HD, A_ROWS, N>(acc2, a2, b2);
  wgmma_commit();
  wgmma_wait<1>();
  keep_in_order(acc1);
}

// Where a block of either kernel works, from its index: tile `tile` of the
// `tiles` per (batch, head) (blocks in block_tile's order, most work first:
// small key tiles in grad_kv, large query tiles in grad_q), head bh = b n_head + h,
// and that head's row 0 in qkv (q; k at + C, v at + 2C; rows 3C apart),
// grad_out (rows C apart) and grad_qkv (as qkv).
template <typename scalar_t>
struct BlockHead {
  int tile, bh;
  const scalar_t* qkv;
  const scalar_t* grad_out;
  scalar_t* grad_qkv;
};

template <int HD, typename scalar_t>
__device__ __forceinline__ BlockHead<scalar_t> block_head(const scalar_t* qkv,
                                                          const scalar_t* grad_out,
                                                          scalar_t* grad_qkv, int T, int n_head,
                                                          int64_t C, int tiles,
                                                          bool small_tiles_first) {
  const BlockTile order = block_tile(tiles, T, HD);
  const int i = order.rank, bh = order.bh;
  const int64_t first_row = static_cast<int64_t>(bh / n_head) * T;
  const int column = bh % n_head * HD;
  return {small_tiles_first ? i : tiles - 1 - i, bh, qkv + first_row * 3 * C + column,
          grad_out + first_row * C + column, grad_qkv + first_row * 3 * C + column};
}

// Writes rows row and row + 8 (those before T) of a [64][HD] float
// accumulator held in layout (b) (columns 8j + 2t, 8j + 2t + 1), times
// scale, to dst, rows row_stride elements apart, as 16-bit values (as
// attention_mma.cu's store_rows; scale: the softmax scale that dS leaves out).
template <typename scalar_t, int HD>
__device__ __forceinline__ void store_accumulator_rows(scalar_t* dst, int64_t row_stride, int row,
                                                       int T, const float (&acc)[HD / 2],
                                                       float scale = 1.f) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int r = row + 8 * i;
    if (r >= T) continue;
    scalar_t* p = dst + static_cast<int64_t>(r) * row_stride + 2 * t;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
      *reinterpret_cast<uint32_t*>(p + 8 * j) =
          pack2<scalar_t>(acc[4 * j + 2 * i] * scale, acc[4 * j + 2 * i + 1] * scale);
    }
  }
}

#endif  // NANOBLOCK_WGMMA_DEVICE

// ---------------------------------------------------------------------------
// grad_kv: one block per key tile (64 WG keys) of one (batch, head); query
// tiles from the one holding the block's first key to the last. A
// warpgroup takes part in every barrier and copy but skips the products of
// query tiles wholly before its keys; the tiles that need the causal mask
// (a query before one of its keys, or past T) run in loops of their own so
// that the code between a wgmma's issue and its wait has no branch.
// Schedules of a step (query tile qt, in buffer (qt - first tile) % kBuffers):
//   serial:    S^T, dP^T issued; wait for S^T; P^T (while dP^T runs); wait
//              for dP^T; dS^T; dV and dK issued, waited for.
//   overlap:   dV issued as soon as P^T is ready, so that it runs while dS^T
//              is computed: S^T, dP^T issued; wait for S^T; P^T; dV issued;
//              wait for dP^T (dV may still run); dS^T; dK issued; wait for
//              both.
//   pipelined: overlap without the last wait: dK of tile qt runs on into
//              step qt + 1 (its barrier, its copy, the issue of its S^T and
//              dP^T), whose first wait (for S^T) also covers dV and dK of
//              tile qt. Three query buffers: the copy made after the
//              barrier of step qt + 1 goes to the buffer of tile qt - 1,
//              whose products every warpgroup waited for in step qt.
template <typename scalar_t, typename Tiles>
__global__ void __launch_bounds__(Tiles::kThreads, Tiles::kMinBlocks)
    wgmma_grad_kv_kernel(const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ grad_out,
                         const float* __restrict__ lse, const float* __restrict__ row_dot,
                         scalar_t* __restrict__ grad_qkv, int T, int n_head, int64_t C,
                         float scale_log2, float scale) {
#if NANOBLOCK_WGMMA_DEVICE
  constexpr int HD = Tiles::kHeadDim, BQ = Tiles::kQueries, BK = Tiles::kKeys;
  constexpr int kThreads = Tiles::kThreads, kBuffers = Tiles::kBuffers;
  constexpr int kQBytes = Tiles::kQBytes;
  extern __shared__ unsigned char smem_raw[];
  // Shared-space addresses; every tile 1024-byte aligned (layout (a)).
  const uint32_t smem_base = shared_address(smem_raw);
  const uint32_t k_s = (smem_base + kAtomBytes - 1) & ~uint32_t(kAtomBytes - 1);
  const uint32_t v_s = k_s + Tiles::kKvBytes;
  const uint32_t q_s = v_s + Tiles::kKvBytes;      // [kBuffers] query tiles
  const uint32_t do_s = q_s + kBuffers * kQBytes;  // [kBuffers] dO tiles
  float* lse_s = reinterpret_cast<float*>(smem_raw + (do_s + kBuffers * kQBytes - smem_base));
  float* dot_s = lse_s + kBuffers * BQ;  // lse_s, dot_s: [kBuffers][BQ]

  const auto place = block_head<HD>(qkv, grad_out, grad_qkv, T, n_head, C, (T + BK - 1) / BK,
                                    true);
  const int kt = place.tile;
  const scalar_t* head = place.qkv;
  const scalar_t* grad_head = place.grad_out;
  const float* lse_head = lse + static_cast<int64_t>(place.bh) * T;
  const float* dot_head = row_dot + static_cast<int64_t>(place.bh) * T;
  const int64_t row_stride = 3 * C;
  const int wg = warpgroup_index();
  const int warp = threadIdx.x % kWarpgroupThreads / 32, lane = threadIdx.x % 32, t = lane % 4;

  const int k0 = kt * BK;
  const int wg_k0 = k0 + kWarpgroupRows * wg;   // this warpgroup's first key
  const int key = wg_k0 + 16 * warp + lane / 4;  // this thread's keys: key, key + 8
  const int first_tile = k0 / BQ, query_tiles = (T + BQ - 1) / BQ;
  // Query tile qt lies in buffer (qt - first_tile) % kBuffers.
  const auto buffer = [&](int qt) { return (qt - first_tile) % kBuffers; };
  // Query and dO tiles first_tile, first_tile + 1, ... in that order.
  TileCopyWalk<BQ, HD, kThreads, scalar_t> q_walk(head, row_stride, first_tile * BQ);
  TileCopyWalk<BQ, HD, kThreads, scalar_t> grad_walk(grad_head, C, first_tile * BQ);
  const auto copy_query_tile = [&](int qt) {
    const int i = buffer(qt);
    q_walk.copy_next(q_s + i * kQBytes, T);
    grad_walk.copy_next(do_s + i * kQBytes, T);
    copy_row_values_async<BQ, kThreads>(lse_s + i * BQ, lse_head, qt * BQ, T);
    copy_row_values_async<BQ, kThreads>(dot_s + i * BQ, dot_head, qt * BQ, T);
    copy_async_commit();
  };
  copy_tile_async<BK, HD, kThreads>(k_s, head + C, row_stride, k0, T);
  copy_tile_async<BK, HD, kThreads>(v_s, head + 2 * C, row_stride, k0, T);
  copy_query_tile(first_tile);  // one commit group with the key and value tiles

  // This warpgroup's 64 rows of K and V: panel p at + p * BK * 128.
  const uint32_t k_wg = k_s + wg * kWarpgroupRows * kRowBytes;
  const uint32_t v_wg = v_s + wg * kWarpgroupRows * kRowBytes;
  float st[BQ / 2] = {}, dpt[BQ / 2] = {};
  float dk[HD / 2] = {}, dv[HD / 2] = {};
  uint32_t p_a[BQ / 16][4] = {}, ds_a[BQ / 16][4] = {};

  // Whether tile qt had non-finite values of q or dO zeroed (layout (d),
  // wgmma.cuh): block-wide, on the tiles with a query before the block's last key.
  bool zeroed = false;
  const auto next_tile = [&](int qt) {
    copy_async_wait_all_for_tensor_cores();
    __syncthreads();  // tile qt is in; every warpgroup is done with tile qt - 1
    if (qt + 1 < query_tiles) copy_query_tile(qt + 1);
    const uint32_t tiles[2] = {q_s + buffer(qt) * kQBytes, do_s + buffer(qt) * kQBytes};
    zeroed = qt * BQ < k0 + BK - 1 && zero_nonfinite_tiles<scalar_t, kQBytes, kThreads>(tiles);
  };
  const auto step = [&](int qt, auto mask) {
    const int i = buffer(qt);
    const uint32_t qb = q_s + i * kQBytes, dob = do_s + i * kQBytes;
    const float* lse_b = lse_s + i * BQ;
    const float* dot_b = dot_s + i * BQ;
    const int q0 = qt * BQ;
    // S^T = K Q^T is in; dP^T = V dO^T may still run.
    issue_score_pair<scalar_t, HD, BK, BQ>(st, k_wg, qb, dpt, v_wg, dob);
    // P^T in place of S^T (query rows past T have lse 0 and are masked).
#pragma unroll
    for (int j = 0; j < BQ / 8; j++) {
      const float2 lse2 = *reinterpret_cast<const float2*>(lse_b + 8 * j + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const float row_lse = (e & 1) ? lse2.y : lse2.x;
        float p = exp2_approx(fmaf(st[4 * j + e], scale_log2, -row_lse * kLog2e));
        if constexpr (decltype(mask)::value) {
          const int query = q0 + 8 * j + 2 * t + (e & 1);
          if (query < key + 8 * (e >> 1) || query >= T) p = 0.f;
        }
        st[4 * j + e] = p;
      }
    }
    constexpr bool dv_early = Tiles::kSchedule != kSerial;  // overlap, pipelined
    if constexpr (dv_early) {
      scores_to_a<scalar_t, BQ>(p_a, st);
      keep_in_order(dv);
      keep_in_order(p_a);
      wgmma_fence();
      issue_values<scalar_t, HD, BQ>(dv, p_a, dob);  // dV += P^T dO
      wgmma_commit();
      wgmma_wait<1>();  // dP^T is in; dV may still run (dv untouched until the end)
    } else {
      wgmma_wait<0>();  // dP^T is in
    }
    keep_in_order(dpt);
#pragma unroll
    for (int j = 0; j < BQ / 8; j++) {
      const float2 d2 = *reinterpret_cast<const float2*>(dot_b + 8 * j + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const float row_d = (e & 1) ? d2.y : d2.x;
        float ds = st[4 * j + e] * (dpt[4 * j + e] - row_d);
        if constexpr (decltype(mask)::value) {  // by select: dP^T may be NaN there
          const int query = q0 + 8 * j + 2 * t + (e & 1);
          if (query < key + 8 * (e >> 1) || query >= T) ds = 0.f;
        }
        dpt[4 * j + e] = ds;
      }
    }
    if constexpr (!dv_early) scores_to_a<scalar_t, BQ>(p_a, st);
    scores_to_a<scalar_t, BQ>(ds_a, dpt);
    if constexpr (!dv_early) {
      keep_in_order(dv);
      keep_in_order(p_a);
    }
    keep_in_order(dk);
    keep_in_order(ds_a);
    wgmma_fence();
    if constexpr (!dv_early) issue_values<scalar_t, HD, BQ>(dv, p_a, dob);  // dV += P^T dO
    issue_values<scalar_t, HD, BQ>(dk, ds_a, qb);  // dK += dS^T Q
    wgmma_commit();
    if (Tiles::kSchedule != kPipelined || zeroed) {
      wgmma_wait<0>();
      keep_in_order(dv);
      keep_in_order(dk);
    }
    if (zeroed) {
      add_nonfinite_products<BQ, HD, true>(dv, p_a, grad_head + q0 * C, C, key, q0, T);
      add_nonfinite_products<BQ, HD, true>(dk, ds_a, head + q0 * row_stride, row_stride, key, q0,
                                           T);
    }
  };

  // Warpgroup-uniform loop bounds: this warpgroup's first query tile (the
  // one holding query wg_k0; none when its keys all lie past T); tiles
  // before diag_end hold a query before one of its keys; tiles from
  // full_end on hold a query past T.
  const int my_first = wg_k0 >= T ? query_tiles : wg_k0 / BQ;
  const int diag_end = min(query_tiles, max(my_first, (wg_k0 + kWarpgroupRows - 1 + BQ - 1) / BQ));
  const int full_end = max(diag_end, min(query_tiles, T / BQ));
  int qt = first_tile;
  for (; qt < my_first; qt++) next_tile(qt);
  for (; qt < diag_end; qt++) {
    next_tile(qt);
    step(qt, std::true_type{});
  }
  for (; qt < full_end; qt++) {
    next_tile(qt);
    step(qt, std::false_type{});
  }
  for (; qt < query_tiles; qt++) {
    next_tile(qt);
    step(qt, std::true_type{});
  }
  wgmma_wait<0>();  // the last dK (pipelined)
  keep_in_order(dv);
  keep_in_order(dk);

  store_accumulator_rows<scalar_t, HD>(place.grad_qkv + C, row_stride, key, T, dk, scale);
  store_accumulator_rows<scalar_t, HD>(place.grad_qkv + 2 * C, row_stride, key, T, dv);
#endif  // NANOBLOCK_WGMMA_DEVICE
}

// ---------------------------------------------------------------------------
// grad_q: one block per query tile (64 WG queries) of one (batch, head);
// key tiles up to the diagonal, as in the forward (attention_wgmma.cu),
// with lse and D of the thread's two rows in registers. Schedules of a step
// (key tile kt): serial: S, dP issued; wait for S; P (while dP runs); wait
// for dP; dS; dQ issued, waited for. pipelined: the same without the last
// wait: dQ of tile kt runs on into step kt + 1, whose first wait covers it;
// three key / value buffers (the copy after the barrier of step kt + 1 goes
// to the buffer of tile kt - 1); the last dQ is waited for before the
// barriers of the tiles after this warpgroup's diagonal.
template <typename scalar_t, typename Tiles>
__global__ void __launch_bounds__(Tiles::kThreads, Tiles::kMinBlocks)
    wgmma_grad_q_kernel(const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ grad_out,
                        const float* __restrict__ lse, const float* __restrict__ row_dot,
                        scalar_t* __restrict__ grad_qkv, int T, int n_head, int64_t C,
                        float scale_log2, float scale) {
#if NANOBLOCK_WGMMA_DEVICE
  constexpr int HD = Tiles::kHeadDim, BK = Tiles::kKeys, BQ = Tiles::kQueries;
  constexpr int kThreads = Tiles::kThreads, kBuffers = Tiles::kBuffers;
  constexpr int kKvBytes = Tiles::kKvBytes;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t q_s = (shared_address(smem_raw) + kAtomBytes - 1) & ~uint32_t(kAtomBytes - 1);
  const uint32_t do_s = q_s + Tiles::kQBytes;
  const uint32_t k_s = do_s + Tiles::kQBytes;      // [kBuffers] key tiles
  const uint32_t v_s = k_s + kBuffers * kKvBytes;  // [kBuffers] value tiles

  const auto place = block_head<HD>(qkv, grad_out, grad_qkv, T, n_head, C, (T + BQ - 1) / BQ,
                                    false);
  const int qt = place.tile, bh = place.bh;
  const scalar_t* head = place.qkv;
  const scalar_t* grad_head = place.grad_out;
  const int64_t row_stride = 3 * C;
  const int wg = warpgroup_index();
  const int warp = threadIdx.x % kWarpgroupThreads / 32, lane = threadIdx.x % 32, t = lane % 4;

  const int q0 = qt * BQ;
  const int wg_q0 = q0 + kWarpgroupRows * wg;    // this warpgroup's first query
  const int row = wg_q0 + 16 * warp + lane / 4;  // this thread's rows: row, row + 8
  const int key_tiles = (min(q0 + BQ, T) - 1) / BK + 1;
  const int my_tiles = wg_q0 >= T ? 0 : min(key_tiles, (wg_q0 + kWarpgroupRows - 1) / BK + 1);

  const auto key_buffer = [&](int kt) { return k_s + (kt % kBuffers) * kKvBytes; };
  const auto value_buffer = [&](int kt) { return v_s + (kt % kBuffers) * kKvBytes; };
  // Key and value tiles 0, 1, 2, ... in that order.
  TileCopyWalk<BK, HD, kThreads, scalar_t> kv_walk(head + C, row_stride, 0);
  const auto copy_key_tile = [&](int kt) {
    kv_walk.copy_next(key_buffer(kt), value_buffer(kt), C, T);
    copy_async_commit();
  };
  copy_tile_async<BQ, HD, kThreads>(q_s, head, row_stride, q0, T);
  copy_tile_async<BQ, HD, kThreads>(do_s, grad_head, C, q0, T);
  copy_key_tile(0);  // one commit group with the query and dO tiles

  // lse (log2 units) and D of the thread's rows.
  float lse_row[2], dot_row[2];
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int r = row + 8 * i;
    lse_row[i] = r < T ? lse[static_cast<int64_t>(bh) * T + r] * kLog2e : 0.f;
    dot_row[i] = r < T ? row_dot[static_cast<int64_t>(bh) * T + r] : 0.f;
  }

  const uint32_t q_wg = q_s + wg * kWarpgroupRows * kRowBytes;
  const uint32_t do_wg = do_s + wg * kWarpgroupRows * kRowBytes;
  float s[BK / 2] = {}, dp[BK / 2] = {};
  float dq[HD / 2] = {};
  uint32_t ds_a[BK / 16][4] = {};

  // Whether key tile kt had non-finite values zeroed (layout (d), wgmma.cuh):
  // block-wide, on the tiles with a key after the block's first query.
  bool zeroed = false;
  const auto next_tile = [&](int kt) {
    copy_async_wait_all_for_tensor_cores();
    __syncthreads();  // tile kt is in; every warpgroup is done with tile kt - 1
    if (kt + 1 < key_tiles) copy_key_tile(kt + 1);
    const uint32_t tiles[1] = {key_buffer(kt)};
    zeroed = kt * BK + BK - 1 > q0 && zero_nonfinite_tiles<scalar_t, kKvBytes, kThreads>(tiles);
  };
  const auto step = [&](int kt, auto mask) {
    const int k0 = kt * BK;
    // S = Q K^T is in; dP = dO V^T may still run.
    issue_score_pair<scalar_t, HD, BQ, BK>(s, q_wg, key_buffer(kt), dp, do_wg, value_buffer(kt));
#pragma unroll
    for (int j = 0; j < BK / 8; j++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float p = exp2_approx(fmaf(s[4 * j + e], scale_log2, -lse_row[e >> 1]));
        if constexpr (decltype(mask)::value) {
          const int k = k0 + 8 * j + 2 * t + (e & 1), r = row + 8 * (e >> 1);
          if (k > r || r >= T) p = 0.f;
        }
        s[4 * j + e] = p;
      }
    }
    wgmma_wait<0>();  // dP is in
    keep_in_order(dp);
#pragma unroll
    for (int j = 0; j < BK / 8; j++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float ds = s[4 * j + e] * (dp[4 * j + e] - dot_row[e >> 1]);
        if constexpr (decltype(mask)::value) {  // by select: dP may be NaN there
          const int k = k0 + 8 * j + 2 * t + (e & 1), r = row + 8 * (e >> 1);
          if (k > r || r >= T) ds = 0.f;
        }
        s[4 * j + e] = ds;
      }
    }
    scores_to_a<scalar_t, BK>(ds_a, s);
    keep_in_order(dq);
    keep_in_order(ds_a);
    wgmma_fence();
    issue_values<scalar_t, HD, BK>(dq, ds_a, key_buffer(kt));  // dQ += dS K
    wgmma_commit();
    if (Tiles::kSchedule != kPipelined || zeroed) {
      wgmma_wait<0>();
      keep_in_order(dq);
    }
    if (zeroed) {
      add_nonfinite_products<BK, HD, false>(dq, ds_a, head + C + k0 * row_stride, row_stride, row,
                                            k0, T);
    }
  };

  // Tiles before first_masked lie wholly at or before this warpgroup's first
  // query (and so before T).
  const int first_masked = min(my_tiles, (wg_q0 + 1) / BK);
  int kt = for_each_key_tile(0, first_masked, my_tiles, [&](int key_tile, auto masked) {
    next_tile(key_tile);
    step(key_tile, masked);
  });
  wgmma_wait<0>();  // the last dQ (pipelined), before its key tile's buffer is reused
  keep_in_order(dq);
  for (; kt < key_tiles; kt++) next_tile(kt);  // every thread: key_tiles barriers

  store_accumulator_rows<scalar_t, HD>(place.grad_qkv, row_stride, row, T, dq, scale);
#endif  // NANOBLOCK_WGMMA_DEVICE
}

// ---------------------------------------------------------------------------
// Launchers.

struct BackwardArgs {
  const Tensor& grad_out;
  const Tensor& qkv;
  const Tensor& lse;
  const Tensor& row_dot;
  int64_t n_head;
  const Tensor& grad_qkv;
  float scale_log2, scale;
};

template <typename scalar_t, typename Tiles, typename Kernel>
void launch(Kernel kernel, const BackwardArgs& a, int64_t rows_per_block) {
  const int64_t B = a.qkv.size(0), T = a.qkv.size(1), C = a.qkv.size(2) / 3;
  if (B * T == 0) return;
  allow_shared_memory(kernel, Tiles::kSharedBytes);
  kernel<<<B * a.n_head * ceil_div(T, rows_per_block), Tiles::kThreads, Tiles::kSharedBytes,
           current_stream()>>>(
      a.qkv.const_data_ptr<scalar_t>(), a.grad_out.const_data_ptr<scalar_t>(),
      a.lse.const_data_ptr<float>(), a.row_dot.const_data_ptr<float>(),
      a.grad_qkv.mutable_data_ptr<scalar_t>(), static_cast<int>(T), static_cast<int>(a.n_head),
      C, a.scale_log2, a.scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the first of Tiles... whose (tile, warpgroups, schedule) is the
// one asked for; false when none is. tile: BQ for grad_kv, BK for grad_q.
template <typename scalar_t, bool GRAD_KV, typename... Tiles>
bool launch_matching(int64_t tile, int64_t warpgroups, int64_t schedule, const BackwardArgs& a) {
  const auto matches = [&](auto tiles) {
    using Shape = decltype(tiles);
    return warpgroups == Shape::kWarpgroups && schedule == Shape::kSchedule &&
           tile == (GRAD_KV ? Shape::kQueries : Shape::kKeys);
  };
  const auto run = [&](auto tiles) {
    using Shape = decltype(tiles);
    if constexpr (GRAD_KV) {
      launch<scalar_t, Shape>(wgmma_grad_kv_kernel<scalar_t, Shape>, a, Shape::kKeys);
    } else {
      launch<scalar_t, Shape>(wgmma_grad_q_kernel<scalar_t, Shape>, a, Shape::kQueries);
    }
    return true;
  };
  return ((matches(Tiles{}) && run(Tiles{})) || ...);
}

// The tile shapes built, per head dim; the first of each list is the
// default. scripts/try_wgmma_backward.py times them; its first H200 run
// (benchmarks/results/nvidia-h200/try_wgmma_backward.txt) picked the hd 64
// defaults: grad_kv query tile 128, 2 warpgroups (189.6 us at gpt2-small,
// 494.8 at T = 4096; query tile 64: 197-204 and 543-612), grad_q key tile 64,
// 1 warpgroup (129.1 us; key tile 128, 2 warpgroups: 143.7 but 384.0 at
// T = 4096 against 430.4). The rest are candidates not yet timed.
template <typename scalar_t>
bool launch_built_grad_kv(int64_t hd, int64_t tile, int64_t wg, int64_t schedule,
                          const BackwardArgs& a) {
  if (hd == 64) {
    // (not built, ptxas 13.0: query tile 128 pipelined serializes its wgmmas
    // for want of registers (C7512); query tile 128 with 1 warpgroup spills)
    return launch_matching<
        scalar_t, true, GradKvTiles<64, 128, 2, 1, kSerial>, GradKvTiles<64, 128, 2, 1, kOverlap>,
        GradKvTiles<64, 64, 2, 1, kSerial>, GradKvTiles<64, 64, 2, 1, kPipelined>,
        GradKvTiles<64, 64, 1, 2, kSerial>>(tile, wg, schedule, a);
  }
  // (pipelined at hd 128: 636 bytes of spills with ptxas 13.0; not built)
  return launch_matching<scalar_t, true, GradKvTiles<128, 64, 2, 1, kOverlap>,
                         GradKvTiles<128, 64, 2, 1, kSerial>,
                         GradKvTiles<128, 64, 1, 2, kSerial>>(tile, wg, schedule, a);
}
template <typename scalar_t>
bool launch_built_grad_q(int64_t hd, int64_t tile, int64_t wg, int64_t schedule,
                         const BackwardArgs& a) {
  if (hd == 64) {
    return launch_matching<
        scalar_t, false, GradQTiles<64, 64, 1, 2, kSerial>, GradQTiles<64, 64, 1, 2, kPipelined>,
        GradQTiles<64, 128, 2, 1, kSerial>, GradQTiles<64, 128, 2, 1, kPipelined>,
        GradQTiles<64, 128, 1, 2, kSerial>, GradQTiles<64, 64, 2, 1, kSerial>>(tile, wg,
                                                                              schedule, a);
  }
  return launch_matching<scalar_t, false, GradQTiles<128, 64, 2, 1, kSerial>,
                         GradQTiles<128, 64, 2, 1, kPipelined>,
                         GradQTiles<128, 64, 1, 2, kSerial>>(tile, wg, schedule, a);
}

// Checks the arguments of both entry points; returns the head dim.
int64_t check_backward_args(const char* name, const Tensor& grad_out, const Tensor& qkv,
                            const Tensor& lse, const Tensor& row_dot, int64_t n_head,
                            const Tensor& grad_qkv) {
  NANOBLOCK_CHECK(qkv.is_cuda() && qkv.dim() == 3, name,
                  ": qkv must be a 3-d CUDA tensor [B, T, 3C]");
  const auto dtype = qkv.scalar_type();
  NANOBLOCK_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, name,
                  ": qkv must be float16 or bfloat16");
  NANOBLOCK_CHECK(n_head > 0 && qkv.size(2) % (3 * n_head) == 0, name, ": last dim ",
                  qkv.size(2), " is not 3 * n_head * head_dim for n_head ", n_head);
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  const int64_t hd = C / n_head;
  NANOBLOCK_CHECK(hd == 64 || hd == 128, name, ": head dim ", hd, " (only 64 and 128 are built)");
  NANOBLOCK_CHECK(T < (int64_t{1} << 31), name, ": T too large");
  NANOBLOCK_CHECK(grad_out.sizes() == at::IntArrayRef({B, T, C}) && grad_out.scalar_type() == dtype,
                  name, ": grad_out must be [B, T, C] of qkv's dtype");
  NANOBLOCK_CHECK(grad_qkv.sizes() == qkv.sizes() && grad_qkv.scalar_type() == dtype, name,
                  ": grad_qkv must be [B, T, 3C] of qkv's dtype");
  for (const Tensor* x : {&lse, &row_dot}) {
    NANOBLOCK_CHECK(x->sizes() == at::IntArrayRef({B, n_head, T}) &&
                        x->scalar_type() == at::kFloat,
                    name, ": lse and row_dot must be [B, n_head, T] float32");
  }
  for (const Tensor* x : {&grad_out, &qkv, &lse, &row_dot, &grad_qkv}) {
    NANOBLOCK_CHECK(x->is_cuda() && x->device() == qkv.device() && x->is_contiguous() &&
                        reinterpret_cast<uintptr_t>(x->const_data_ptr()) % 16 == 0,
                    name, ": every tensor contiguous, 16-byte aligned, on qkv's device");
  }
  NANOBLOCK_CHECK(wgmma_attention_available(), name,
                  ": needs a compute capability 9.0 GPU and a build for sm_90a");
  return hd;
}

template <bool GRAD_KV>
void wgmma_backward_kernel(const char* name, const Tensor& grad_out, const Tensor& qkv,
                           const Tensor& lse, const Tensor& row_dot, int64_t n_head,
                           const Tensor& grad_qkv, int64_t tile, int64_t warpgroups,
                           int64_t schedule) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  const int64_t hd = check_backward_args(name, grad_out, qkv, lse, row_dot, n_head, grad_qkv);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const BackwardArgs args{grad_out, qkv, lse, row_dot, n_head, grad_qkv, scale * kLog2e, scale};
  const auto launch_built = [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    return GRAD_KV ? launch_built_grad_kv<scalar_t>(hd, tile, warpgroups, schedule, args)
                   : launch_built_grad_q<scalar_t>(hd, tile, warpgroups, schedule, args);
  };
  const bool launched = qkv.scalar_type() == at::kBFloat16 ? launch_built(at::BFloat16{})
                                                           : launch_built(at::Half{});
  NANOBLOCK_CHECK(launched, name, ": no kernel built for head dim ", hd, " with ",
                  GRAD_KV ? "query" : "key", " tile ", tile, ", ", warpgroups,
                  " warpgroups and schedule ", schedule);
}

// The shapes the op dispatch takes (wgmma_attention_backward_into), unless
// NANOBLOCK_WGMMA_GRAD_KV / NANOBLOCK_WGMMA_GRAD_Q name others (read once;
// wgmma_shape_from_env): the first H200 run's fastest at hd 64 among those
// with the causal NaN / Inf handling (serial grad_kv query tile 128, 2
// warpgroups; serial grad_q key tile 64, 1 warpgroup); hd 128, not yet
// timed: grad_kv overlap, query tile 64, 2 warpgroups; grad_q serial key
// tile 64, 2 warpgroups.
void launch_default_backward(const BackwardArgs& a, int64_t hd) {
  static const std::optional<WgmmaShape> kv_env = wgmma_shape_from_env("NANOBLOCK_WGMMA_GRAD_KV");
  static const std::optional<WgmmaShape> q_env = wgmma_shape_from_env("NANOBLOCK_WGMMA_GRAD_Q");
  const WgmmaShape kv =
      kv_env.value_or(hd == 64 ? WgmmaShape{128, 2, kSerial} : WgmmaShape{64, 2, kOverlap});
  const WgmmaShape q = q_env.value_or(WgmmaShape{64, hd == 64 ? 1 : 2, kSerial});
  const auto launch_both = [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    NANOBLOCK_CHECK(launch_built_grad_kv<scalar_t>(hd, kv.tile, kv.warpgroups, kv.schedule, a),
                    "wgmma attention backward: no grad_kv kernel built for head dim ", hd,
                    " with query tile ", kv.tile, ", ", kv.warpgroups, " warpgroups, schedule ",
                    kv.schedule, " (NANOBLOCK_WGMMA_GRAD_KV)");
    NANOBLOCK_CHECK(launch_built_grad_q<scalar_t>(hd, q.tile, q.warpgroups, q.schedule, a),
                    "wgmma attention backward: no grad_q kernel built for head dim ", hd,
                    " with key tile ", q.tile, ", ", q.warpgroups, " warpgroups, schedule ",
                    q.schedule, " (NANOBLOCK_WGMMA_GRAD_Q)");
  };
  if (a.qkv.scalar_type() == at::kBFloat16) {
    launch_both(at::BFloat16{});
  } else {
    launch_both(at::Half{});
  }
}

}  // namespace

void wgmma_attention_backward_into(const Tensor& grad_out, const Tensor& qkv, const Tensor& lse,
                                   const Tensor& row_dot, int64_t n_head,
                                   const Tensor& grad_qkv) {
  const int64_t hd = qkv.size(2) / 3 / n_head;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  launch_default_backward({grad_out, qkv, lse, row_dot, n_head, grad_qkv, scale * kLog2e, scale},
                          hd);
}

void wgmma_attention_grad_kv(const Tensor& grad_out, const Tensor& qkv, const Tensor& lse,
                             const Tensor& row_dot, int64_t n_head, const Tensor& grad_qkv,
                             int64_t query_tile, int64_t warpgroups, int64_t schedule) {
  wgmma_backward_kernel<true>("wgmma_attention_grad_kv", grad_out, qkv, lse, row_dot, n_head,
                              grad_qkv, query_tile, warpgroups, schedule);
}

void wgmma_attention_grad_q(const Tensor& grad_out, const Tensor& qkv, const Tensor& lse,
                            const Tensor& row_dot, int64_t n_head, const Tensor& grad_qkv,
                            int64_t key_tile, int64_t warpgroups, int64_t schedule) {
  wgmma_backward_kernel<false>("wgmma_attention_grad_q", grad_out, qkv, lse, row_dot, n_head,
                               grad_qkv, key_tile, warpgroups, schedule);
}

}  // namespace nanoblock::cuda
