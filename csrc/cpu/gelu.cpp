// The MLP's elementwise parts on the CPU: the c_fc bias add fused with GELU,
// its backward, and the gradient of a Linear bias.
//
//   forward:   out = gelu(x + bias)                      x [N, F], bias [F]
//   backward:  grad_x = grad_out * gelu'(x + bias)
//   bias_grad: grad [N, F] summed over rows -> [F], in a fixed order
//
// GELU is exact, 0.5 u (1 + erf(u / sqrt 2)), as nanoGPT's nn.GELU(), or the
// tanh form of GPT-2, 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))).
// Keeping the bias add here lets c_fc run as a plain GEMM and saves one pass
// over the [N, 4C] activation. float32 uses the vectorizable exp/erfc of
// vector_math.h (relative error ~2e-7, a couple of float32 ulps); float64
// uses libm.
#include "../kernels.h"
#include "bfloat16.h"
#include "row_blocks.h"
#include "vector_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace nanoblock::cpu {

namespace {

constexpr double kSqrtHalf = 0.70710678118654752440;       // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;     // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;    // sqrt(2 / pi)
constexpr double kCubic = 0.044715;

// Per element: GELU and its derivative, exact and tanh forms. The float
// versions use vector_math.h (vectorizable); the double ones libm.
// Exact: gelu(u) = u Phi(u), Phi(u) = erfc(-u / sqrt 2) / 2, written with
// erfc of |u| so that neither tail cancels.
// Tanh: 0.5 u (1 + tanh(y)) = u sigmoid(2y), y = sqrt(2/pi) (u + 0.044715 u^3).
NANOBLOCK_INLINE float normal_cdf(float u) {
  const float e = erfc_nonneg_float((u < 0 ? -u : u) * float(kSqrtHalf));
  return u < 0 ? 0.5f * e : 1.0f - 0.5f * e;
}
inline double normal_cdf(double u) { return 0.5 * std::erfc(-u * kSqrtHalf); }
NANOBLOCK_INLINE float normal_pdf(float u) { return float(kInvSqrt2Pi) * exp_float(-0.5f * u * u); }
inline double normal_pdf(double u) { return kInvSqrt2Pi * std::exp(-0.5 * u * u); }
NANOBLOCK_INLINE float exp_of(float v) { return exp_float(v); }
inline double exp_of(double v) { return std::exp(v); }
template <typename T>
NANOBLOCK_INLINE T sigmoid(T v) { return T(1) / (T(1) + exp_of(-v)); }

template <typename T>
NANOBLOCK_INLINE T tanh_arg(T u) { return T(kSqrt2OverPi) * (u + T(kCubic) * u * u * u); }

template <bool kTanh, typename T>
NANOBLOCK_INLINE T gelu(T u) {
  return kTanh ? u * sigmoid(T(2) * tanh_arg(u)) : u * normal_cdf(u);
}

template <bool kTanh, typename T>
NANOBLOCK_INLINE T gelu_grad(T u) {
  if constexpr (!kTanh) {
    return normal_cdf(u) + u * normal_pdf(u);
  } else {
    // With v = 2y and e = exp(-|v|): sigmoid(v) and its slope
    // sigmoid(v) (1 - sigmoid(v)) = e / (1 + e)^2, written so that neither
    // forms 1 - s for s near 1 (which loses all digits for large |u|).
    const T v = T(2) * tanh_arg(u);
    const T e = exp_of(v < 0 ? v : -v);
    const T r = T(1) / (T(1) + e);
    const T s = v < 0 ? e * r : r;
    const T darg = T(kSqrt2OverPi) * (T(1) + T(3 * kCubic) * u * u);
    return s + u * T(2) * e * r * r * darg;
  }
}

// The loops over rows [begin, end) of x [N, F], with bias [F] (zeros when
// the layer has none): branch-free inner loops, so they vectorize.
template <bool kTanh, typename T>
NANOBLOCK_INLINE void gelu_forward_rows(const T* x, const T* bias, T* out, int64_t begin, int64_t end, int64_t F) {
  for (int64_t row = begin; row < end; row++) {
    const T* in = x + row * F;
    T* o = out + row * F;
    for (int64_t f = 0; f < F; f++) o[f] = gelu<kTanh>(in[f] + bias[f]);
  }
}

template <bool kTanh, typename T>
NANOBLOCK_INLINE void gelu_backward_rows(const T* dy, const T* x, const T* bias, T* dx, int64_t begin, int64_t end,
                        int64_t F) {
  for (int64_t row = begin; row < end; row++) {
    const T* in = x + row * F;
    const T* g = dy + row * F;
    T* d = dx + row * F;
    for (int64_t f = 0; f < F; f++) d[f] = g[f] * gelu_grad<kTanh>(in[f] + bias[f]);
  }
}

// One entry per dtype; the float one is compiled for AVX2 too (vector_math.h).
NANOBLOCK_VECTORIZE void gelu_forward_rows(const float* x, const float* bias, float* out,
                                           int64_t begin, int64_t end, int64_t F, bool tanh) {
  tanh ? gelu_forward_rows<true>(x, bias, out, begin, end, F)
       : gelu_forward_rows<false>(x, bias, out, begin, end, F);
}

void gelu_forward_rows(const double* x, const double* bias, double* out, int64_t begin,
                       int64_t end, int64_t F, bool tanh) {
  tanh ? gelu_forward_rows<true>(x, bias, out, begin, end, F)
       : gelu_forward_rows<false>(x, bias, out, begin, end, F);
}

NANOBLOCK_VECTORIZE void gelu_backward_rows(const float* dy, const float* x, const float* bias,
                                            float* dx, int64_t begin, int64_t end, int64_t F,
                                            bool tanh) {
  tanh ? gelu_backward_rows<true>(dy, x, bias, dx, begin, end, F)
       : gelu_backward_rows<false>(dy, x, bias, dx, begin, end, F);
}

void gelu_backward_rows(const double* dy, const double* x, const double* bias, double* dx,
                        int64_t begin, int64_t end, int64_t F, bool tanh) {
  tanh ? gelu_backward_rows<true>(dy, x, bias, dx, begin, end, F)
       : gelu_backward_rows<false>(dy, x, bias, dx, begin, end, F);
}

// Runs fn(begin, end) over the rows of a [N, F] tensor, in parallel chunks
// of about 32K elements.
template <typename Fn>
void for_each_row_chunk(int64_t N, int64_t F, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(F, 1));
  at::parallel_for(0, N, grain, fn);
}

}  // namespace

Tensor gelu_forward(const Tensor& x, const Tensor& bias, bool tanh) {
  if (is_bf16(x)) return to_bf16(gelu_forward(to_float(x), to_float(bias), tanh));
  Tensor out = at::empty_like(x);
  const int64_t F = x.size(-1), N = F == 0 ? 0 : x.numel() / F;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gelu_forward", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const Tensor b = bias.defined() ? bias : at::zeros({F}, x.options());
    const scalar_t* b_ptr = b.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    for_each_row_chunk(N, F, [&](int64_t begin, int64_t end) {
      gelu_forward_rows(x_ptr, b_ptr, out_ptr, begin, end, F, tanh);
    });
  });
  return out;
}

Tensor gelu_backward(const Tensor& grad_out, const Tensor& x, const Tensor& bias, bool tanh) {
  if (is_bf16(x)) {
    return to_bf16(gelu_backward(to_float(grad_out), to_float(x), to_float(bias), tanh));
  }
  Tensor grad_x = at::empty_like(x);
  const int64_t F = x.size(-1), N = F == 0 ? 0 : x.numel() / F;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gelu_backward", [&] {
    const scalar_t* dy_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const Tensor b = bias.defined() ? bias : at::zeros({F}, x.options());
    const scalar_t* b_ptr = b.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    for_each_row_chunk(N, F, [&](int64_t begin, int64_t end) {
      gelu_backward_rows(dy_ptr, x_ptr, b_ptr, dx_ptr, begin, end, F, tanh);
    });
  });
  return grad_x;
}

Tensor bias_grad(const Tensor& grad) {
  if (is_bf16(grad)) return to_bf16(bias_grad(to_float(grad)));
  const int64_t F = grad.size(-1), N = F == 0 ? 0 : grad.numel() / F;
  Tensor out = at::empty({F}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "bias_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
    const RowBlocks blocks(N);
    std::vector<acc_t> partials(blocks.count * F, acc_t(0));  // [blocks, F]
    at::parallel_for(0, blocks.count, 1, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t block = block_begin; block < block_end; block++) {
        acc_t* part = partials.data() + block * F;
        for (int64_t row = blocks.begin(block, N); row < blocks.end(block, N); row++) {
          const scalar_t* g = g_ptr + row * F;
          for (int64_t f = 0; f < F; f++) part[f] += static_cast<acc_t>(g[f]);
        }
      }
    });
    sum_partials(partials.data(), blocks.count, F, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// On the CPU the three parts run as their own passes (each already
// parallel and vectorized); the result is the same as one fused pass.
std::tuple<Tensor, Tensor> gelu_backward_recompute(const Tensor& grad_out, const Tensor& x,
                                                   const Tensor& bias, bool tanh) {
  Tensor out = gelu_forward(x, bias, tanh);
  grad_out.copy_(gelu_backward(grad_out, x, bias, tanh));
  return {out, bias_grad(grad_out)};
}

}  // namespace nanoblock::cpu
