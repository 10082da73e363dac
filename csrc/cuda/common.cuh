// Helpers shared by nanoblock's CUDA kernels: accumulation types, accurate
// math in the accumulation type, warp and block reductions, 16-byte vector
// access, the fixed-order sum of per-block column partials that makes
// every parameter gradient deterministic, and dropout masks in device code.
//
// Conventions every .cu file follows:
//   - kernels run on the current stream (current_stream()) and allocate only through
//     PyTorch (at::empty*), never synchronize with the host;
//   - every launch is followed by C10_CUDA_KERNEL_LAUNCH_CHECK();
//   - acc_t is float for half, bfloat16 and float inputs, double for double
//     (at::opmath_type), the same as the saved statistics (kernels.h);
//   - no float atomics: a sum over rows is done by per-block partials that a
//     second kernel adds in block order, so the same inputs give the same bits.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "../kernels.h"
#include "../philox.h"

namespace nanoblock::cuda {

// float for half / bfloat16 / float, double for double.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The current stream of the current device (what at::cuda::getCurrentCUDAStream
// returns; c10's header keeps the cuBLAS/cuSPARSE headers out of these files).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Multiprocessors of the current device.
inline int multiprocessor_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Blocks of `kernel` at `threads` threads (no dynamic shared memory) that
// the current GPU holds at once: the occupancy calculator's blocks per
// multiprocessor times the multiprocessors, asked once per kernel, block
// size and device (host time counts at small shapes).
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads) {
  static std::mutex lock;
  static std::map<std::tuple<const void*, int, int>, int> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), threads, device);
  const std::lock_guard<std::mutex> guard(lock);
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  int per_multiprocessor = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel, threads, 0));
  const int blocks = std::max(1, per_multiprocessor) * multiprocessor_count();
  known.emplace(key, blocks);
  return blocks;
}

// Dispatch over the four dtypes the CUDA kernels support.
#define NANOBLOCK_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ---------------------------------------------------------------------------
// Accurate math in the accumulation type. These are the full-precision CUDA
// functions (expf, erff, tanhf; never the __expf-style intrinsics), so float32
// and float64 results match PyTorch's own kernels to rounding.

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float erf_acc(float x) { return erff(x); }
__device__ __forceinline__ double erf_acc(double x) { return erf(x); }
__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }
__device__ __forceinline__ float rsqrt_acc(float x) { return 1.0f / sqrtf(x); }
__device__ __forceinline__ double rsqrt_acc(double x) { return 1.0 / sqrt(x); }

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The special-function unit alone, for values that end up rounded to 16 bits
// (tensor_core.cuh's softmax, gelu.cu's Gelu16Math): ex2.approx.ftz and
// rcp.approx.ftz (relative errors about 2^-22 and 2^-23; subnormal inputs
// and results flushed to 0). exp2f and the __expf / __fdividef intrinsics
// wrap the same instructions in a range test and two multiplies to keep
// subnormals: four instructions for one (the wgmma forward's SASS, sm_90a),
// three of them on the FP32 pipe that the softmax is short of.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float reciprocal_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
__device__ __forceinline__ T neg_infinity() {
  return -INFINITY;
}

// ---------------------------------------------------------------------------
// Reductions. The butterfly (xor) pattern leaves the same value in every lane
// and always adds in the same order, so results are deterministic.

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. `scratch` holds 32 values; the function ends with a
// barrier so the scratch can be reused right away.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = lane < warps ? scratch[lane] : T(0);
  total = warp_sum(total);
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------
// Vector access: VEC elements moved as one aligned load or store (16 bytes
// when VEC = 16 / sizeof(scalar_t)).

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Vec<scalar_t, VEC> load_vec(const scalar_t* p) {
  return *reinterpret_cast<const Vec<scalar_t, VEC>*>(p);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_vec(scalar_t* p, const Vec<scalar_t, VEC>& v) {
  *reinterpret_cast<Vec<scalar_t, VEC>*>(p) = v;
}

// Element k of v in acc_t. A bfloat16 is the upper half of the float it
// widens to, so from the 32-bit word that holds elements 2i and 2i + 1 the
// even one is the word shifted up and the odd one the word masked: one
// instruction each, where widening a 16-bit value took two for the odd one
// (a PRMT to extract it, then the shift). The same bits either way.
template <typename acc_t, typename scalar_t, int VEC>
__device__ __forceinline__ acc_t acc_element(const Vec<scalar_t, VEC>& v, int k) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float> &&
                VEC % 2 == 0) {
    uint32_t word;  // (memcpy: no aliasing question; it compiles to nothing)
    memcpy(&word, &v.v[k - k % 2], sizeof(word));
    return __uint_as_float(k % 2 == 0 ? word << 16 : word & 0xffff0000u);
  } else {
    return static_cast<acc_t>(v.v[k]);
  }
}

// The widest vector (16 bytes) that divides the row length `cols` and whose
// alignment every pointer given has; 1 when none fits.
template <typename scalar_t>
int vector_width(int64_t cols, std::initializer_list<const void*> pointers) {
  int vec = 16 / static_cast<int>(sizeof(scalar_t));
  while (vec > 1) {
    bool ok = cols % vec == 0;
    for (const void* p : pointers) {
      if (p != nullptr && reinterpret_cast<uintptr_t>(p) % (vec * sizeof(scalar_t)) != 0) ok = false;
    }
    if (ok) break;
    vec /= 2;
  }
  return vec;
}

// Calls fn(std::integral_constant<int, VEC>) for the runtime width vec.
template <typename scalar_t, typename Fn>
void with_vector_width(int vec, const Fn& fn) {
  constexpr int kMax = 16 / sizeof(scalar_t);
  switch (vec) {
    case 8: if constexpr (kMax >= 8) { fn(std::integral_constant<int, 8>{}); return; } break;
    case 4: if constexpr (kMax >= 4) { fn(std::integral_constant<int, 4>{}); return; } break;
    case 2: fn(std::integral_constant<int, 2>{}); return;
    default: break;
  }
  fn(std::integral_constant<int, 1>{});
}

// Grid for an elementwise pass over `vectors` vectors: enough blocks to fill
// the GPU several times over, the loop inside covers the rest.
inline dim3 elementwise_grid(int64_t vectors, int threads) {
  const int64_t max_blocks =
      static_cast<int64_t>(multiprocessor_count()) * 16;
  return dim3(static_cast<unsigned>(std::min(ceil_div(vectors, threads), max_blocks)));
}

constexpr int kElementwiseThreads = 256;

// ---------------------------------------------------------------------------
// Deterministic column sums over rows.
//
// A [N, C] sum over rows runs in two kernels: the rows are cut into groups
// (a number that depends only on the shape: row_groups_for here, the
// LayerNorm backward's own backward_groups), each group writes its partial
// column sums to partials [groups, C] (acc_t), and sum_partials_kernel adds
// the partials of each column in group order.

// Rows per group at least 32, at most 256 groups.
inline int64_t row_groups_for(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, 32), 256));
}

// Tile of the column-sum sweep in gelu.cu: 32 columns (one per lane) by
// kPartialRows threads walking the rows.
constexpr int kPartialRows = 8;

// The column sums that `walkers` sets of a block's threads hold for the same
// columns, added in walker order and stored to out[0, width). Thread `thread`
// (of `threads`) of walker `walker` holds sums[s][k] for column
// (thread + s * threads) * VEC + k, for the rows that walker walked; columns
// at or past width are left out. scratch: walkers * width values of shared
// memory (unused with one walker). Every thread of the block calls it: with
// more than one walker it has barriers (and ends with one, so the scratch
// can be reused right away). The order (walker 0, then 1, ..) is fixed, so
// the same sums give the same bits.
template <typename acc_t, int SLOTS, int VEC>
__device__ __forceinline__ void store_column_sums(const acc_t (&sums)[SLOTS][VEC], int walker,
                                                  int walkers, int thread, int threads,
                                                  int64_t width, acc_t* scratch,
                                                  acc_t* __restrict__ out) {
  // One walker stores its sums; more write theirs to the scratch first.
  acc_t* dst = walkers == 1 ? out : scratch + walker * width;
#pragma unroll
  for (int s = 0; s < SLOTS; s++) {
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      const int64_t c = (thread + static_cast<int64_t>(s) * threads) * VEC + k;
      if (c < width) dst[c] = sums[s][k];
    }
  }
  if (walkers == 1) return;
  __syncthreads();
  const int block_threads = blockDim.x * blockDim.y;
  for (int64_t c = threadIdx.y * blockDim.x + threadIdx.x; c < width; c += block_threads) {
    acc_t total = scratch[c];
    for (int w = 1; w < walkers; w++) total += scratch[w * width + c];
    out[c] = total;
  }
  __syncthreads();
}

// outputs.out[j][c] = sum over g of partials[j, g, c], for the column sums j
// < grid y (at most kMaxSumOutputs) of partials [grid y, groups, C]: several
// column sums in one launch. A block takes 32 columns with kSumRows threads
// each: thread (c, r) adds groups r, r + kSumRows, .. in order, then the
// kSumRows sums of a column are added in r order. The order is fixed, so the
// same partials give the same bits. (Many threads a column: each has few
// loads to wait for, in one batch.)
constexpr int kSumRows = 32;
constexpr int kMaxSumOutputs = 4;

template <typename scalar_t>
struct SumOutputs {
  scalar_t* out[kMaxSumOutputs];  // [C] each
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(32 * kSumRows)
    sum_partials_kernel(const acc_t* __restrict__ partials, int64_t groups, int64_t C,
                        SumOutputs<scalar_t> outputs) {
  __shared__ acc_t sums[kSumRows][32];
  partials += blockIdx.y * groups * C;
  // out[blockIdx.y] by selects: indexing the argument copied it to the stack.
  scalar_t* __restrict__ out = outputs.out[0];
#pragma unroll
  for (int j = 1; j < kMaxSumOutputs; j++) {
    if (blockIdx.y == j) out = outputs.out[j];
  }
  const int64_t c = blockIdx.x * 32 + threadIdx.x;
  acc_t sum = 0;
  if (c < C) {
    for (int64_t g = threadIdx.y; g < groups; g += kSumRows) sum += partials[g * C + c];
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t total = 0;
#pragma unroll
    for (int r = 0; r < kSumRows; r++) total += sums[r][threadIdx.x];
    out[c] = static_cast<scalar_t>(total);
  }
}

// Sums partials [COUNT, groups, C] over the groups into outputs (COUNT
// pointers to [C], e.g. {grad_weight, grad_bias}), in one launch.
template <typename scalar_t, typename acc_t, int COUNT>
void launch_sum_partials(const acc_t* partials, int64_t groups, int64_t C,
                         scalar_t* const (&outputs)[COUNT], cudaStream_t stream) {
  static_assert(COUNT <= kMaxSumOutputs, "more column sums than SumOutputs holds");
  if (C == 0) return;
  SumOutputs<scalar_t> out{};
  for (int j = 0; j < COUNT; j++) out.out[j] = outputs[j];
  const dim3 grid(static_cast<unsigned>(ceil_div(C, 32)), COUNT);
  sum_partials_kernel<scalar_t, acc_t>
      <<<grid, dim3(32, kSumRows), 0, stream>>>(partials, groups, C, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// Dropout (kernel_api.h has the contract). A launcher turns the kernel's
// Dropout into DropoutArgs, passed to the kernel by value as its last
// argument, and picks the kernel's compile-time DROPOUT flag with
// with_dropout: the DROPOUT = false instantiation is the plain kernel, which
// never reads the arguments. With DROPOUT, the kernel makes a DeviceMask,
// which reads rng = (seed, offset) from device memory (never from the host,
// so a CUDA graph replay reads that replay's draw), and asks it which
// elements are kept.

struct DropoutArgs {
  const int64_t* rng = nullptr;  // (seed, offset), on the device; null without dropout
  uint64_t which = 0;            // kDropout* (kernels.h)
  double p = 0;
  double scale = 1;  // 1 / (1 - p), the kept elements' multiplier
};

inline DropoutArgs dropout_args(const Dropout& d) {
  if (!d.active()) return DropoutArgs{};
  return DropoutArgs{d.rng.const_data_ptr<int64_t>(), static_cast<uint64_t>(d.which), d.p,
                     1.0 / (1.0 - d.p)};
}

// Calls fn(std::bool_constant<DROPOUT>), DROPOUT = whether d drops anything.
template <typename Fn>
void with_dropout(const DropoutArgs& d, const Fn& fn) {
  if (d.rng != nullptr) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// One dropout's mask inside a kernel: philox.h's DropoutBits under the
// (seed, offset) read from rng, for `which`.
class DeviceMask {
 public:
  // Reads rng when `active` (a kernel passes its DROPOUT flag); an inactive
  // mask reads nothing and must not be asked.
  __device__ DeviceMask(const DropoutArgs& d, bool active)
      : bits_(active ? static_cast<uint64_t>(d.rng[0]) : 0,
              active ? static_cast<uint64_t>(d.rng[1]) : 0, d.which, d.p) {}

  // Whether elements index .. index + N - 1 are kept: one Philox call per
  // group of four elements that they touch (philox.h, DropoutBits).
  template <int N>
  __device__ __forceinline__ void kept(uint64_t index, bool (&keep)[N]) const {
    uint64_t group = index / 4;
    Philox4 words = bits_.group(group);
#pragma unroll
    for (int k = 0; k < N; k++) {
      const uint64_t i = index + k;
      if (i / 4 != group) {
        group = i / 4;
        words = bits_.group(group);
      }
      const uint32_t lane = static_cast<uint32_t>(i % 4);  // a select, not an indexed load
      const uint32_t word = lane == 0 ? words.w[0]
                            : lane == 1 ? words.w[1]
                            : lane == 2 ? words.w[2]
                                        : words.w[3];
      keep[k] = bits_.keep(word);
    }
  }

  __device__ __forceinline__ bool kept(uint64_t index) const {
    bool keep[1];
    kept(index, keep);
    return keep[0];
  }

 private:
  DropoutBits bits_;
};

// The mask index of attention probability (query, key) of head bh = b *
// n_head + h (kernel_api.h): ((b * n_head + h) * T + query) * T + key.
__device__ __forceinline__ uint64_t probability_index(int bh, int T, int query, int key) {
  return (static_cast<uint64_t>(bh) * T + static_cast<uint64_t>(query)) * T +
         static_cast<uint64_t>(key);
}

// Dynamic shared memory above the default 48 KB must be asked for per kernel.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

}  // namespace nanoblock::cuda
