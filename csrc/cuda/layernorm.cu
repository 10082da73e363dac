// LayerNorm over the last dim on CUDA, forward and backward, with the
// residual add of the Block fused in front of it. Rows x [N, C] (N = all
// leading dims), weight [C], bias [C] or none.
//
//   forward:      out = (x - mean) * rstd * weight + bias         -> out [N, C]
//                 mean, rstd = mean and 1 / sqrt(var + eps) of each row
//                                                       -> mean, rstd [N] (acc_t)
//   add forward:  sum = x + dropout(residual) (rounded to the input dtype),
//                 then the forward above on sum                    -> sum [N, C]
//                 (dropout: residual element (row, c) has mask index row * C + c)
//   backward:     xhat = (x - mean) * rstd, g = grad_out * weight
//                 grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))
//                          (+ grad_residual)                       -> [N, C]
//                 grad_weight = sum over rows of grad_out * xhat    -> [C]
//                 grad_bias   = sum over rows of grad_out           -> [C]
//                 with column_sums also, from the same sweep (the Block's
//                 c_proj bias gradients, block.cpp):
//                 grad_residual_sum = sum over rows of grad_residual -> [C]
//                 grad_x_sum  = sum over rows of grad_x as written  -> [C]
//                 (rounded to the dtype: what bias_grad of grad_x adds)
//
// Forward: a team of warps per row (one warp up to 1024 bfloat16 elements,
// several rows a block) reads the row once with 16-byte vector loads where
// the row length and pointers allow, into registers, where the mean and the
// variance take two passes for accuracy; rows too long for the registers
// take a block each and three passes over memory.
// Backward: one sweep over the rows that reads grad_out and x once, keeping a
// row in registers while it is reduced, writes grad_x and gives each group
// of rows its own [C] partial of grad_weight and grad_bias, summed in
// registers (no atomics), and with column_sums of grad_residual and grad_x,
// summed in shared memory; one sum_partials_kernel launch adds the partials
// in group order, so every column sum is deterministic. Sums run in acc_t
// (float32, float64 for float64).
#include <limits>

#include "common.cuh"

namespace nanoblock::cuda {

namespace {

// ---------------------------------------------------------------------------
// Forward. The two kernels share the residual add and the normalization.

// a = x + residual (x + dropout(residual) with DROPOUT), each element rounded
// to scalar_t as `x + residual` would be; index = the mask index of a's first
// element (row * C + column).
template <typename scalar_t, int VEC, bool DROPOUT>
__device__ __forceinline__ void add_residual(Vec<scalar_t, VEC>& a, const Vec<scalar_t, VEC>& b,
                                             const DeviceMask& mask, const DropoutArgs& dropout,
                                             uint64_t index) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (DROPOUT) {
    bool keep[VEC];
    mask.kept(index, keep);
    const acc_t scale = static_cast<acc_t>(dropout.scale);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      const acc_t r = acc_element<acc_t>(b, k) * (keep[k] ? scale : acc_t(0));
      a.v[k] = static_cast<scalar_t>(acc_element<acc_t>(a, k) + r);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      a.v[k] = static_cast<scalar_t>(acc_element<acc_t>(a, k) + acc_element<acc_t>(b, k));
    }
  }
}

// (a - mean) * rstd * weight (+ bias) of one vector; bias may be null.
template <typename scalar_t, int VEC, typename acc_t = acc_type<scalar_t>>
__device__ __forceinline__ Vec<scalar_t, VEC> normalize(const Vec<scalar_t, VEC>& a,
                                                        const scalar_t* weight,
                                                        const scalar_t* bias, acc_t mean,
                                                        acc_t rstd) {
  const Vec<scalar_t, VEC> w = load_vec<scalar_t, VEC>(weight);
  Vec<scalar_t, VEC> b;
  if (bias != nullptr) b = load_vec<scalar_t, VEC>(bias);
  Vec<scalar_t, VEC> y;
#pragma unroll
  for (int k = 0; k < VEC; k++) {
    acc_t v = (acc_element<acc_t>(a, k) - mean) * rstd * acc_element<acc_t>(w, k);
    if (bias != nullptr) v += acc_element<acc_t>(b, k);
    y.v[k] = static_cast<scalar_t>(v);
  }
  return y;
}

// Rows that fit in registers (all but the longest): a team of warps_per_row
// warps takes one row at a time, teams per block. Thread t of a team loads
// the vectors t + s * team_threads (s < SLOTS) of its row once, into
// registers: the mean, the variance around it (two passes, for accuracy) and
// the output come from there, so the row is read from memory once and no
// block-wide barrier is needed when a warp holds the row (rows up to 1024
// bfloat16 elements). With residual != nullptr the row normalized is sum =
// x + residual (x + dropout(residual) with DROPOUT), written to sum_out as it
// is formed.
// Without a residual (kLoadAhead) the grid holds as many blocks as fit on
// the GPU at once (resident_blocks), and a team takes rows team, team +
// teams * blocks, .., loading each next row while it reduces the current
// one: with one row a team and nothing else in flight, the (16384, 768)
// bfloat16 forward ran at 37% of DRAM's throughput, 42% of the warps
// resident (ncu, H200, session 12). Each row's arithmetic is the same
// whichever team takes it, so the bits do not depend on the grid. With a
// residual, a team takes one row, and loads the row's x and residual at once.
constexpr int kForwardMaxSlots = 4;
constexpr int kForwardMaxWarpsPerRow = 16;
constexpr int kForwardThreads = 256;  // per block, unless one row takes more

struct ForwardShape {
  int warps_per_row;  // a team; 0: the row does not fit, take the long-row kernel
  int slots;          // vectors per thread, 1 to kForwardMaxSlots
  int teams;          // rows per block
};

// The fewest warps (at most kForwardMaxWarpsPerRow) whose threads hold the row
// in at most kForwardMaxSlots vectors each, then the fewest slots for them.
// Depends only on the row's vector count, never on the device.
inline ForwardShape forward_shape(int64_t vectors) {
  const int64_t warps = std::max<int64_t>(1, ceil_div(vectors, 32 * kForwardMaxSlots));
  if (warps > kForwardMaxWarpsPerRow) return {0, 0, 0};
  const int w = static_cast<int>(warps);
  return {w, static_cast<int>(ceil_div(vectors, 32 * warps)),
          std::max(1, kForwardThreads / (32 * w))};
}

// Calls fn(std::integral_constant<int, SLOTS>{}) for slots in 1..kForwardMaxSlots.
template <typename Fn>
void with_forward_slots(int slots, const Fn& fn) {
  switch (slots) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    default: return fn(std::integral_constant<int, 4>{});
  }
}

// The sum of v over the threads of a team, the same value for each: warp
// shuffles, then the team's warps in order through scratch (one slot per
// warp of the block). With teams of several warps every thread of the block
// must call it (it has barriers).
template <typename acc_t>
__device__ __forceinline__ acc_t team_sum(acc_t v, acc_t* scratch, int warps_per_row) {
  v = warp_sum(v);
  if (warps_per_row == 1) return v;
  const int warp = threadIdx.x / 32, first = warp - warp % warps_per_row;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  acc_t total = 0;
  for (int i = 0; i < warps_per_row; i++) total += scratch[first + i];
  __syncthreads();  // scratch is written again by the next sum
  return total;
}

// RESIDUAL: residual is given (a template argument, so that the plain
// LayerNorm holds no registers for it); DROPOUT only with RESIDUAL.
// Only the plain LayerNorm loads a row ahead: with the residual, two rows of
// x and residual took 101 registers at C = 768 (bfloat16), or spilled 208
// bytes when held to 64, and fewer warps would have been resident than the
// loads ahead gain.
template <bool RESIDUAL>
constexpr bool kLoadAhead = !RESIDUAL;

// Blocks of the largest size (kForwardMaxWarpsPerRow warps) an SM must hold:
// two, at most 64 registers a thread, so that the plain LayerNorm's second
// row, and the residual's vectors loaded beside the row's, do not cost
// resident warps; one with four slots, or with dropout (its mask's
// arithmetic spilled 68 bytes at three slots in 64 registers).
template <int SLOTS, bool DROPOUT>
constexpr int kForwardMinBlocks = SLOTS < 4 && !DROPOUT ? 2 : 1;

template <typename scalar_t, int VEC, int SLOTS, bool RESIDUAL, bool DROPOUT>
__global__ void __launch_bounds__(32 * kForwardMaxWarpsPerRow, kForwardMinBlocks<SLOTS, DROPOUT>)
    layer_norm_forward_kernel(const scalar_t* __restrict__ x,         // [N, C]
                              const scalar_t* __restrict__ residual,  // [N, C] with RESIDUAL
                              const scalar_t* __restrict__ weight,    // [C]
                              const scalar_t* __restrict__ bias,      // [C] or null
                              scalar_t* __restrict__ sum_out,         // [N, C] with residual
                              scalar_t* __restrict__ out,             // [N, C]
                              acc_type<scalar_t>* __restrict__ mean_out,  // [N]
                              acc_type<scalar_t>* __restrict__ rstd_out,  // [N]
                              int64_t N, int64_t C, acc_type<scalar_t> eps, int warps_per_row,
                              DropoutArgs dropout) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  __shared__ acc_t scratch[kForwardMaxWarpsPerRow];  // one per warp: a block has at most that many
  const int team_threads = 32 * warps_per_row;
  const int teams = blockDim.x / team_threads;
  const int team = threadIdx.x / team_threads, t = threadIdx.x % team_threads;
  const int64_t rows_per_round = static_cast<int64_t>(gridDim.x) * teams;
  const int vectors = static_cast<int>(C / VEC);  // at most 32 * 16 * 4 (forward_shape)
  // Slot s of a row holds the vector at column(s), when in_row(row, s); a
  // team past the last row holds nothing but still takes part in team_sum's
  // barriers.
  const auto column = [&](int s) { return (t + s * team_threads) * VEC; };
  const auto in_row = [&](int64_t row, int s) {
    return row < N && t + s * team_threads < vectors;
  };
  const DeviceMask mask(dropout, DROPOUT);

  // A row's x and residual vectors as loaded.
  const auto load_row = [&](int64_t row, V (&a)[SLOTS], V (&r)[SLOTS]) {
#pragma unroll
    for (int s = 0; s < SLOTS; s++) {
      if (in_row(row, s)) {
        a[s] = load_vec<scalar_t, VEC>(x + row * C + column(s));
        if constexpr (RESIDUAL) r[s] = load_vec<scalar_t, VEC>(residual + row * C + column(s));
      }
    }
  };

  // Normalizes row (its x in a, its residual in r): sum_out, out, mean, rstd.
  const auto normalize_row = [&](int64_t row, V (&a)[SLOTS], const V (&r)[SLOTS]) {
    if constexpr (RESIDUAL) {
#pragma unroll
      for (int s = 0; s < SLOTS; s++) {
        if (in_row(row, s)) {
          add_residual<scalar_t, VEC, DROPOUT>(a[s], r[s], mask, dropout,
                                               static_cast<uint64_t>(row * C + column(s)));
          store_vec<scalar_t, VEC>(sum_out + row * C + column(s), a[s]);
        }
      }
    }
    acc_t sum = 0;
#pragma unroll
    for (int s = 0; s < SLOTS; s++) {
      if (in_row(row, s)) {
#pragma unroll
        for (int k = 0; k < VEC; k++) sum += acc_element<acc_t>(a[s], k);
      }
    }
    const acc_t mean = team_sum(sum, scratch, warps_per_row) / static_cast<acc_t>(C);

    acc_t sq = 0;
#pragma unroll
    for (int s = 0; s < SLOTS; s++) {
      if (in_row(row, s)) {
#pragma unroll
        for (int k = 0; k < VEC; k++) {
          const acc_t d = acc_element<acc_t>(a[s], k) - mean;
          sq += d * d;
        }
      }
    }
    const acc_t rstd =
        rsqrt_acc(team_sum(sq, scratch, warps_per_row) / static_cast<acc_t>(C) + eps);

#pragma unroll
    for (int s = 0; s < SLOTS; s++) {
      if (in_row(row, s)) {
        store_vec<scalar_t, VEC>(
            out + row * C + column(s),
            normalize<scalar_t, VEC>(a[s], weight + column(s),
                                     bias == nullptr ? nullptr : bias + column(s), mean, rstd));
      }
    }
    if (t == 0 && row < N) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  };

  V a[SLOTS], r[SLOTS];
  int64_t row = static_cast<int64_t>(blockIdx.x) * teams + team;
  load_row(row, a, r);
  if constexpr (!kLoadAhead<RESIDUAL>) {  // the grid has a team for every row
    normalize_row(row, a, r);
    return;
  }
  V next[SLOTS], unused[SLOTS];
  // The same trip count for every team of a block (team_sum's barriers).
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * teams; first < N;
       first += rows_per_round, row += rows_per_round) {
    load_row(row + rows_per_round, next, unused);  // (nothing past the last row)
    normalize_row(row, a, r);
#pragma unroll
    for (int s = 0; s < SLOTS; s++) a[s] = next[s];
  }
}

// The longest rows (more vectors than kForwardMaxWarpsPerRow warps hold in
// kForwardMaxSlots each): one block per row, three passes over the row in
// memory (the later two mostly hit L1/L2). With residual the sum is written
// to sum_out in the first pass; each thread re-reads only the elements it
// wrote itself, so no barrier is needed in between.
int long_row_threads(int64_t C, int vec) {
  const int64_t vectors = ceil_div(C, vec);
  return static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, ceil_div(vectors, 32) * 32)));
}

template <typename scalar_t, int VEC, bool DROPOUT>
__global__ void layer_norm_forward_long_row_kernel(const scalar_t* __restrict__ x,
                                                   const scalar_t* __restrict__ residual,
                                                   const scalar_t* __restrict__ weight,
                                                   const scalar_t* __restrict__ bias,
                                                   scalar_t* __restrict__ sum_out,
                                                   scalar_t* __restrict__ out,
                                                   acc_type<scalar_t>* __restrict__ mean_out,
                                                   acc_type<scalar_t>* __restrict__ rstd_out,
                                                   int64_t C, acc_type<scalar_t> eps,
                                                   DropoutArgs dropout) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  __shared__ acc_t scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t vectors = C / VEC;
  const scalar_t* in = x + row * C;
  const DeviceMask mask(dropout, DROPOUT);

  // Pass 1: the residual add and the row sum.
  acc_t sum = 0;
  if (residual != nullptr) {
    scalar_t* s = sum_out + row * C;
    for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
      V a = load_vec<scalar_t, VEC>(in + i * VEC);
      add_residual<scalar_t, VEC, DROPOUT>(a, load_vec<scalar_t, VEC>(residual + row * C + i * VEC),
                                           mask, dropout, static_cast<uint64_t>(row * C + i * VEC));
#pragma unroll
      for (int k = 0; k < VEC; k++) sum += acc_element<acc_t>(a, k);
      store_vec<scalar_t, VEC>(s + i * VEC, a);
    }
    in = s;  // the rest normalizes the rounded sum, as x + residual then LayerNorm would
  } else {
    for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
      const V a = load_vec<scalar_t, VEC>(in + i * VEC);
#pragma unroll
      for (int k = 0; k < VEC; k++) sum += acc_element<acc_t>(a, k);
    }
  }
  const acc_t mean = block_sum(sum, scratch) / static_cast<acc_t>(C);

  // Pass 2: the variance around the mean.
  acc_t sq = 0;
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    const V a = load_vec<scalar_t, VEC>(in + i * VEC);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      const acc_t d = acc_element<acc_t>(a, k) - mean;
      sq += d * d;
    }
  }
  const acc_t rstd = rsqrt_acc(block_sum(sq, scratch) / static_cast<acc_t>(C) + eps);

  // Pass 3: normalize, scale, shift.
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    store_vec<scalar_t, VEC>(
        out + row * C + i * VEC,
        normalize<scalar_t, VEC>(load_vec<scalar_t, VEC>(in + i * VEC), weight + i * VEC,
                                 bias == nullptr ? nullptr : bias + i * VEC, mean, rstd));
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// ---------------------------------------------------------------------------
// Backward: grad_x and the weight and bias partials in one sweep over the rows.
//
// One block per row group (backward_groups groups of rows_per_group rows).
// A row is taken by a team of warps_per_row warps: thread t of a team holds
// the vectors t + s * team_threads (s < SLOTS) of the row in registers, so
// grad_out and x are read once. The team sums g = grad_out * weight and
// g * xhat over the row (warp shuffles, then shared memory across the team's
// warps, in warp order, behind a barrier of the team's own) and writes
// grad_x. The block's teams take rows team, team + teams, .. of the group,
// and each loads its next row while it reduces the current one. Every
// thread adds grad_out * xhat and grad_out of its columns over its rows in
// registers; at the end the teams' sums are added in team order
// (store_column_sums) into the group's partial rows, partials [2, groups,
// C]: grad_weight's, then grad_bias's.
//
// SUMS (column_sums, with grad_residual) adds two partial rows a group,
// partials [4, groups, C]: grad_residual's and grad_x's (as rounded) column
// sums. Every thread adds them over its rows as it writes grad_x, in shared
// memory (its own 2 * SLOTS * VEC running sums): they do not fit in
// registers beside the row and dw, db (the bfloat16 kernel of C = 768 holds
// 126 of its 128 registers without them). At the end they go through
// store_column_sums like dw and db. Where the running sums would take more
// than kMaxRunningSumBytes a thread (16-bit rows of more than 8192 elements)
// the launcher sums grad_residual and grad_x in passes of their own
// (bias_grad).
//
// A row longer than a team's slots (SPILL: vectors > SLOTS * team_threads,
// only for the widest teams, which are alone in their block) has its other
// vectors read twice, for the sums and for grad_x, and their column sums
// added straight into the partial rows, where only this thread writes them.
//
// The launch shape (backward_shape, backward_groups) depends only on N, C,
// the dtype and the vector width that the pointers allow, never on the
// device, so the same inputs give the same bits on every GPU.
//
// What holds it back is the instructions it issues, not DRAM's latency (ncu,
// H200, bf16 (16384, 768): 0.72 instructions issued a cycle a scheduler, 44
// a row element, 0.16 cycles of long-scoreboard stall an instruction). So
// loading rows further ahead (in registers, or staged through shared memory
// by cp.async) and more resident warps (one slot a thread) all lost, and the
// row loop is kept lean: offsets that follow the rows, bfloat16 widened from
// 32-bit words (acc_element), the team's sum loop not unrolled (session 14:
// 42.4 + 36.7 -> 39.5 + 34.2 us at gpt2-small, the same bits).

constexpr int kBlockWarps = 8;       // about this many warps a block (teams of short rows share one)
constexpr int kMaxWarpsPerRow = 16;  // the widest team
constexpr int kBackwardMaxThreads = 32 * kMaxWarpsPerRow;
// A thread's running column sums with SUMS, at most: with the padding, 68 KB
// of shared memory for the widest block, which every GPU since sm_80 grants.
constexpr int kMaxRunningSumBytes = 128;

template <typename acc_t, int SLOTS, int VEC>
constexpr bool running_sums_fit() {
  return 2 * SLOTS * VEC * sizeof(acc_t) <= kMaxRunningSumBytes;
}

// Shared memory values a thread with SUMS: its running sums and one of
// padding, so that the stride between threads is odd (32 threads, 32 banks).
template <int SLOTS, int VEC>
constexpr int kRunningStride = 2 * SLOTS * VEC + 1;

struct BackwardShape {
  int warps_per_row;  // a team: the warps that take one row
  int slots;          // vectors per thread held in registers, 1 to 4
  int teams;          // teams per block
  bool spill;         // the row is longer than a team's slots
};

// The fewest warps per row (at most kMaxWarpsPerRow) whose threads hold the
// row in at most `preferred` vectors each (with 16-byte vectors, as many as
// fit in registers beside their column sums: 2 for 16-bit and 64-bit types,
// 3 for float32; 4 for narrower vectors), then the fewest slots for those
// warps, and teams enough to fill about kBlockWarps warps.
template <typename scalar_t, int VEC>
BackwardShape backward_shape(int64_t vectors) {
  const int64_t preferred = VEC * sizeof(scalar_t) < 16 ? 4 : sizeof(scalar_t) == 4 ? 3 : 2;
  const int64_t warps = std::min<int64_t>(
      kMaxWarpsPerRow, std::max<int64_t>(1, ceil_div(vectors, 32 * preferred)));
  const int64_t slots = ceil_div(vectors, 32 * warps);
  const int w = static_cast<int>(warps);
  return {w, static_cast<int>(std::min<int64_t>(slots, 4)), std::max(1, (kBlockWarps + w / 2) / w),
          slots > 4};
}

// Row groups (one partial row each): at most 256, and at least two rows for
// every team of a block, so that a team has a next row to load.
inline int64_t backward_groups(int64_t rows, int teams) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, 2 * teams), 256));
}

// Calls fn(std::integral_constant<int, SLOTS>{}, std::bool_constant<SPILL>{})
// for the shape's slots and spill (SPILL only with 4 slots).
template <typename Fn>
void with_slots(const BackwardShape& shape, const Fn& fn) {
  if (shape.spill) return fn(std::integral_constant<int, 4>{}, std::true_type{});
  switch (shape.slots) {
    case 1: return fn(std::integral_constant<int, 1>{}, std::false_type{});
    case 2: return fn(std::integral_constant<int, 2>{}, std::false_type{});
    case 3: return fn(std::integral_constant<int, 3>{}, std::false_type{});
    default: return fn(std::integral_constant<int, 4>{}, std::false_type{});
  }
}

// Makes the compiler forget what v holds, so that it recomputes the values it
// derived from v (the float conversions, g and xhat) instead of keeping them
// alive in registers. The backward keeps a row in registers across the row
// reduction: as loaded it takes a quarter of the registers of g and xhat in
// float (bfloat16), and recomputing them is a few instructions. Measured on
// an H200 (bf16, C = 768): without it the kernel runs out of registers and
// ran 1.3-1.7x slower.
template <typename scalar_t, int VEC>
__device__ __forceinline__ void forget(Vec<scalar_t, VEC>& v) {
  if constexpr (sizeof(v) % 4 == 0) {
    uint32_t* words = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(v) / 4); i++) asm volatile("" : "+r"(words[i]));
  } else {
    static_assert(sizeof(v) == 2, "a vector is 2 bytes or a multiple of 4");
    asm volatile("" : "+h"(*reinterpret_cast<uint16_t*>(&v)));
  }
}

// The backward's terms of one vector of a row: the row sums g_sum += g and
// gx_sum += g * xhat (g = grad_out * weight), the column sums
// dw[k] += grad_out * xhat and db[k] += grad_out.
template <typename scalar_t, int VEC, typename acc_t = acc_type<scalar_t>>
__device__ __forceinline__ void backward_sums(const Vec<scalar_t, VEC>& dy,
                                              const Vec<scalar_t, VEC>& x,
                                              const Vec<scalar_t, VEC>& w, acc_t mean, acc_t rstd,
                                              acc_t& g_sum, acc_t& gx_sum, acc_t (&dw)[VEC],
                                              acc_t (&db)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; k++) {
    const acc_t d = acc_element<acc_t>(dy, k);
    const acc_t g = d * acc_element<acc_t>(w, k);
    const acc_t xhat = (acc_element<acc_t>(x, k) - mean) * rstd;
    g_sum += g;
    gx_sum += g * xhat;
    dw[k] += d * xhat;
    db[k] += d;
  }
}

// grad_x of one vector of a row, given the row's means of g and g * xhat;
// plus res when with_res.
template <typename scalar_t, int VEC, typename acc_t = acc_type<scalar_t>>
__device__ __forceinline__ Vec<scalar_t, VEC> backward_grad_x(
    const Vec<scalar_t, VEC>& dy, const Vec<scalar_t, VEC>& x, const Vec<scalar_t, VEC>& w,
    const Vec<scalar_t, VEC>& res, bool with_res, acc_t mean, acc_t rstd, acc_t g_mean,
    acc_t gx_mean) {
  Vec<scalar_t, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; k++) {
    const acc_t g = acc_element<acc_t>(dy, k) * acc_element<acc_t>(w, k);
    const acc_t xhat = (acc_element<acc_t>(x, k) - mean) * rstd;
    acc_t v = rstd * (g - g_mean - xhat * gx_mean);
    if (with_res) v += acc_element<acc_t>(res, k);
    out.v[k] = static_cast<scalar_t>(v);
  }
  return out;
}

template <typename scalar_t, int VEC, int SLOTS, bool SPILL, bool SUMS>
__global__ void __launch_bounds__(kBackwardMaxThreads)
    layer_norm_backward_kernel(const scalar_t* __restrict__ grad_out,       // [N, C]
                               const scalar_t* __restrict__ x,              // [N, C]
                               const scalar_t* __restrict__ weight,         // [C]
                               const acc_type<scalar_t>* __restrict__ mean,  // [N]
                               const acc_type<scalar_t>* __restrict__ rstd,  // [N]
                               const scalar_t* __restrict__ grad_residual,  // [N, C] or null
                               scalar_t* __restrict__ grad_x,               // [N, C]
                               acc_type<scalar_t>* __restrict__ partials,   // [2 or 4, groups, C]
                               int64_t N, int64_t C, int64_t rows_per_group, int warps_per_row) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int team_threads = 32 * warps_per_row;
  const int teams = blockDim.x / team_threads;
  // Shared memory: the teams' row sums [2 (alternate rounds)][teams][warps_per_row][2],
  // then store_column_sums' scratch [teams][C] (with more than one team), then
  // with SUMS the running sums [blockDim.x][kRunningStride]: a thread's own
  // side by side, at constant offsets from one address (offsets that were
  // multiples of blockDim.x took a register each).
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* row_sums = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* column_scratch = row_sums + 4 * (blockDim.x / 32);
  acc_t* my_running_sums = column_scratch + (teams > 1 ? teams * C : 0) +
                           threadIdx.x * kRunningStride<SLOTS, VEC>;
  // This thread's running sum of column(s) + k of grad_residual (which 0) or grad_x (1).
  const auto running = [&](int which, int s, int k) -> acc_t& {
    return my_running_sums[(which * SLOTS + s) * VEC + k];
  };

  const int team = threadIdx.x / team_threads, t = threadIdx.x % team_threads;
  const int warp = t / 32, lane = t % 32;
  const int vectors = static_cast<int>(C / VEC);  // C < 2^31 (checked by the launcher)
  const int64_t groups = gridDim.x, group = blockIdx.x;
  const int64_t row_begin = group * rows_per_group;
  const int64_t row_end = std::min(N, row_begin + rows_per_group);
  acc_t* dw_partial = partials + group * C;
  acc_t* db_partial = partials + (groups + group) * C;
  // SUMS: the group's partial rows of grad_residual (which 0) and grad_x (1),
  // found where they are used (kept across the row loop they took registers).
  const auto sums_partial = [&](int which) {
    return partials + ((2 + which) * groups + group) * C;
  };
  const bool with_res = grad_residual != nullptr;

  // Slot s holds the vector at column(s), when in_row(s).
  const auto column = [&](int s) { return (t + s * team_threads) * VEC; };
  const auto in_row = [&](int s) { return t + s * team_threads < vectors; };
  const int spill_begin = t + SLOTS * team_threads;  // the vectors past the slots (SPILL)

  V w[SLOTS];
#pragma unroll
  for (int s = 0; s < SLOTS; s++) {
    if (in_row(s)) w[s] = load_vec<scalar_t, VEC>(weight + column(s));
  }
  if constexpr (SPILL) {
    for (int i = spill_begin; i < vectors; i += team_threads) {
#pragma unroll
      for (int k = 0; k < VEC; k++) {
        dw_partial[i * VEC + k] = db_partial[i * VEC + k] = 0;
        if constexpr (SUMS) sums_partial(0)[i * VEC + k] = sums_partial(1)[i * VEC + k] = 0;
      }
    }
  }
  if constexpr (SUMS) {
#pragma unroll
    for (int s = 0; s < SLOTS; s++) {
#pragma unroll
      for (int k = 0; k < VEC; k++) running(0, s, k) = running(1, s, k) = 0;
    }
  }

  struct Row {
    V dy[SLOTS], x[SLOTS];
    acc_t mean, rstd;
  };
  // The row whose elements start at `offset` (= row * C).
  const auto load_row = [&](int64_t row, int64_t offset, Row& r) {
    r.mean = mean[row];
    r.rstd = rstd[row];
#pragma unroll
    for (int s = 0; s < SLOTS; s++) {
      if (in_row(s)) {
        r.dy[s] = load_vec<scalar_t, VEC>(grad_out + offset + column(s));
        r.x[s] = load_vec<scalar_t, VEC>(x + offset + column(s));
      }
    }
  };
  // The team's row sums in the first half (even rounds); the second half
  // (odd rounds) lies half_sums further.
  acc_t* const team_row_sums = row_sums + team * warps_per_row * 2;
  const int half_sums = teams * warps_per_row * 2;

  acc_t dw[SLOTS][VEC] = {}, db[SLOTS][VEC] = {};
  Row cur, next;
  // A team's rows are teams apart: `offset` follows them (row * C), so the
  // addresses take one add a round rather than a 64-bit product each.
  const int64_t row_step = static_cast<int64_t>(teams) * C;
  int64_t offset = (row_begin + team) * C;
  if (row_begin + team < row_end) load_row(row_begin + team, offset, cur);
  int parity = 0;
  // The trip count is the same for every team (a team past the group's end
  // idles through the round), so all reach the barrier below.
  for (int64_t base = row_begin; base < row_end; base += teams, offset += row_step) {
    const int64_t row = base + team;
    const bool active = row < row_end;
    if (row + teams < row_end) load_row(row + teams, offset + row_step, next);
#pragma unroll
    for (int s = 0; s < SLOTS; s++) forget<scalar_t, VEC>(w[s]);
    acc_t g_sum = 0, gx_sum = 0;
    if (active) {
#pragma unroll
      for (int s = 0; s < SLOTS; s++) {
        if (in_row(s)) {
          backward_sums<scalar_t, VEC>(cur.dy[s], cur.x[s], w[s], cur.mean, cur.rstd, g_sum,
                                       gx_sum, dw[s], db[s]);
        }
      }
      if constexpr (SPILL) {
        const scalar_t* dy_row = grad_out + offset;
        const scalar_t* x_row = x + offset;
        for (int i = spill_begin; i < vectors; i += team_threads) {
          acc_t dw_spill[VEC] = {}, db_spill[VEC] = {};
          backward_sums<scalar_t, VEC>(load_vec<scalar_t, VEC>(dy_row + i * VEC),
                                       load_vec<scalar_t, VEC>(x_row + i * VEC),
                                       load_vec<scalar_t, VEC>(weight + i * VEC), cur.mean,
                                       cur.rstd, g_sum, gx_sum, dw_spill, db_spill);
#pragma unroll
          for (int k = 0; k < VEC; k++) {
            dw_partial[i * VEC + k] += dw_spill[k];
            db_partial[i * VEC + k] += db_spill[k];
          }
        }
      }
    }
#pragma unroll
    for (int s = 0; s < SLOTS; s++) {
      forget<scalar_t, VEC>(cur.dy[s]);
      forget<scalar_t, VEC>(cur.x[s]);
    }
    g_sum = warp_sum(g_sum);
    gx_sum = warp_sum(gx_sum);
    if (warps_per_row > 1) {
      acc_t* sums = team_row_sums + (parity ? half_sums : 0);
      if (lane == 0) {
        sums[2 * warp] = g_sum;
        sums[2 * warp + 1] = gx_sum;
      }
      // One barrier a round, the team's own (named barrier 1 + team; 0 is
      // __syncthreads'), so that the teams of a block do not wait on each
      // other: the next round writes the other half, and the round after that
      // starts only when every thread of the team has passed the next round's
      // barrier, so after it has read this half. (H200, bf16, LayerNorm
      // fwd+bwd in a CUDA graph, one run: 0.039 -> 0.038 ms at 4096 x 1600,
      // four warps a team; 0.054 -> 0.053 ms at 16384 x 768, two: a few %,
      // near the run-to-run noise, and never slower.)
      asm volatile("bar.sync %0, %1;" ::"r"(team + 1), "r"(team_threads) : "memory");
      g_sum = sums[0];
      gx_sum = sums[1];
#pragma unroll 1  // (it runs once at 2 warps a team; unrolled by 4, its checks and remainder
                  // took ~130 of the row loop's 880 instructions, in SASS)
      for (int i = 1; i < warps_per_row; i++) {
        g_sum += sums[2 * i];
        gx_sum += sums[2 * i + 1];
      }
      parity ^= 1;
    }
    if (active) {
      const acc_t g_mean = g_sum / static_cast<acc_t>(C);
      const acc_t gx_mean = gx_sum / static_cast<acc_t>(C);
      const scalar_t* res_row = with_res ? grad_residual + offset : nullptr;
      scalar_t* dx_row = grad_x + offset;
      V res[SLOTS];  // all loads issued before the first store
      if (with_res) {
#pragma unroll
        for (int s = 0; s < SLOTS; s++) {
          if (in_row(s)) res[s] = load_vec<scalar_t, VEC>(res_row + column(s));
        }
      }
#pragma unroll
      for (int s = 0; s < SLOTS; s++) {
        if (in_row(s)) {
          const V dx = backward_grad_x<scalar_t, VEC>(cur.dy[s], cur.x[s], w[s], res[s], with_res,
                                                      cur.mean, cur.rstd, g_mean, gx_mean);
          store_vec<scalar_t, VEC>(dx_row + column(s), dx);
          if constexpr (SUMS) {
#pragma unroll
            for (int k = 0; k < VEC; k++) {
              running(0, s, k) += acc_element<acc_t>(res[s], k);
              running(1, s, k) += acc_element<acc_t>(dx, k);
            }
          }
        }
      }
      if constexpr (SPILL) {
        const scalar_t* dy_row = grad_out + offset;
        const scalar_t* x_row = x + offset;
        for (int i = spill_begin; i < vectors; i += team_threads) {
          V res;
          if (with_res) res = load_vec<scalar_t, VEC>(res_row + i * VEC);
          const V dx = backward_grad_x<scalar_t, VEC>(
              load_vec<scalar_t, VEC>(dy_row + i * VEC), load_vec<scalar_t, VEC>(x_row + i * VEC),
              load_vec<scalar_t, VEC>(weight + i * VEC), res, with_res, cur.mean, cur.rstd,
              g_mean, gx_mean);
          store_vec<scalar_t, VEC>(dx_row + i * VEC, dx);
          if constexpr (SUMS) {
#pragma unroll
            for (int k = 0; k < VEC; k++) {
              sums_partial(0)[i * VEC + k] += acc_element<acc_t>(res, k);
              sums_partial(1)[i * VEC + k] += acc_element<acc_t>(dx, k);
            }
          }
        }
      }
    }
    cur = next;
  }

  store_column_sums<acc_t, SLOTS, VEC>(dw, team, teams, t, team_threads, C, column_scratch,
                                       dw_partial);
  store_column_sums<acc_t, SLOTS, VEC>(db, team, teams, t, team_threads, C, column_scratch,
                                       db_partial);
  if constexpr (SUMS) {
    // The running sums into registers (the row's are free now), then as dw and db.
    acc_t sums[SLOTS][VEC];
    for (int which = 0; which < 2; which++) {
#pragma unroll
      for (int s = 0; s < SLOTS; s++) {
#pragma unroll
        for (int k = 0; k < VEC; k++) sums[s][k] = running(which, s, k);
      }
      store_column_sums<acc_t, SLOTS, VEC>(sums, team, teams, t, team_threads, C, column_scratch,
                                           sums_partial(which));
    }
  }
}

// ---------------------------------------------------------------------------
// Launchers.

template <typename scalar_t>
void launch_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                    const Tensor& bias, double eps, const DropoutArgs& dropout,
                    const Tensor& sum, const Tensor& out, const Tensor& mean, const Tensor& rstd,
                    int64_t N, int64_t C) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* res_ptr = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
  const scalar_t* b_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* sum_ptr = sum.defined() ? sum.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const int vec = vector_width<scalar_t>(C, {x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, out_ptr});
  const cudaStream_t stream = current_stream();
  with_vector_width<scalar_t>(vec, [&](auto vec_constant) {
    constexpr int VEC = decltype(vec_constant)::value;
    const ForwardShape shape = forward_shape(C / VEC);
    with_dropout(dropout, [&](auto dropout_constant) {
      constexpr bool DROPOUT = decltype(dropout_constant)::value;
      if (shape.warps_per_row == 0) {
        layer_norm_forward_long_row_kernel<scalar_t, VEC, DROPOUT>
            <<<N, long_row_threads(C, VEC), 0, stream>>>(
                x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, mean.mutable_data_ptr<acc_t>(),
                rstd.mutable_data_ptr<acc_t>(), C, static_cast<acc_t>(eps), dropout);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      with_forward_slots(shape.slots, [&](auto slots_constant) {
        constexpr int SLOTS = decltype(slots_constant)::value;
        const auto launch = [&](auto kernel, bool load_ahead) {
          const int threads = 32 * shape.warps_per_row * shape.teams;
          // One team a row, or, loading rows ahead, fewer blocks than that where
          // they would not all fit at once: then teams take several rows each
          // (the kernel's comment).
          const int64_t blocks = ceil_div(N, shape.teams);
          const int64_t resident = load_ahead ? resident_blocks(kernel, threads) : blocks;
          kernel<<<static_cast<unsigned>(std::min(blocks, resident)), threads, 0, stream>>>(
              x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, mean.mutable_data_ptr<acc_t>(),
              rstd.mutable_data_ptr<acc_t>(), N, C, static_cast<acc_t>(eps),
              shape.warps_per_row, dropout);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (res_ptr != nullptr) {
          launch(layer_norm_forward_kernel<scalar_t, VEC, SLOTS, true, DROPOUT>, kLoadAhead<true>);
        } else {  // (the dropout is the residual's: without one there is none)
          launch(layer_norm_forward_kernel<scalar_t, VEC, SLOTS, false, false>, kLoadAhead<false>);
        }
      });
    });
  });
}

// Returns whether it summed grad_residual and grad_x too (asked by
// column_sums: res_sum_ptr and dx_sum_ptr given; not where the running sums
// do not fit, running_sums_fit).
template <typename scalar_t>
bool launch_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                     const Tensor& mean, const Tensor& rstd, const Tensor& grad_residual,
                     const Tensor& grad_x, const Tensor& grad_weight, const Tensor& grad_bias,
                     scalar_t* res_sum_ptr, scalar_t* dx_sum_ptr, int64_t N, int64_t C) {
  using acc_t = acc_type<scalar_t>;
  TORCH_CHECK(C <= std::numeric_limits<int>::max(),
              "nanoblock.layer_norm_backward: rows of more than 2^31 - 1 elements (C = ", C,
              ") are not supported on CUDA");
  const scalar_t* dy_ptr = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
  const scalar_t* dres_ptr =
      grad_residual.defined() ? grad_residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dx_ptr = grad_x.mutable_data_ptr<scalar_t>();
  scalar_t* dw_ptr = grad_weight.mutable_data_ptr<scalar_t>();
  scalar_t* db_ptr = grad_bias.mutable_data_ptr<scalar_t>();
  const bool column_sums = res_sum_ptr != nullptr;
  bool summed = false;
  const cudaStream_t stream = current_stream();
  const int vec = vector_width<scalar_t>(C, {dy_ptr, x_ptr, w_ptr, dres_ptr, dx_ptr});
  with_vector_width<scalar_t>(vec, [&](auto vec_constant) {
    constexpr int VEC = decltype(vec_constant)::value;
    const BackwardShape shape = backward_shape<scalar_t, VEC>(C / VEC);
    const int64_t groups = backward_groups(N, shape.teams);
    const int threads = 32 * shape.warps_per_row * shape.teams;
    with_slots(shape, [&](auto slots_constant, auto spill_constant) {
      constexpr int SLOTS = decltype(slots_constant)::value;
      constexpr bool SPILL = decltype(spill_constant)::value;
      const auto launch = [&](auto sums_constant) {
        constexpr bool SUMS = decltype(sums_constant)::value;
        Tensor partials = at::empty({SUMS ? 4 : 2, groups, C},
                                    x.options().dtype(stats_dtype(x.scalar_type())));
        acc_t* partials_ptr = partials.mutable_data_ptr<acc_t>();
        // the row sums, store_column_sums' scratch when teams share a block,
        // the running sums
        const size_t shared = (4 * threads / 32 + (shape.teams > 1 ? shape.teams * C : 0) +
                               (SUMS ? kRunningStride<SLOTS, VEC> * threads : 0)) *
                              sizeof(acc_t);
        const auto kernel = layer_norm_backward_kernel<scalar_t, VEC, SLOTS, SPILL, SUMS>;
        allow_shared_memory(kernel, shared);
        kernel<<<static_cast<unsigned>(groups), threads, shared, stream>>>(
            dy_ptr, x_ptr, w_ptr, mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
            dres_ptr, dx_ptr, partials_ptr, N, C, ceil_div(N, groups), shape.warps_per_row);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if constexpr (SUMS) {
          launch_sum_partials<scalar_t, acc_t>(partials_ptr, groups, C,
                                               {dw_ptr, db_ptr, res_sum_ptr, dx_sum_ptr}, stream);
        } else {
          launch_sum_partials<scalar_t, acc_t>(partials_ptr, groups, C, {dw_ptr, db_ptr}, stream);
        }
        summed = SUMS;
      };
      if constexpr (running_sums_fit<acc_t, SLOTS, VEC>()) {
        if (column_sums) return launch(std::true_type{});
      }
      launch(std::false_type{});
    });
  });
  return summed;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& x, const Tensor& weight,
                                                      const Tensor& bias, double eps) {
  const auto rows = x.sizes().slice(0, x.dim() - 1);
  const auto stats = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor out = at::empty_like(x), mean = at::empty(rows, stats), rstd = at::empty(rows, stats);
  const int64_t C = x.size(-1), N = C == 0 ? 0 : x.numel() / C;
  if (N == 0) return {out, mean, rstd};
  NANOBLOCK_DISPATCH(x.scalar_type(), "layer_norm_forward", [&] {
    launch_forward<scalar_t>(x, Tensor(), weight, bias, eps, DropoutArgs{}, Tensor(), out, mean,
                             rstd, N, C);
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_forward(const Tensor& x,
                                                                  const Tensor& residual,
                                                                  const Tensor& weight,
                                                                  const Tensor& bias, double eps,
                                                                  const Dropout& dropout) {
  const auto rows = x.sizes().slice(0, x.dim() - 1);
  const auto stats = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor sum = at::empty_like(x), out = at::empty_like(x);
  Tensor mean = at::empty(rows, stats), rstd = at::empty(rows, stats);
  const int64_t C = x.size(-1), N = C == 0 ? 0 : x.numel() / C;
  if (N == 0) return {sum, out, mean, rstd};
  NANOBLOCK_DISPATCH(x.scalar_type(), "add_layer_norm_forward", [&] {
    launch_forward<scalar_t>(x, residual, weight, bias, eps, dropout_args(dropout), sum, out,
                             mean, rstd, N, C);
  });
  return {sum, out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_norm_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& mean,
    const Tensor& rstd, const Tensor& grad_residual, bool column_sums) {
  const int64_t C = x.size(-1), N = C == 0 ? 0 : x.numel() / C;
  Tensor grad_x = at::empty_like(x);
  if (N == 0) {
    // Sums over no rows are zero.
    const auto zeros = [&] { return at::zeros_like(weight); };
    return {grad_x, zeros(), zeros(), column_sums ? zeros() : Tensor(),
            column_sums ? zeros() : Tensor()};
  }
  Tensor grad_weight = at::empty_like(weight), grad_bias = at::empty_like(weight);
  Tensor grad_residual_sum, grad_x_sum;
  if (column_sums) {
    grad_residual_sum = at::empty_like(weight);
    grad_x_sum = at::empty_like(weight);
  }
  bool summed = false;
  NANOBLOCK_DISPATCH(x.scalar_type(), "layer_norm_backward", [&] {
    summed = launch_backward<scalar_t>(
        grad_out, x, weight, mean, rstd, grad_residual, grad_x, grad_weight, grad_bias,
        column_sums ? grad_residual_sum.mutable_data_ptr<scalar_t>() : nullptr,
        column_sums ? grad_x_sum.mutable_data_ptr<scalar_t>() : nullptr, N, C);
  });
  if (column_sums && !summed) {  // rows too long for the running sums: passes of their own
    grad_residual_sum = bias_grad(grad_residual);
    grad_x_sum = bias_grad(grad_x);
  }
  return {grad_x, grad_weight, grad_bias, grad_residual_sum, grad_x_sum};
}

}  // namespace nanoblock::cuda
