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
// exponentiated with exp2f; lse is written in natural log units. Masked
// scores are set to -inf by select. A NaN or Inf in v stays causal: on the
// diagonal key tiles the block zeroes non-finite values and adds their exact
// kind to the rows that see them (wgmma.cuh, (d)).
//
// The shared-memory layout, descriptors, register layouts and ordering
// rules (layouts (a), (b), (c) cited below) are in wgmma.cuh's header.
#include "../check.h"
#include "attention_wgmma.cuh"
#include "common.cuh"
#include "wgmma.cuh"

#include <atomic>
#include <type_traits>

namespace nanoblock::cuda {

namespace {

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
    const bool needs_mask = k0 + BK - 1 > wg_q0 || k0 + BK > T;
    online_softmax<BK>(s, m, l, row, k0, T, needs_mask, scale_log2, correction);
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

// The shape the op dispatch takes: the fastest serial one of the first H200
// run (benchmarks/results/nvidia-h200/try_wgmma.txt, gpt2-small: key tile
// 64, 2 warpgroups, 126.7 us; key tile 128: 159.0; pipelined key tile 128:
// 145.0 but 375.0 against 414.4 at T = 4096). hd 128: not yet timed.
TileChoice default_forward_tiles(int64_t /*hd*/) {
  return TileChoice{64, 2, false};
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
  NANOBLOCK_CHECK(launch_forward(qkv, n_head, out, lse, {key_tile, warpgroups, pipelined}),
                  "wgmma_attention_forward: no kernel built for head dim ", hd, " with key tile ",
                  key_tile, ", ", warpgroups, " warpgroups, ", pipelined ? "pipelined" : "serial");
  return {out, lse};
}

std::tuple<Tensor, Tensor> wgmma_attention_forward(const Tensor& qkv, int64_t n_head) {
  const int64_t hd = qkv.dim() == 3 && n_head > 0 ? qkv.size(2) / 3 / n_head : 0;
  const TileChoice choice = default_forward_tiles(hd);
  return wgmma_attention_forward_tiles(qkv, n_head, choice.key_tile, choice.warpgroups,
                                       choice.pipelined);
}

void wgmma_attention_forward_into(const Tensor& qkv, int64_t n_head, const Tensor& out,
                                  const Tensor& lse) {
  const int64_t hd = qkv.size(2) / 3 / n_head;
  launch_forward(qkv, n_head, out, lse, default_forward_tiles(hd));
}

}  // namespace nanoblock::cuda
