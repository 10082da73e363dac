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
// over the [N, 4C] activation. Math is done in the opmath type (float32 for
// float32, float64 for float64).
#include "../kernels.h"
#include "row_blocks.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <vector>

namespace nanoblock::cpu {

namespace {

template <typename T>
struct GeluMath {
  static constexpr T kAlpha = T(0.70710678118654752440);      // 1 / sqrt(2)
  static constexpr T kBeta = T(0.39894228040143267794);       // 1 / sqrt(2 pi)
  static constexpr T kTanhScale = T(0.79788456080286535588);  // sqrt(2 / pi)
  static constexpr T kCubic = T(0.044715);

  static T exact(T u) { return T(0.5) * u * (T(1) + std::erf(u * kAlpha)); }
  static T exact_grad(T u) {
    return T(0.5) * (T(1) + std::erf(u * kAlpha)) + u * kBeta * std::exp(T(-0.5) * u * u);
  }
  static T tanh(T u) {
    return T(0.5) * u * (T(1) + std::tanh(kTanhScale * (u + kCubic * u * u * u)));
  }
  static T tanh_grad(T u) {
    const T t = std::tanh(kTanhScale * (u + kCubic * u * u * u));
    const T inner_grad = kTanhScale * (T(1) + T(3) * kCubic * u * u);
    return T(0.5) * (T(1) + t) + T(0.5) * u * (T(1) - t * t) * inner_grad;
  }
};

// Runs fn(begin, end) over the rows of a [N, F] tensor, in parallel chunks
// of about 32K elements.
template <typename Fn>
void for_each_row_chunk(int64_t N, int64_t F, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(F, 1));
  at::parallel_for(0, N, grain, fn);
}

}  // namespace

Tensor gelu_forward(const Tensor& x, const Tensor& bias, bool tanh) {
  Tensor out = at::empty_like(x);
  const int64_t F = x.size(-1), N = F == 0 ? 0 : x.numel() / F;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gelu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    for_each_row_chunk(N, F, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; row++) {
        const scalar_t* in = x_ptr + row * F;
        scalar_t* o = out_ptr + row * F;
        for (int64_t f = 0; f < F; f++) {
          const acc_t u = static_cast<acc_t>(in[f]) + (b_ptr ? static_cast<acc_t>(b_ptr[f]) : 0);
          o[f] = static_cast<scalar_t>(tanh ? GeluMath<acc_t>::tanh(u) : GeluMath<acc_t>::exact(u));
        }
      }
    });
  });
  return out;
}

Tensor gelu_backward(const Tensor& grad_out, const Tensor& x, const Tensor& bias, bool tanh) {
  Tensor grad_x = at::empty_like(x);
  const int64_t F = x.size(-1), N = F == 0 ? 0 : x.numel() / F;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gelu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    for_each_row_chunk(N, F, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; row++) {
        const scalar_t* in = x_ptr + row * F;
        const scalar_t* dy = dy_ptr + row * F;
        scalar_t* dx = dx_ptr + row * F;
        for (int64_t f = 0; f < F; f++) {
          const acc_t u = static_cast<acc_t>(in[f]) + (b_ptr ? static_cast<acc_t>(b_ptr[f]) : 0);
          const acc_t d = tanh ? GeluMath<acc_t>::tanh_grad(u) : GeluMath<acc_t>::exact_grad(u);
          dx[f] = static_cast<scalar_t>(static_cast<acc_t>(dy[f]) * d);
        }
      }
    });
  });
  return grad_x;
}

Tensor bias_grad(const Tensor& grad) {
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

}  // namespace nanoblock::cpu
