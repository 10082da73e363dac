// LayerNorm over the last dim on the CPU, forward and backward, with the
// residual add of the Block fused in front of it.
//
//   forward:      out = (x - mean) * rstd * weight + bias
//                 mean, rstd = mean and 1 / sqrt(var + eps) of each row
//   add forward:  sum = x + residual, then the forward above on sum
//   backward:     xhat = (x - mean) * rstd, g = grad_out * weight
//                 grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))
//                          (+ grad_residual, the gradient that reaches x
//                          through the residual branch)
//                 grad_weight = sum over rows of grad_out * xhat
//                 grad_bias   = sum over rows of grad_out
//
// Rows [N, C] are independent and run in parallel. The mean and variance take
// two passes over the row (which is in cache) for accuracy; statistics are
// accumulated in float32 (float64 for float64 input). Weight and bias
// gradients are reduced in a fixed order (row_blocks.h).
#include "../kernels.h"
#include "row_blocks.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <vector>

namespace nanoblock::cpu {

namespace {

// Normalizes one row of C values: writes out and returns mean and rstd.
template <typename scalar_t, typename acc_t>
void normalize_row(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, int64_t C,
                   double eps, scalar_t* out, acc_t* mean_out, acc_t* rstd_out) {
  acc_t sum = 0;
  for (int64_t c = 0; c < C; c++) sum += static_cast<acc_t>(x[c]);
  const acc_t mean = sum / C;
  acc_t sq = 0;
  for (int64_t c = 0; c < C; c++) {
    const acc_t d = static_cast<acc_t>(x[c]) - mean;
    sq += d * d;
  }
  const acc_t rstd = acc_t(1) / std::sqrt(sq / C + static_cast<acc_t>(eps));
  for (int64_t c = 0; c < C; c++) {
    const acc_t y = (static_cast<acc_t>(x[c]) - mean) * rstd * static_cast<acc_t>(weight[c]);
    out[c] = static_cast<scalar_t>(bias ? y + static_cast<acc_t>(bias[c]) : y);
  }
  *mean_out = mean;
  *rstd_out = rstd;
}

// sum: where the residual sum is written (nullptr: no residual, rows of x are
// normalized directly).
template <typename scalar_t>
void layer_norm_rows(const Tensor& x, const Tensor& residual, const Tensor& weight,
                     const Tensor& bias, double eps, Tensor& sum, Tensor& out, Tensor& mean,
                     Tensor& rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(-1), N = C == 0 ? 0 : x.numel() / C;
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* res_ptr = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* sum_ptr = sum.defined() ? sum.mutable_data_ptr<scalar_t>() : nullptr;
  const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
  const scalar_t* b_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  acc_t* mean_ptr = mean.mutable_data_ptr<acc_t>();
  acc_t* rstd_ptr = rstd.mutable_data_ptr<acc_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; row++) {
      const scalar_t* in = x_ptr + row * C;
      if (res_ptr) {
        scalar_t* s = sum_ptr + row * C;
        const scalar_t* r = res_ptr + row * C;
        for (int64_t c = 0; c < C; c++) s[c] = in[c] + r[c];
        in = s;
      }
      normalize_row<scalar_t, acc_t>(in, w_ptr, b_ptr, C, eps, out_ptr + row * C,
                                     mean_ptr + row, rstd_ptr + row);
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& x, const Tensor& weight,
                                                      const Tensor& bias, double eps) {
  const auto rows = x.sizes().slice(0, x.dim() - 1);
  auto stats = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor out = at::empty_like(x), mean = at::empty(rows, stats), rstd = at::empty(rows, stats);
  Tensor no_sum;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_forward", [&] {
    layer_norm_rows<scalar_t>(x, Tensor(), weight, bias, eps, no_sum, out, mean, rstd);
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_forward(const Tensor& x,
                                                                  const Tensor& residual,
                                                                  const Tensor& weight,
                                                                  const Tensor& bias, double eps) {
  const auto rows = x.sizes().slice(0, x.dim() - 1);
  auto stats = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor sum = at::empty_like(x), out = at::empty_like(x);
  Tensor mean = at::empty(rows, stats), rstd = at::empty(rows, stats);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "add_layer_norm_forward", [&] {
    layer_norm_rows<scalar_t>(x, residual, weight, bias, eps, sum, out, mean, rstd);
  });
  return {sum, out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& grad_out, const Tensor& x,
                                                       const Tensor& weight, const Tensor& mean,
                                                       const Tensor& rstd,
                                                       const Tensor& grad_residual) {
  const int64_t C = x.size(-1), N = C == 0 ? 0 : x.numel() / C;
  Tensor grad_x = at::empty_like(x);
  Tensor grad_weight = at::empty_like(weight), grad_bias = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
    const acc_t* mean_ptr = mean.const_data_ptr<acc_t>();
    const acc_t* rstd_ptr = rstd.const_data_ptr<acc_t>();
    const scalar_t* dres_ptr =
        grad_residual.defined() ? grad_residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dx_ptr = grad_x.mutable_data_ptr<scalar_t>();

    // partials [2, blocks, C]: per row block, the sum of grad_out * xhat (for
    // the weight), then the sum of grad_out (for the bias).
    const RowBlocks blocks(N);
    std::vector<acc_t> partials(2 * blocks.count * C, acc_t(0));
    at::parallel_for(0, blocks.count, 1, [&](int64_t block_begin, int64_t block_end) {
      std::vector<acc_t> xhat(C), g(C);
      for (int64_t block = block_begin; block < block_end; block++) {
        acc_t* dw_part = partials.data() + block * C;
        acc_t* db_part = partials.data() + (blocks.count + block) * C;
        for (int64_t row = blocks.begin(block, N); row < blocks.end(block, N); row++) {
          const scalar_t* dy = dy_ptr + row * C;
          const scalar_t* xr = x_ptr + row * C;
          const acc_t mu = mean_ptr[row], rs = rstd_ptr[row];
          acc_t g_mean = 0, gx_mean = 0;
          for (int64_t c = 0; c < C; c++) {
            const acc_t d = static_cast<acc_t>(dy[c]);
            xhat[c] = (static_cast<acc_t>(xr[c]) - mu) * rs;
            g[c] = d * static_cast<acc_t>(w_ptr[c]);
            g_mean += g[c];
            gx_mean += g[c] * xhat[c];
            dw_part[c] += d * xhat[c];
            db_part[c] += d;
          }
          g_mean /= C;
          gx_mean /= C;
          scalar_t* dx = dx_ptr + row * C;
          const scalar_t* dres = dres_ptr ? dres_ptr + row * C : nullptr;
          for (int64_t c = 0; c < C; c++) {
            const acc_t v = rs * (g[c] - g_mean - xhat[c] * gx_mean);
            dx[c] = static_cast<scalar_t>(dres ? v + static_cast<acc_t>(dres[c]) : v);
          }
        }
      }
    });
    sum_partials(partials.data(), blocks.count, C, grad_weight.mutable_data_ptr<scalar_t>());
    sum_partials(partials.data() + blocks.count * C, blocks.count, C,
                 grad_bias.mutable_data_ptr<scalar_t>());
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace nanoblock::cpu
