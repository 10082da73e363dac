// The MLP's elementwise parts on CUDA: the c_fc bias add fused with GELU, its
// backward, and the gradient of a Linear bias.
//
//   forward:   out = gelu(x + bias)                  x [N, F], bias [F] or none
//   backward:  grad_x = grad_out * gelu'(x + bias)   -> [N, F]
//   bias_grad: grad [N, F] summed over rows          -> [F], fixed order
//   backward_recompute: the Block's pass, all in one sweep over the rows:
//              grad_x (over grad_out), gelu(x + bias) again, and the bias
//              gradient
//
// GELU is exact, 0.5 u (1 + erf(u / sqrt 2)) (nanoGPT's nn.GELU()), or the
// tanh form of GPT-2, 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))). The
// math runs in acc_t (float32, float64 for float64). For float32 and float64
// it is GeluMath: the accurate erf, exp and tanh, the same formulas as
// PyTorch's GELU kernels and the CPU ones. For float16 and bfloat16 it is
// Gelu16Math: an erfc of one exponential, one reciprocal and a polynomial
// (relative error 1.2e-7, far below the 2^-11 and 2^-8 of a 16-bit result)
// and a tanh form of one exponential and one reciprocal. With the accurate
// functions the 16-bit kernels were bound by arithmetic more than by memory
// (ncu, H200 at locked clocks, session 7: the [16384, 3072] GELU forward at
// 79% of SM throughput, 41% of DRAM's); with Gelu16Math that forward took
// 0.068 ms instead of 0.082, forward+backward 0.177 instead of 0.204 (H200,
// same build, session 8: benchmarks/results/nvidia-h200/session8/).
// The elementwise kernels walk the tensor in 16-byte vectors where the row
// length and pointers allow (a vector never crosses a row, so its bias slice
// is contiguous too). The column sums (bias gradients) are deterministic:
// rows are cut into fixed groups, each group's partial sums are written, and
// a second kernel adds them in group order (common.cuh).
#include <type_traits>

#include "common.cuh"

namespace nanoblock::cuda {

namespace {

template <typename T>
struct GeluMath {
  static constexpr T kAlpha = T(0.70710678118654752440);      // 1 / sqrt(2)
  static constexpr T kBeta = T(0.39894228040143267794);       // 1 / sqrt(2 pi)
  static constexpr T kTanhScale = T(0.79788456080286535588);  // sqrt(2 / pi)
  static constexpr T kCubic = T(0.044715);

  __device__ static T exact(T u) { return T(0.5) * u * (T(1) + erf_acc(u * kAlpha)); }
  __device__ static T exact_grad(T u) {
    return T(0.5) * (T(1) + erf_acc(u * kAlpha)) + u * kBeta * exp_acc(T(-0.5) * u * u);
  }
  __device__ static T tanh(T u) {
    return T(0.5) * u * (T(1) + tanh_acc(kTanhScale * (u + kCubic * u * u * u)));
  }
  __device__ static T tanh_grad(T u) {
    const T t = tanh_acc(kTanhScale * (u + kCubic * u * u * u));
    const T inner_grad = kTanhScale * (T(1) + T(3) * kCubic * u * u);
    return T(0.5) * (T(1) + t) + T(0.5) * u * (T(1) - t * t) * inner_grad;
  }
};

// GELU for 16-bit results, in float (see the header).
//   erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z >= 0, P of degree 9:
//        the Chebyshev fit of Numerical Recipes (2nd ed., 6.2, erfcc), with a
//        relative error below 1.2e-7 everywhere, the far tails too. With z =
//        |u| / sqrt 2, Phi(-|u|) = erfc(z) / 2.
//   tanh: gelu(u) = u (1 + tanh(y)) / 2 = u / (1 + exp(-2 y)), which keeps
//        its relative accuracy in the left tail (1 + tanh(y) in float does
//        not); exp(-2 y) = inf gives 0, exp(-2 y) = 0 gives u.
// exp2_approx and reciprocal_approx (common.cuh) are the hardware's
// approximations (a few ulp of float, some more for large arguments of the
// exponential; subnormals flushed): far below a 16-bit rounding.
struct Gelu16Math {
  static constexpr float kAlpha = GeluMath<float>::kAlpha;  // GeluMath's constants, in float
  static constexpr float kBeta = GeluMath<float>::kBeta;
  static constexpr float kTanhScale = GeluMath<float>::kTanhScale;
  static constexpr float kCubic = GeluMath<float>::kCubic;

  // Phi(u), the standard normal CDF.
  __device__ static float cdf(float u) {
    const float z = fabsf(u) * kAlpha;
    const float t = reciprocal_approx(fmaf(0.5f, z, 1.f));
    constexpr float kP[10] = {0.17087277f,  -0.82215223f, 1.48851587f, -1.13520398f,
                              0.27886807f,  -0.18628806f, 0.09678418f, 0.37409196f,
                              1.00002368f,  -1.26551223f};  // highest power first
    float p = kP[0];
#pragma unroll
    for (int i = 1; i < 10; i++) p = fmaf(p, t, kP[i]);
    const float lower_tail = 0.5f * t * exp2_approx(fmaf(-z, z, p) * kLog2e);  // Phi(-|u|)
    return u >= 0.f ? 1.f - lower_tail : lower_tail;
  }
  __device__ static float exact(float u) { return u * cdf(u); }
  __device__ static float exact_grad(float u) {
    return fmaf(u * kBeta, exp2_approx(u * u * (-0.5f * kLog2e)), cdf(u));
  }
  // (1 + tanh(y)) / 2 = 1 / (1 + exp(-2 y)), y = sqrt(2/pi) (u + 0.044715 u^3):
  // no cancellation where tanh(y) is near -1 (the left tail).
  __device__ static float tanh_half(float u) {
    const float y = kTanhScale * fmaf(kCubic * u, u * u, u);
    return reciprocal_approx(1.f + exp2_approx(y * (-2.f * kLog2e)));
  }
  __device__ static float tanh(float u) { return u * tanh_half(u); }
  // d/du u s = s + u s' with s' = 2 s (1 - s) dy/du
  __device__ static float tanh_grad(float u) {
    const float s = tanh_half(u);
    const float inner_grad = kTanhScale * fmaf(3.f * kCubic * u, u, 1.f);
    return fmaf(2.f * u * s * (1.f - s), inner_grad, s);
  }
};

// The GELU math of scalar_t's kernels (see the header).
template <typename scalar_t>
using GeluMathFor = std::conditional_t<sizeof(scalar_t) == 2, Gelu16Math,
                                       GeluMath<acc_type<scalar_t>>>;

// out = gelu(x + bias) over `vectors` vectors of VEC elements; rows are F long.
template <typename scalar_t, int VEC, bool TANH>
__global__ void gelu_forward_kernel(const scalar_t* __restrict__ x,
                                    const scalar_t* __restrict__ bias,
                                    scalar_t* __restrict__ out, int64_t vectors, int64_t F) {
  using acc_t = acc_type<scalar_t>;
  using Math = GeluMathFor<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t offset = i * VEC;
    const V a = load_vec<scalar_t, VEC>(x + offset);
    V b;
    if (bias != nullptr) b = load_vec<scalar_t, VEC>(bias + offset % F);
    V y;
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      acc_t u = acc_element<acc_t>(a, k);
      if (bias != nullptr) u += acc_element<acc_t>(b, k);
      y.v[k] = static_cast<scalar_t>(TANH ? Math::tanh(u) : Math::exact(u));
    }
    store_vec<scalar_t, VEC>(out + offset, y);
  }
}

// grad_x = grad_out * gelu'(x + bias), same layout as the forward.
template <typename scalar_t, int VEC, bool TANH>
__global__ void gelu_backward_kernel(const scalar_t* __restrict__ grad_out,
                                     const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ bias,
                                     scalar_t* __restrict__ grad_x, int64_t vectors, int64_t F) {
  using acc_t = acc_type<scalar_t>;
  using Math = GeluMathFor<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t offset = i * VEC;
    const V a = load_vec<scalar_t, VEC>(x + offset);
    const V d = load_vec<scalar_t, VEC>(grad_out + offset);
    V b;
    if (bias != nullptr) b = load_vec<scalar_t, VEC>(bias + offset % F);
    V y;
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      acc_t u = static_cast<acc_t>(a.v[k]);
      if (bias != nullptr) u += static_cast<acc_t>(b.v[k]);
      const acc_t g = TANH ? Math::tanh_grad(u) : Math::exact_grad(u);
      y.v[k] = static_cast<scalar_t>(static_cast<acc_t>(d.v[k]) * g);
    }
    store_vec<scalar_t, VEC>(grad_x + offset, y);
  }
}

// A sweep over the rows of [N, F] that also sums columns: grid (column tiles
// of 32 * VEC, row groups), block (32, kPartialRows). Thread (lane, r) takes
// the VEC columns at (tile * 32 + lane) * VEC of rows r, r + kPartialRows, ..
// of its group. For each row, row_op.load(offset) reads the row's values and
// row_op.apply(loaded, offset, column, sums) does the elementwise work and
// adds VEC values to sums; then the kPartialRows sums of each column are
// added in r order into partials [groups, F] (store_column_sums).
// kRowsPerStep rows' loads are issued before any of their math: with one
// row's loads in flight a thread, the GELU backward at [16384, 3072] was
// bound by latency, not bandwidth (ncu, H200, session 12: 45% of DRAM's
// throughput and 39% of the SMs', 178 us). A thread still adds its rows in
// row order, so the sums, and their bits, are unchanged. Measured on an
// H200 (bfloat16, session 12, same-call A/Bs): one row 176 us, two rows at
// four blocks an SM (64 registers) 118 us, four rows at three blocks (80
// registers; 16 bytes spill in one of the two GELU kernels) 106 us.
constexpr int kRowsPerStep = 4;
// Blocks an SM the registers must leave room for: three (80 registers a
// thread); two for float64, whose rows need more.
template <typename scalar_t>
constexpr int kColumnSumBlocksPerSM = sizeof(scalar_t) == 8 ? 2 : 3;

template <typename scalar_t, int VEC, typename RowOp>
__global__ void __launch_bounds__(32 * kPartialRows, kColumnSumBlocksPerSM<scalar_t>)
    rows_with_column_sums_kernel(int64_t N, int64_t F, int64_t rows_per_group, RowOp row_op,
                                 acc_type<scalar_t>* __restrict__ partials) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t scratch[kPartialRows * 32 * VEC];
  const int64_t tile_begin = blockIdx.x * 32 * static_cast<int64_t>(VEC);
  const int64_t column = tile_begin + threadIdx.x * VEC;
  const int64_t group = blockIdx.y;
  const int64_t row_end = std::min(N, (group + 1) * rows_per_group);
  acc_t sums[1][VEC] = {};
  if (column < F) {
    int64_t row = group * rows_per_group + threadIdx.y;
    constexpr int64_t kStep = static_cast<int64_t>(kRowsPerStep) * kPartialRows;
    for (; row + (kRowsPerStep - 1) * kPartialRows < row_end; row += kStep) {
      typename RowOp::Loaded loaded[kRowsPerStep];
#pragma unroll
      for (int i = 0; i < kRowsPerStep; i++) {
        loaded[i] = row_op.load((row + i * kPartialRows) * F + column);
      }
#pragma unroll
      for (int i = 0; i < kRowsPerStep; i++) {
        row_op.apply(loaded[i], (row + i * kPartialRows) * F + column, column, sums[0]);
      }
    }
    for (; row < row_end; row += kPartialRows) {  // the group's last rows, fewer than a step
      row_op.apply(row_op.load(row * F + column), row * F + column, column, sums[0]);
    }
  }
  store_column_sums<acc_t, 1, VEC>(sums, threadIdx.y, kPartialRows, threadIdx.x, 32,
                                   std::min<int64_t>(32 * VEC, F - tile_begin), scratch,
                                   partials + group * F + tile_begin);
}

// Row op of bias_grad: sums += grad.
template <typename scalar_t, int VEC>
struct SumRowOp {
  using Loaded = Vec<scalar_t, VEC>;
  const scalar_t* grad;
  __device__ Loaded load(int64_t offset) const { return load_vec<scalar_t, VEC>(grad + offset); }
  __device__ void apply(const Loaded& g, int64_t, int64_t, acc_type<scalar_t> (&sums)[VEC]) const {
#pragma unroll
    for (int k = 0; k < VEC; k++) sums[k] += static_cast<acc_type<scalar_t>>(g.v[k]);
  }
};

// Row op of backward_recompute: reads dL/dgelu from grad, writes dL/dx over
// it and gelu(x + bias) to out; sums += dL/dx (as rounded, what grad_x holds).
template <typename scalar_t, int VEC, bool TANH>
struct GeluBackwardRecomputeRowOp {
  using V = Vec<scalar_t, VEC>;
  struct Loaded {  // (the bias is read in apply: one slice for all the rows, out of L1)
    V x, d;
  };
  scalar_t* grad;
  const scalar_t* x;
  const scalar_t* bias;
  scalar_t* out;
  __device__ Loaded load(int64_t offset) const {
    Loaded l;
    l.x = load_vec<scalar_t, VEC>(x + offset);
    l.d = load_vec<scalar_t, VEC>(grad + offset);
    return l;
  }
  __device__ void apply(const Loaded& l, int64_t offset, int64_t column,
                        acc_type<scalar_t> (&sums)[VEC]) const {
    using acc_t = acc_type<scalar_t>;
    using Math = GeluMathFor<scalar_t>;
    V b, dx, y;
    if (bias != nullptr) b = load_vec<scalar_t, VEC>(bias + column);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      acc_t u = static_cast<acc_t>(l.x.v[k]);
      if (bias != nullptr) u += static_cast<acc_t>(b.v[k]);
      y.v[k] = static_cast<scalar_t>(TANH ? Math::tanh(u) : Math::exact(u));
      const acc_t g = TANH ? Math::tanh_grad(u) : Math::exact_grad(u);
      dx.v[k] = static_cast<scalar_t>(static_cast<acc_t>(l.d.v[k]) * g);
      sums[k] += static_cast<acc_t>(dx.v[k]);
    }
    store_vec<scalar_t, VEC>(grad + offset, dx);
    store_vec<scalar_t, VEC>(out + offset, y);
  }
};

// Runs rows_with_column_sums_kernel over [N, F] with the row op that
// make_op(std::integral_constant<int, VEC>) returns, and sums the partials
// into column_sums [F].
template <typename scalar_t, typename MakeOp>
void launch_rows_with_column_sums(int64_t N, int64_t F, int vec, const MakeOp& make_op,
                                  const Tensor& column_sums) {
  using acc_t = acc_type<scalar_t>;
  const cudaStream_t stream = current_stream();
  const int64_t groups = row_groups_for(N);
  const int64_t rows_per_group = ceil_div(N, groups);
  Tensor partials = at::empty(
      {groups, F}, column_sums.options().dtype(stats_dtype(column_sums.scalar_type())));
  acc_t* partials_ptr = partials.mutable_data_ptr<acc_t>();
  with_vector_width<scalar_t>(vec, [&](auto vec_constant) {
    constexpr int VEC = decltype(vec_constant)::value;
    const dim3 grid(static_cast<unsigned>(ceil_div(F, 32 * VEC)), static_cast<unsigned>(groups));
    rows_with_column_sums_kernel<scalar_t, VEC><<<grid, dim3(32, kPartialRows), 0, stream>>>(
        N, F, rows_per_group, make_op(vec_constant), partials_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_sum_partials<scalar_t, acc_t>(partials_ptr, groups, F,
                                       {column_sums.mutable_data_ptr<scalar_t>()}, stream);
}

}  // namespace

Tensor gelu_forward(const Tensor& x, const Tensor& bias, bool tanh) {
  Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t F = x.size(-1);
  const cudaStream_t stream = current_stream();
  NANOBLOCK_DISPATCH(x.scalar_type(), "gelu_forward", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    const int vec = vector_width<scalar_t>(F, {x_ptr, b_ptr, out_ptr});
    with_vector_width<scalar_t>(vec, [&](auto vec_constant) {
      constexpr int VEC = decltype(vec_constant)::value;
      const int64_t vectors = x.numel() / VEC;
      const dim3 grid = elementwise_grid(vectors, kElementwiseThreads);
      if (tanh) {
        gelu_forward_kernel<scalar_t, VEC, true>
            <<<grid, kElementwiseThreads, 0, stream>>>(x_ptr, b_ptr, out_ptr, vectors, F);
      } else {
        gelu_forward_kernel<scalar_t, VEC, false>
            <<<grid, kElementwiseThreads, 0, stream>>>(x_ptr, b_ptr, out_ptr, vectors, F);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

Tensor gelu_backward(const Tensor& grad_out, const Tensor& x, const Tensor& bias, bool tanh) {
  Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return grad_x;
  const int64_t F = x.size(-1);
  const cudaStream_t stream = current_stream();
  NANOBLOCK_DISPATCH(x.scalar_type(), "gelu_backward", [&] {
    const scalar_t* dy_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    const int vec = vector_width<scalar_t>(F, {dy_ptr, x_ptr, b_ptr, dx_ptr});
    with_vector_width<scalar_t>(vec, [&](auto vec_constant) {
      constexpr int VEC = decltype(vec_constant)::value;
      const int64_t vectors = x.numel() / VEC;
      const dim3 grid = elementwise_grid(vectors, kElementwiseThreads);
      if (tanh) {
        gelu_backward_kernel<scalar_t, VEC, true><<<grid, kElementwiseThreads, 0, stream>>>(
            dy_ptr, x_ptr, b_ptr, dx_ptr, vectors, F);
      } else {
        gelu_backward_kernel<scalar_t, VEC, false><<<grid, kElementwiseThreads, 0, stream>>>(
            dy_ptr, x_ptr, b_ptr, dx_ptr, vectors, F);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_x;
}

Tensor bias_grad(const Tensor& grad) {
  const int64_t F = grad.size(-1), N = F == 0 ? 0 : grad.numel() / F;
  if (N == 0) return at::zeros({F}, grad.options());  // a sum over no rows
  Tensor out = at::empty({F}, grad.options());
  NANOBLOCK_DISPATCH(grad.scalar_type(), "bias_grad", [&] {
    const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
    launch_rows_with_column_sums<scalar_t>(
        N, F, vector_width<scalar_t>(F, {grad_ptr}),
        [&](auto vec_constant) {
          return SumRowOp<scalar_t, decltype(vec_constant)::value>{grad_ptr};
        },
        out);
  });
  return out;
}

std::tuple<Tensor, Tensor> gelu_backward_recompute(const Tensor& grad_out, const Tensor& x,
                                                   const Tensor& bias, bool tanh) {
  Tensor out = at::empty_like(x);
  const int64_t F = x.size(-1), N = F == 0 ? 0 : x.numel() / F;
  Tensor grad_bias = at::empty({F}, x.options());
  if (N == 0) return {out, grad_bias.zero_()};  // a sum over no rows
  NANOBLOCK_DISPATCH(x.scalar_type(), "gelu_backward_recompute", [&] {
    scalar_t* grad_ptr = grad_out.mutable_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    const int vec = vector_width<scalar_t>(F, {grad_ptr, x_ptr, b_ptr, out_ptr});
    const auto make_op = [&](auto vec_constant, auto tanh_constant) {
      return GeluBackwardRecomputeRowOp<scalar_t, decltype(vec_constant)::value,
                                        decltype(tanh_constant)::value>{grad_ptr, x_ptr, b_ptr,
                                                                        out_ptr};
    };
    if (tanh) {
      launch_rows_with_column_sums<scalar_t>(
          N, F, vec, [&](auto v) { return make_op(v, std::true_type{}); }, grad_bias);
    } else {
      launch_rows_with_column_sums<scalar_t>(
          N, F, vec, [&](auto v) { return make_op(v, std::false_type{}); }, grad_bias);
    }
  });
  return {out, grad_bias};
}

}  // namespace nanoblock::cuda
