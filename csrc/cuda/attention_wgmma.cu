// Causal attention forward on Hopper's warpgroup MMA (wgmma.mma_async,
// sm_90a), for float16 / bfloat16 and head dims 64 and 128: the forward of
// attention_mma.cu (read that file's header first) with the two matrix
// products issued a warpgroup (4 warps, 128 threads) at a time.
// attention.cu's dispatch takes it on Hopper (attention_wgmma.cuh says
// when); scripts/try_wgmma.py times its tile shapes.
//
//   in   qkv [B, T, 3C] (q, k, v of head h at columns h*hd, C + h*hd,
//        2C + h*hd of each row), any T >= 1
//   out  out [B, T, C], lse [B, n_head, T] float32 (natural log of the row
//        sums of exp(scale * q k^T) over keys 0..row), scale = 1/sqrt(hd)
//
// Block: WG warpgroups ("consumers"), each owning 64 consecutive queries of
// the block's query tile (64 * WG queries). In the serial and pipelined
// schedules every thread also copies tiles in (cp.async); in the producer
// schedule one more warpgroup does the copies alone (see the producer
// kernel). Shared memory holds the query tile and two (three when pipelined
// or with a producer) buffers each of a key tile and a value tile (BK keys):
// the next tiles are copied while tile kt is used. Per key tile and
// warpgroup:
//   S = Q K^T     wgmma m64n{BK}k16, A (Q) and B (K) from shared memory,
//                 HD / 16 instructions, float32 accumulators in registers
//   online softmax on those registers (mask, row max, exp2, row sum)
//   O += P V      wgmma m64n{HD}k16, A (P, rounded to 16 bits) from
//                 registers, B (V) from shared memory, BK / 16 instructions
// in that order ("serial"), or with S of tile kt issued before P V of tile
// kt - 1 so that the softmax overlaps a product ("pipelined"; the kernel's
// comment has the schedules), the latter also with a producer warpgroup
// ("producer": no block barrier per key tile, copies several tiles ahead,
// more registers for the consumers). The dispatch runs the pipelined one at
// head dim 64, the serial one at 128 (default_forward_tiles says why).
// Blocks are ordered longest query tiles first (as in attention_mma.cu), in
// groups of heads whose keys and values L2 holds (tensor_core.cuh, block_tile).
// Scores are kept in the log2 domain (scaled by scale * log2 e) and
// exponentiated with exp2_approx (common.cuh); lse is written in
// natural log units. Masked scores are set to -inf by select. A NaN or Inf
// in v stays causal: on the diagonal key tiles the block zeroes non-finite
// values and adds their exact kind to the rows that see them (wgmma.cuh,
// (d)).
//
// The shared-memory layout, descriptors, register layouts and ordering
// rules (layouts (a), (b), (c) cited below) are in wgmma.cuh's header.
#include "../check.h"
#include "attention_wgmma.cuh"
#include "common.cuh"
#include "wgmma.cuh"

#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

namespace nanoblock::cuda {

namespace {

// The schedules (the kernels' comments say what each does): every warpgroup
// copies and multiplies, S, softmax and P V one after the other (serial) or
// the softmax of one tile overlapping P V of the one before (pipelined); or
// the latter with a producer warpgroup that does all the copies (producer).
enum Schedule : int { kSerial = 0, kPipelined = 1, kProducer = 2 };

// Tile shape and schedule of one kernel: HD head dim, BK keys per key tile,
// WG consumer warpgroups (64 queries each), MIN_BLOCKS blocks per
// multiprocessor asked of the compiler (a register cap of 64K / (threads *
// MIN_BLOCKS)), SCHEDULE one of Schedule. Buffers of key / value tiles:
// serial 2 (tile kt + 1 copied while tile kt is used), pipelined 3 (tile kt
// - 1's values are still read while tile kt + 1 is copied), producer 3 (see
// the producer kernel).
template <int HD, int BK, int WG, int MIN_BLOCKS, int SCHEDULE>
struct WgmmaTiles {
  static_assert(HD % kPanelCols == 0, "head dim: whole 64-column panels");
  static_assert(BK == 64 || BK == 128, "wgmma N for S: 64 or 128 keys");
  static_assert(HD == 64 || HD == 128, "wgmma N for O: 64 or 128");
  static_assert(SCHEDULE != Schedule::kProducer || MIN_BLOCKS == 1,
                "setmaxnreg counts one block an SM");
  static constexpr int kHeadDim = HD;
  static constexpr int kKeys = BK;
  static constexpr int kMinBlocks = MIN_BLOCKS;
  static constexpr int kSchedule = SCHEDULE;
  static constexpr bool kPipelined = SCHEDULE == Schedule::kPipelined;
  static constexpr bool kHasProducer = SCHEDULE == Schedule::kProducer;
  // Key / value tiles in flight.
  static constexpr int kBuffers = SCHEDULE == Schedule::kSerial ? 2 : 3;
  static constexpr int kQueries = kWarpgroupRows * WG;
  static constexpr int kConsumers = WG;
  static constexpr int kThreads = kWarpgroupThreads * (WG + (kHasProducer ? 1 : 0));
  static constexpr int kQBytes = kQueries * HD * 2;  // 16-bit elements
  static constexpr int kKvBytes = BK * HD * 2;       // one K (or V) tile
  // Producer schedule: per buffer a "full" and an "empty" mbarrier (8 bytes
  // each) and the non-finite vote of the tile in it (4 bytes).
  static constexpr int kHandshakeBytes = kHasProducer ? kBuffers * (8 + 8 + 4) : 0;
  // q, then k [kBuffers], then v [kBuffers], then the handshake; plus the
  // slack to align the start to 1024.
  static constexpr int kSharedBytes =
      kQBytes + 2 * kBuffers * kKvBytes + kHandshakeBytes + kAtomBytes;
  static_assert(kQBytes % kAtomBytes == 0 && kKvBytes % kAtomBytes == 0, "1024-aligned tiles");
  static_assert(kSharedBytes <= 227 * 1024, "shared memory of one block");
  // Registers a thread under the producer schedule (setmaxnreg, multiples of
  // 8): the block is launched with kLaunchRegisters (the most that lets
  // kThreads threads fit in the 64K registers of an SM); the producer,
  // which only computes addresses, drops to kProducerRegisters and the
  // consumers take what it gave back (the pipelined step keeps S, O and P
  // live at once: 212 registers at hd 64, BK 128 in the 2-warpgroup
  // pipelined kernel). With its copy rounds unrolled the producer spilled
  // at 40 and at 56 (ptxas kept every round's addresses live across the
  // tile loop; all spill stores of the SASS lay after setmaxnreg.dec), so
  // it copies with the rounds rolled (nothing spills then; 40 not tried
  // since). At 56 the consumers get 224 (2 of them) or 152 (3).
  static constexpr int kLaunchRegisters = 65536 / kThreads / 8 * 8;
  static constexpr int kProducerRegisters = 56;
  static constexpr int kConsumerRegisters =
      (kLaunchRegisters + (kLaunchRegisters - kProducerRegisters) / WG) / 8 * 8;
  static_assert(!kHasProducer || kConsumerRegisters <= 256, "setmaxnreg: at most 256");
};

// ---------------------------------------------------------------------------
// Kernels. Everything below that the device compiles exists only in the
// sm_90a pass; the host pass and other targets see empty kernel bodies.

#if NANOBLOCK_WGMMA_DEVICE


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
      s[4 * j + e] = exp2_approx(fmaf(s[4 * j + e], scale_log2, -m_scaled[e >> 1]));
      l[e >> 1] += s[4 * j + e];
    }
  }
}

// The products of the pipelined step (pipelined and producer schedules), per
// warpgroup: issues S_kt = Q K_kt^T and O += P_{kt-1} V_{kt-1}, runs the
// online softmax of S_kt while the tensor cores still do P V, and waits for
// both; then o holds P_{kt-1} V_{kt-1} added (not yet rescaled: correction
// says by what), s the exponentiated scores, and p and the buffers of tile
// kt - 1 are free. Straight line between the issues and the waits (a branch
// there that ptxas could take for divergent makes it serialize the wgmmas).
// key0 = kt * BK; MASK: the tile holds keys past some of these rows' queries.
template <typename scalar_t, int HD, int BQ, int BK, bool MASK>
__device__ __forceinline__ void pipelined_products(float (&s)[BK / 2], float (&o)[HD / 2],
                                                   uint32_t (&p)[BK / 16][4], float (&m)[2],
                                                   float (&l)[2], uint32_t q_wg, uint32_t keys,
                                                   uint32_t values, int row, int key0, int T,
                                                   float scale_log2, float (&correction)[2]) {
  keep_in_order(s);
  keep_in_order(o);
  keep_in_order(p);
  wgmma_fence();
  issue_scores<scalar_t, HD, BQ, BK>(s, q_wg, keys);
  wgmma_commit();
  issue_values<scalar_t, HD, BK>(o, p, values);
  wgmma_commit();
  wgmma_wait<1>();  // S_kt is done; P V may still run
  keep_in_order(s);
  online_softmax<BK>(s, m, l, row, key0, T, MASK, scale_log2, correction);
  wgmma_wait<0>();  // P_{kt-1} V_{kt-1} is in o
  keep_in_order(o);
}

// o (layout (b), N = HD) times each row's correction. Skipped when no row
// of the warp found a new maximum in the tile: every correction is then
// exp2(0) = 1 exactly and the multiplies change nothing. After the first few
// key tiles that is most tiles (a row's maximum rarely moves), and the
// multiplies are HD / 2 of the per-tile instructions of a thread.
template <int HD>
__device__ __forceinline__ void rescale(float (&o)[HD / 2], const float (&correction)[2]) {
  if (__all_sync(0xffffffffu, correction[0] == 1.f && correction[1] == 1.f)) return;
#pragma unroll
  for (int j = 0; j < HD / 8; j++) {
#pragma unroll
    for (int e = 0; e < 4; e++) o[4 * j + e] *= correction[e >> 1];
  }
}

// Normalizes this thread's rows (row, row + 8) of o and writes them (layout
// (b): columns 8j + 2t, 8j + 2t + 1) to out_head [T][C] (the head's first
// column), and their lse (natural log) to lse_head [T]. Every lane of the
// warp calls it (the row sums are summed over the quad here).
template <int HD, typename scalar_t>
__device__ __forceinline__ void store_rows(const float (&o)[HD / 2], const float (&m)[2],
                                           float (&l)[2], scalar_t* out_head, float* lse_head,
                                           int row, int T, int64_t C, float scale_log2) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    l[i] = quad_sum(l[i]);  // before the branch: all 32 lanes take part
    const int r = row + 8 * i;
    if (r >= T) continue;
    const float inv = 1.f / l[i];
    if (t == 0) lse_head[r] = row_lse(m[i], l[i], scale_log2);
    scalar_t* dst = out_head + static_cast<int64_t>(r) * C + 2 * t;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
      *reinterpret_cast<uint32_t*>(dst + 8 * j) =
          pack2<scalar_t>(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
    }
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
  const BlockTile place = block_tile(tiles, T, HD);
  const int qt = tiles - 1 - place.rank;  // longest rows first
  const int bh = place.bh;
  const int b = bh / n_head, h = bh % n_head;
  const int wg = warpgroup_index();
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
  // Key and value tiles 0, 1, 2, ... in that order (copy_key_tile(kt) comes
  // right after copy_key_tile(kt - 1)).
  TileCopyWalk<BK, HD, kThreads, scalar_t> kv_walk(head + C, row_stride, 0);
  const auto copy_key_tile = [&](int kt) {
    kv_walk.copy_next(key_buffer(kt), value_buffer(kt), C, T);
    copy_async_commit();
  };
  // Block-wide, on the tiles with a key after the block's first query:
  // non-finite values of tile kt zeroed (layout (d), wgmma.cuh); true if any.
  const auto zero_nonfinite_values = [&](int kt) {
    const uint32_t tiles[1] = {value_buffer(kt)};
    return kt * BK + BK - 1 > q0 &&
           zero_nonfinite_tiles<scalar_t, Tiles::kKvBytes, kThreads>(tiles);
  };
  copy_tile_async<BQ, HD, kThreads>(q_s, head, row_stride, q0, T);
  copy_key_tile(0);  // one commit group with the query tile

  float s[BK / 2] = {};
  float o[HD / 2] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t p[BK / 16][4] = {};
  // o plus the kinds of P_kt times tile kt's non-finite values.
  const auto add_nonfinite = [&](int kt) {
    add_nonfinite_products<BK, HD, false>(o, p, head + 2 * C + kt * BK * row_stride, row_stride,
                                          row, kt * BK, T);
  };
  // This warpgroup's 64 rows of Q: panel p at q_s + p * BQ * 128 + wg * 64 * 128.
  const uint32_t q_wg = q_s + wg * kWarpgroupRows * kRowBytes;
  // Softmax of the scores now in s (tile kt): P in s, correction of the rows.
  const auto softmax = [&](int kt, float (&correction)[2]) {
    const int k0 = kt * BK;
    // The causal mask is needed where some key of the tile follows some
    // query of the warpgroup, or lies past T.
    // Two calls, each with its mask setting fixed: with one call on the
    // runtime flag, ptxas computed the mask's comparisons for every tile
    // (sm_90a, head dim 128: about 300 instructions before the first wgmma
    // of each tile) and only selected by the flag afterwards.
    if (k0 + BK - 1 > wg_q0 || k0 + BK > T) {
      online_softmax<BK>(s, m, l, row, k0, T, true, scale_log2, correction);
    } else {
      online_softmax<BK>(s, m, l, row, k0, T, false, scale_log2, correction);
    }
  };

  if constexpr (!Tiles::kPipelined) {
    for (int kt = 0; kt < key_tiles; kt++) {
      copy_async_wait_all_for_tensor_cores();
      __syncthreads();  // tile kt is in; both warpgroups are done with tile kt - 1
      if (kt + 1 < key_tiles) copy_key_tile(kt + 1);
      const bool zeroed = zero_nonfinite_values(kt);
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
      if (zeroed) add_nonfinite(kt);
    }
  } else {
    // Iteration kt: its barrier and copy (next_tile), then for this
    // warpgroup: kt = 0 S only; 0 < kt < my_tiles both products (step); kt =
    // my_tiles P V only (the drain); later ones nothing. Between the issue of
    // a product and the wait for it the code is straight-line (no branch that
    // ptxas could take for divergent, which makes it serialize the wgmmas):
    // the steps that need the causal mask run in a loop of their own.
    // zeroed: whether tile kt - 1 (whose P V the next step issues) and tile
    // kt had non-finite values zeroed.
    bool zeroed_before = false, zeroed = false;
    const auto next_tile = [&](int kt) {
      copy_async_wait_all_for_tensor_cores();
      __syncthreads();  // tile kt is in; buffer (kt + 1) % 3 is free (see above)
      if (kt + 1 < key_tiles) copy_key_tile(kt + 1);
      zeroed_before = zeroed;
      zeroed = zero_nonfinite_values(kt);
    };
    const auto step = [&](int kt, auto mask) {  // S_kt and O += P_{kt-1} V_{kt-1}
      float correction[2];
      pipelined_products<scalar_t, HD, BQ, BK, decltype(mask)::value>(
          s, o, p, m, l, q_wg, key_buffer(kt), value_buffer(kt - 1), row, kt * BK, T, scale_log2,
          correction);
      if (zeroed_before) add_nonfinite(kt - 1);
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
    int kt = for_each_key_tile(1, first_masked, my_tiles, [&](int key_tile, auto masked) {
      next_tile(key_tile);
      step(key_tile, masked);
    });
    if (my_tiles > 0) {  // the drain, in iteration kt = my_tiles
      // zeroed holds tile my_tiles - 1's flag until the next barrier.
      const bool zeroed_last = zeroed;
      if (kt < key_tiles) next_tile(kt);
      kt++;
      keep_in_order(o);
      keep_in_order(p);
      wgmma_fence();
      issue_values<scalar_t, HD, BK>(o, p, value_buffer(my_tiles - 1));
      wgmma_commit();
      wgmma_wait<0>();
      keep_in_order(o);
      if (zeroed_last) add_nonfinite(my_tiles - 1);
    }
    for (; kt < key_tiles; kt++) next_tile(kt);  // every thread: key_tiles barriers
  }

  store_rows<HD>(o, m, l, out + static_cast<int64_t>(b) * T * C + h * HD,
                 lse + static_cast<int64_t>(bh) * T, row, T, C, scale_log2);
#endif  // NANOBLOCK_WGMMA_DEVICE
}

// The producer schedule. One block: query tile qt (64 * WG queries) of one
// (batch, head), grid and order as above; WG + 1 warpgroups: warpgroup 0
// copies (the producer), warpgroups 1 .. WG multiply (consumers, consumer c
// owning queries 64c .. 64c + 63 of the tile).
//
// Why: the serial kernel runs S, softmax and P V of a warpgroup one after
// the other, and every key tile starts with a block barrier that holds each
// warpgroup to the slowest one, after copies whose address arithmetic the
// consumers do themselves. Here each consumer runs the pipelined step (S of
// tile kt issued before P V of tile kt - 1: its softmax of S_kt runs while
// the tensor cores do P V), meets the other consumers at no barrier (so one
// consumer's softmax also overlaps another's products), and finds its tiles
// already copied, up to kBuffers tiles ahead. The pipelined step keeps S, O
// and P live at once, more registers than a 256-thread block may have at 1
// block an SM when the same threads also copy; setmaxnreg moves the
// producer's registers to the consumers (WgmmaTiles::kConsumerRegisters).
//
// Handshake (wgmma.cuh (e)), for tile kt in buffer kt % kBuffers, phase
// parity (kt / kBuffers) % 2:
//   full:  128 arrivals: each producer thread, once its own copies of the
//          tile are in (cp.async.wait_group) and fenced for the tensor cores
//          (as the other schedules do before their barrier). On diagonal
//          tiles the producer first votes on the value tile (wgmma.cuh (d);
//          its own barrier, not the block's) and leaves the answer in the
//          buffer's vote word for the consumers.
//   empty: 4 WG arrivals: lane 0 of each consumer warp once its products
//          reading the buffer are done (the wgmma wait after P V).
// The producer copies tile kt (after the empty phase of tile kt - kBuffers),
// then publishes tile kt - 1 (cp.async.wait_group 1: all but the newest
// group are in), so two tiles are in flight while it waits; with 3 buffers
// tile kt - 1 is published while the consumers still work on kt - 2.
// A consumer that skips tile kt (wholly after its queries) still waits for
// its full phase and arrives on empty, in order: an arrival of tile kt
// must not count in the phase of tile kt - kBuffers.
template <typename scalar_t, typename Tiles>
__global__ void __launch_bounds__(Tiles::kThreads, 1)
    wgmma_forward_producer_kernel(const scalar_t* __restrict__ qkv, scalar_t* __restrict__ out,
                                  float* __restrict__ lse, int T, int n_head, int64_t C,
                                  float scale_log2) {
#if NANOBLOCK_WGMMA_DEVICE
  constexpr int HD = Tiles::kHeadDim, BK = Tiles::kKeys, BQ = Tiles::kQueries;
  constexpr int kBuffers = Tiles::kBuffers;
  extern __shared__ unsigned char smem_raw[];
  // Shared-space addresses; every tile 1024-byte aligned (layout (a)).
  const uint32_t q_s = (shared_address(smem_raw) + kAtomBytes - 1) & ~uint32_t(kAtomBytes - 1);
  const uint32_t k_s = q_s + Tiles::kQBytes;              // [kBuffers] key tiles
  const uint32_t v_s = k_s + kBuffers * Tiles::kKvBytes;  // [kBuffers] value tiles
  const uint32_t full_s = v_s + kBuffers * Tiles::kKvBytes;  // [kBuffers] mbarriers
  const uint32_t empty_s = full_s + 8 * kBuffers;            // [kBuffers] mbarriers
  const uint32_t vote_s = empty_s + 8 * kBuffers;            // [kBuffers] int
  int* vote = reinterpret_cast<int*>(smem_raw + (vote_s - shared_address(smem_raw)));

  const int tiles = (T + BQ - 1) / BQ;
  const BlockTile place = block_tile(tiles, T, HD);
  const int qt = tiles - 1 - place.rank;  // longest rows first
  const int bh = place.bh;
  const int b = bh / n_head, h = bh % n_head;
  const int wg = warpgroup_index();
  const int64_t row_stride = 3 * C;
  const scalar_t* head = qkv + static_cast<int64_t>(b) * T * row_stride + h * HD;
  const int q0 = qt * BQ;
  const int key_tiles = (min(q0 + BQ, T) - 1) / BK + 1;

  const auto buffer = [](int kt) { return static_cast<uint32_t>(kt % kBuffers); };
  const auto parity = [](int kt) { return static_cast<uint32_t>(kt / kBuffers % 2); };
  const auto key_buffer = [&](int kt) { return k_s + buffer(kt) * Tiles::kKvBytes; };
  const auto value_buffer = [&](int kt) { return v_s + buffer(kt) * Tiles::kKvBytes; };

  if (threadIdx.x == 0) {
    for (int i = 0; i < kBuffers; i++) {
      mbarrier_init(full_s + 8 * i, kWarpgroupThreads);
      mbarrier_init(empty_s + 8 * i, 4 * Tiles::kConsumers);
    }
  }
  __syncthreads();  // the last block-wide barrier: the warpgroups part here

  if (wg == 0) {  // the producer; threadIdx.x = 0 .. 127
    setmaxnreg_dec<Tiles::kProducerRegisters>();
    // Tile kt's copies are in (the caller waited): vote on the diagonal
    // tiles, then hand the tile over.
    const auto publish = [&](int kt) {
      bool zeroed = false;
      if (kt * BK + BK - 1 > q0) {  // some key after the block's first query
        barrier_sync<1, kWarpgroupThreads>();  // every producer thread's copies are in
        const uint32_t values[1] = {value_buffer(kt)};
        zeroed = zero_nonfinite_tiles<scalar_t, Tiles::kKvBytes, kWarpgroupThreads, 1, 1>(values);
      }
      if (threadIdx.x == 0) vote[buffer(kt)] = zeroed;
      mbarrier_arrive(full_s + 8 * buffer(kt));
    };
    for (int kt = 0; kt < key_tiles; kt++) {
      if (kt >= kBuffers) mbarrier_wait(empty_s + 8 * buffer(kt), parity(kt) ^ 1);
      // Rounds not unrolled (copy_tile_async says why).
      if (kt == 0) {
        copy_tile_async<BQ, HD, kWarpgroupThreads, scalar_t, 1>(q_s, head, row_stride, q0, T);
      }
      copy_tile_async<BK, HD, kWarpgroupThreads, scalar_t, 1>(key_buffer(kt), head + C, row_stride,
                                                              kt * BK, T);
      copy_tile_async<BK, HD, kWarpgroupThreads, scalar_t, 1>(value_buffer(kt), head + 2 * C,
                                                              row_stride, kt * BK, T);
      copy_async_commit();
      if (kt > 0) {
        copy_async_wait_for_tensor_cores<1>();
        publish(kt - 1);
      }
    }
    copy_async_wait_for_tensor_cores<0>();
    publish(key_tiles - 1);
    return;
  }

  // A consumer.
  setmaxnreg_inc<Tiles::kConsumerRegisters>();
  const int c = wg - 1;
  const int warp = threadIdx.x % kWarpgroupThreads / 32, lane = threadIdx.x % 32;
  const int wg_q0 = q0 + kWarpgroupRows * c;     // this warpgroup's first query
  const int row = wg_q0 + 16 * warp + lane / 4;  // this thread's rows: row, row + 8
  const int my_tiles = wg_q0 >= T ? 0 : min(key_tiles, (wg_q0 + kWarpgroupRows - 1) / BK + 1);
  const uint32_t q_wg = q_s + c * kWarpgroupRows * kRowBytes;  // panel stride BQ rows

  // Waits until tile kt is in; whether its non-finite values were zeroed.
  const auto acquire = [&](int kt) {
    mbarrier_wait(full_s + 8 * buffer(kt), parity(kt));
    return vote[buffer(kt)] != 0;
  };
  // This warp is done with tile kt's buffer (its products were waited for).
  const auto release = [&](int kt) {
    __syncwarp();
    if (lane == 0) mbarrier_arrive(empty_s + 8 * buffer(kt));
  };

  float s[BK / 2] = {};
  float o[HD / 2] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t p[BK / 16][4] = {};
  bool zeroed_before = false;  // tile kt - 1's vote, for the step of tile kt
  // o plus the kinds of P_kt times tile kt's non-finite values.
  const auto add_nonfinite = [&](int kt) {
    add_nonfinite_products<BK, HD, false>(o, p, head + 2 * C + kt * BK * row_stride, row_stride,
                                          row, kt * BK, T);
  };
  // S_kt and O += P_{kt-1} V_{kt-1}, as in the pipelined schedule; then
  // buffer kt - 1 goes back to the producer.
  const auto step = [&](int kt, auto mask) {
    const bool zeroed = acquire(kt);
    float correction[2];
    pipelined_products<scalar_t, HD, BQ, BK, decltype(mask)::value>(
        s, o, p, m, l, q_wg, key_buffer(kt), value_buffer(kt - 1), row, kt * BK, T, scale_log2,
        correction);
    release(kt - 1);
    if (zeroed_before) add_nonfinite(kt - 1);
    zeroed_before = zeroed;
    rescale<HD>(o, correction);
    scores_to_a<scalar_t, BK>(p, s);
  };

  if (my_tiles > 0) {  // S_0 and its softmax alone
    zeroed_before = acquire(0);
    keep_in_order(s);
    wgmma_fence();
    issue_scores<scalar_t, HD, BQ, BK>(s, q_wg, key_buffer(0));
    wgmma_commit();
    wgmma_wait<0>();
    keep_in_order(s);
    float correction[2];  // o is still 0: nothing to rescale
    const bool needs_mask = BK - 1 > wg_q0 || BK > T;
    online_softmax<BK>(s, m, l, row, 0, T, needs_mask, scale_log2, correction);
    scores_to_a<scalar_t, BK>(p, s);
  }
  // Tiles before first_masked lie wholly at or before this warpgroup's
  // first query (and so before T): (kt + 1) * BK <= wg_q0 + 1.
  const int first_masked = min(my_tiles, (wg_q0 + 1) / BK);
  for_each_key_tile(1, first_masked, my_tiles, step);
  if (my_tiles > 0) {  // the drain: P V of the last tile
    keep_in_order(o);
    keep_in_order(p);
    wgmma_fence();
    issue_values<scalar_t, HD, BK>(o, p, value_buffer(my_tiles - 1));
    wgmma_commit();
    wgmma_wait<0>();
    keep_in_order(o);
    release(my_tiles - 1);
    if (zeroed_before) add_nonfinite(my_tiles - 1);
  }
  for (int kt = my_tiles; kt < key_tiles; kt++) {  // skipped tiles, in order (see above)
    acquire(kt);
    release(kt);
  }

  store_rows<HD>(o, m, l, out + static_cast<int64_t>(b) * T * C + h * HD,
                 lse + static_cast<int64_t>(bh) * T, row, T, C, scale_log2);
#endif  // NANOBLOCK_WGMMA_DEVICE
}

// ---------------------------------------------------------------------------
// Launchers.

// The kernel of a tile shape's schedule.
template <typename scalar_t, typename Tiles>
constexpr auto forward_kernel() {
  if constexpr (Tiles::kHasProducer) {
    return wgmma_forward_producer_kernel<scalar_t, Tiles>;
  } else {
    return wgmma_forward_kernel<scalar_t, Tiles>;
  }
}

template <typename scalar_t, typename Tiles>
void launch_wgmma_forward(const Tensor& qkv, int64_t n_head, const Tensor& out, const Tensor& lse,
                          float scale_log2) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  if (B * T == 0) return;
  const size_t smem = Tiles::kSharedBytes;
  auto kernel = forward_kernel<scalar_t, Tiles>();
  allow_shared_memory(kernel, smem);
  kernel<<<B * n_head * ceil_div(T, Tiles::kQueries), Tiles::kThreads, smem, current_stream()>>>(
      qkv.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
      lse.mutable_data_ptr<float>(), static_cast<int>(T), static_cast<int>(n_head), C,
      scale_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A tile shape asked for by name (wgmma_attention_forward_tiles).
struct TileChoice {
  int64_t key_tile, warpgroups, schedule;  // warpgroups: consumers; schedule: Schedule
};

// Launches the first of Tiles... that `want` names; false when none does.
template <typename scalar_t, typename... Tiles>
bool launch_matching(const TileChoice& want, const Tensor& qkv, int64_t n_head, const Tensor& out,
                     const Tensor& lse, float scale_log2) {
  const auto matches = [&](auto tiles) {
    using Shape = decltype(tiles);
    return want.key_tile == Shape::kKeys && want.warpgroups * kWarpgroupRows == Shape::kQueries &&
           want.schedule == Shape::kSchedule;
  };
  return ((matches(Tiles{}) &&
           (launch_wgmma_forward<scalar_t, Tiles>(qkv, n_head, out, lse, scale_log2), true)) ||
          ...);
}

// The tile shapes built, per head dim (scripts/try_wgmma.py times them all;
// its TILES lists the same).
template <typename scalar_t>
bool launch_built(int64_t hd, const TileChoice& want, const Tensor& qkv, int64_t n_head,
                  const Tensor& out, const Tensor& lse, float scale_log2) {
  if (hd == 64) {
    return launch_matching<
        scalar_t, WgmmaTiles<64, 64, 2, 2, kSerial>, WgmmaTiles<64, 128, 2, 1, kProducer>,
        WgmmaTiles<64, 64, 2, 1, kProducer>, WgmmaTiles<64, 64, 3, 1, kProducer>,
        WgmmaTiles<64, 128, 2, 1, kSerial>, WgmmaTiles<64, 128, 2, 1, kPipelined>,
        WgmmaTiles<64, 128, 1, 2, kSerial>, WgmmaTiles<64, 64, 2, 2, kPipelined>>(
        want, qkv, n_head, out, lse, scale_log2);
  }
  return launch_matching<
      scalar_t, WgmmaTiles<128, 64, 2, 1, kSerial>, WgmmaTiles<128, 64, 2, 1, kProducer>,
      WgmmaTiles<128, 64, 2, 1, kPipelined>, WgmmaTiles<128, 128, 2, 1, kSerial>,
      WgmmaTiles<128, 128, 2, 1, kPipelined>>(want, qkv, n_head, out, lse, scale_log2);
}

// The op dispatch's forward shape, unless NANOBLOCK_WGMMA_FORWARD names
// another (read once; wgmma_shape_from_env): 64-key tiles and 2 warpgroups;
// at head dim 64 the pipelined schedule (2 blocks an SM at 126 registers),
// at 128 the serial one. Forward ms on the H200, same build, pipelined vs
// serial at head dim 64 (session 9, benchmarks/bench_attention.py): 0.109 vs
// 0.120 at gpt2-small, 0.328 vs 0.381 at T = 4096. 256-query tiles (4
// warpgroups, "64,4,0" and "64,4,1") were slower (0.144 and 0.126 at
// gpt2-small) and are not built. The producer schedule (one copying
// warpgroup) passed the tests but was slower too in session 6 (gpt2-small
// 0.129 vs 0.183 serial; benchmarks/results/nvidia-h200/
// attention_producer_vs_serial.txt).
TileChoice default_forward_tiles(int64_t hd) {
  static const std::optional<WgmmaShape> chosen = wgmma_shape_from_env("NANOBLOCK_WGMMA_FORWARD");
  if (chosen) return TileChoice{chosen->tile, chosen->warpgroups, chosen->schedule};
  return TileChoice{64, 2, hd == 64 ? kPipelined : kSerial};
}

// Launches the kernel of `choice` on the current stream; false when no such
// kernel is built. qkv contiguous, out and lse preallocated.
bool launch_forward(const Tensor& qkv, int64_t n_head, const Tensor& out, const Tensor& lse,
                    const TileChoice& choice) {
  const int64_t hd = qkv.size(2) / 3 / n_head;
  const float scale_log2 = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd))) * kLog2e;
  return qkv.scalar_type() == at::kBFloat16
             ? launch_built<at::BFloat16>(hd, choice, qkv, n_head, out, lse, scale_log2)
             : launch_built<at::Half>(hd, choice, qkv, n_head, out, lse, scale_log2);
}

}  // namespace

std::optional<WgmmaShape> wgmma_shape_from_env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return std::nullopt;
  WgmmaShape shape{};
  char end = 0;
  NANOBLOCK_CHECK(std::sscanf(v, "%" SCNd64 ",%" SCNd64 ",%" SCNd64 "%c", &shape.tile,
                              &shape.warpgroups, &shape.schedule, &end) == 3,
                  name, " must be TILE,WARPGROUPS,SCHEDULE (three integers, e.g. 128,2,2), got '",
                  v, "'");
  return shape;
}

bool wgmma_attention_available() {
#ifdef NANOBLOCK_SM90A
  // The build holds sm_90a code (setup.py defines NANOBLOCK_SM90A then), and
  // sm_90a code runs on compute capability 9.0 exactly. Asked of the driver
  // once per device: 0 unknown, 1 no, 2 yes.
  static std::atomic<int> known[C10_COMPILE_TIME_MAX_GPUS] = {};
  const c10::DeviceIndex device = c10::cuda::current_device();
  int answer = known[device].load(std::memory_order_relaxed);
  if (answer == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    answer = major == 9 && minor == 0 ? 2 : 1;
    known[device].store(answer, std::memory_order_relaxed);
  }
  return answer == 2;
#else
  return false;
#endif
}

std::tuple<Tensor, Tensor> wgmma_attention_forward_tiles(const Tensor& qkv_in, int64_t n_head,
                                                         int64_t key_tile, int64_t warpgroups,
                                                         int64_t schedule) {
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
  NANOBLOCK_CHECK(launch_forward(qkv, n_head, out, lse, {key_tile, warpgroups, schedule}),
                  "wgmma_attention_forward: no kernel built for head dim ", hd, " with key tile ",
                  key_tile, ", ", warpgroups, " warpgroups, schedule ", schedule,
                  " (0 serial, 1 pipelined, 2 producer)");
  return {out, lse};
}

std::tuple<Tensor, Tensor> wgmma_attention_forward(const Tensor& qkv, int64_t n_head) {
  const TileChoice choice = default_forward_tiles(qkv.size(2) / 3 / n_head);
  return wgmma_attention_forward_tiles(qkv, n_head, choice.key_tile, choice.warpgroups,
                                       choice.schedule);
}

void wgmma_attention_forward_into(const Tensor& qkv, int64_t n_head, const Tensor& out,
                                  const Tensor& lse) {
  const int64_t hd = qkv.size(2) / 3 / n_head;
  const TileChoice choice = default_forward_tiles(hd);
  NANOBLOCK_CHECK(launch_forward(qkv, n_head, out, lse, choice),
                  "wgmma attention forward: no kernel built for head dim ", hd,
                  " with key tile ", choice.key_tile, ", ",
                  choice.warpgroups, " warpgroups, schedule ", choice.schedule,
                  " (NANOBLOCK_WGMMA_FORWARD)");
}

}  // namespace nanoblock::cuda
