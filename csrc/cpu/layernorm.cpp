// LayerNorm over the last dim on the CPU, forward and backward, with the
// residual add of the Block fused in front of it.
//
//   forward:      out = (x - mean) * rstd * weight + bias
//                 mean, rstd = mean and 1 / sqrt(var + eps) of each row
//   add forward:  sum = x + dropout(residual), then the forward above on sum
//                 (no dropout when the mask is null)
//   backward:     xhat = (x - mean) * rstd, g = grad_out * weight
//                 grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))
//                          (+ grad_residual, the gradient that reaches x
//                          through the residual branch)
//                 grad_weight = sum over rows of grad_out * xhat
//                 grad_bias   = sum over rows of grad_out
//                 with column_sums also, from the same sweep:
//                 grad_residual_sum = sum over rows of grad_residual
//                 grad_x_sum        = sum over rows of grad_x (as written)
//                 (the Block's c_proj bias gradients, block.cpp)
//
// Rows [N, C] are independent and run in parallel. The mean and variance take
// two passes over the row (which is in cache) for accuracy; statistics are
// accumulated in float32 (float64 for float64 input). Weight and bias
// gradients and the column sums are reduced in a fixed order (row_blocks.h),
// the one bias_grad (gelu.cpp) uses, so the column sums equal its bits.
#include "../kernels.h"
#include "bfloat16.h"
#include "dropout.h"
#include "row_blocks.h"
#include "vector_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <optional>
#include <vector>

namespace nanoblock::cpu {

namespace {

// Normalizes one row of C values: writes out and returns mean and rstd.
template <typename scalar_t, typename acc_t>
NANOBLOCK_INLINE void normalize_row(const scalar_t* __restrict__ x,
                                    const scalar_t* __restrict__ weight,
                                    const scalar_t* __restrict__ bias, int64_t C, double eps,
                                    scalar_t* __restrict__ out, acc_t* mean_out,
                                    acc_t* rstd_out) {
  const acc_t mean = lane_sum<acc_t>(C, [&](int64_t c) { return acc_t(x[c]); }) / C;
  const acc_t var = lane_sum<acc_t>(C, [&](int64_t c) {
    const acc_t d = acc_t(x[c]) - mean;
    return d * d;
  }) / C;
  const acc_t rstd = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
  for (int64_t c = 0; c < C; c++) {
    out[c] = static_cast<scalar_t>((acc_t(x[c]) - mean) * rstd * acc_t(weight[c]) + acc_t(bias[c]));
  }
  *mean_out = mean;
  *rstd_out = rstd;
}

// Rows [begin, end): sum = x + residual when residual is given (and then
// normalized), else x normalized directly; residual dropped by mask when
// mask is given. bias is zeros when absent.
template <typename scalar_t, typename acc_t>
NANOBLOCK_INLINE void layer_norm_rows(const scalar_t* x, const scalar_t* residual,
                                      const DropoutMask* mask, scalar_t* sum,
                                      const scalar_t* weight, const scalar_t* bias,
                                      int64_t begin, int64_t end, int64_t C, double eps,
                                      scalar_t* out, acc_t* mean, acc_t* rstd) {
  for (int64_t row = begin; row < end; row++) {
    const scalar_t* in = x + row * C;
    if (residual) {
      scalar_t* s = sum + row * C;
      const scalar_t* r = residual + row * C;
      if (mask) {
        mask->for_each<scalar_t>(C, uint64_t(row * C),
                                 [&](int64_t c, scalar_t z) { s[c] = in[c] + r[c] * z; });
      } else {
        for (int64_t c = 0; c < C; c++) s[c] = in[c] + r[c];
      }
      in = s;
    }
    normalize_row(in, weight, bias, C, eps, out + row * C, mean + row, rstd + row);
  }
}

// One entry per dtype; the float one is compiled for AVX2 too (vector_math.h).
NANOBLOCK_VECTORIZE void layer_norm_rows(const float* x, const float* residual,
                                         const DropoutMask* mask, float* sum,
                                         const float* weight, const float* bias, int64_t begin,
                                         int64_t end, int64_t C, double eps, float* out,
                                         float* mean, float* rstd) {
  layer_norm_rows<float, float>(x, residual, mask, sum, weight, bias, begin, end, C, eps, out,
                                mean, rstd);
}

void layer_norm_rows(const double* x, const double* residual, const DropoutMask* mask,
                     double* sum, const double* weight, const double* bias, int64_t begin,
                     int64_t end, int64_t C, double eps, double* out, double* mean,
                     double* rstd) {
  layer_norm_rows<double, double>(x, residual, mask, sum, weight, bias, begin, end, C, eps, out,
                                  mean, rstd);
}

// Runs the rows of x [N, C] in parallel; residual and sum are undefined for
// the plain LayerNorm, mask null without dropout.
template <typename scalar_t>
void layer_norm_all_rows(const Tensor& x, const Tensor& residual, const DropoutMask* mask,
                         const Tensor& weight, const Tensor& bias, double eps, Tensor& sum,
                         Tensor& out, Tensor& mean, Tensor& rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(-1), N = C == 0 ? 0 : x.numel() / C;
  const Tensor b = bias.defined() ? bias : at::zeros({C}, x.options());
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* res_ptr = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* sum_ptr = sum.defined() ? sum.mutable_data_ptr<scalar_t>() : nullptr;
  const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
  const scalar_t* b_ptr = b.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  acc_t* mean_ptr = mean.mutable_data_ptr<acc_t>();
  acc_t* rstd_ptr = rstd.mutable_data_ptr<acc_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    layer_norm_rows(x_ptr, res_ptr, mask, sum_ptr, w_ptr, b_ptr, begin, end, C, eps, out_ptr,
                    mean_ptr, rstd_ptr);
  });
}

// The backward of rows [begin, end) of one row block: writes grad_x and adds
// the block's sums of grad_out * xhat and of grad_out into dw_part, db_part
// [C], and when dres_part is given (then dres_ptr is too) those of
// grad_residual and grad_x into dres_part, dx_part [C]. dres_ptr
// (grad_residual) may be null; xhat, g are [C] scratch.
template <typename scalar_t, typename acc_t>
NANOBLOCK_INLINE void layer_norm_backward_rows(
    const scalar_t* __restrict__ dy_ptr, const scalar_t* __restrict__ x_ptr,
    const scalar_t* __restrict__ w, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ rstd, const scalar_t* __restrict__ dres_ptr, int64_t begin,
    int64_t end, int64_t C, scalar_t* __restrict__ dx_ptr, acc_t* __restrict__ dw_part,
    acc_t* __restrict__ db_part, acc_t* __restrict__ dres_part, acc_t* __restrict__ dx_part,
    acc_t* __restrict__ xhat, acc_t* __restrict__ g) {
  for (int64_t row = begin; row < end; row++) {
    const scalar_t* dy = dy_ptr + row * C;
    const scalar_t* xr = x_ptr + row * C;
    const acc_t mu = mean[row], rs = rstd[row];
    for (int64_t c = 0; c < C; c++) {
      const acc_t d = acc_t(dy[c]);
      xhat[c] = (acc_t(xr[c]) - mu) * rs;
      g[c] = d * acc_t(w[c]);
      dw_part[c] += d * xhat[c];
      db_part[c] += d;
    }
    const acc_t g_mean = lane_sum<acc_t>(C, [&](int64_t c) { return g[c]; }) / C;
    const acc_t gx_mean = lane_sum<acc_t>(C, [&](int64_t c) { return g[c] * xhat[c]; }) / C;
    scalar_t* dx = dx_ptr + row * C;
    if (dres_ptr) {
      const scalar_t* dres = dres_ptr + row * C;
      for (int64_t c = 0; c < C; c++) {
        dx[c] = static_cast<scalar_t>(rs * (g[c] - g_mean - xhat[c] * gx_mean) + acc_t(dres[c]));
      }
      if (dres_part) {
        for (int64_t c = 0; c < C; c++) {
          dres_part[c] += acc_t(dres[c]);
          dx_part[c] += acc_t(dx[c]);
        }
      }
    } else {
      for (int64_t c = 0; c < C; c++) {
        dx[c] = static_cast<scalar_t>(rs * (g[c] - g_mean - xhat[c] * gx_mean));
      }
    }
  }
}

NANOBLOCK_VECTORIZE void layer_norm_backward_rows(const float* dy, const float* x, const float* w,
                                                  const float* mean, const float* rstd,
                                                  const float* dres, int64_t begin, int64_t end,
                                                  int64_t C, float* dx, float* dw_part,
                                                  float* db_part, float* dres_part,
                                                  float* dx_part, float* xhat, float* g) {
  layer_norm_backward_rows<float, float>(dy, x, w, mean, rstd, dres, begin, end, C, dx, dw_part,
                                         db_part, dres_part, dx_part, xhat, g);
}

void layer_norm_backward_rows(const double* dy, const double* x, const double* w,
                              const double* mean, const double* rstd, const double* dres,
                              int64_t begin, int64_t end, int64_t C, double* dx, double* dw_part,
                              double* db_part, double* dres_part, double* dx_part, double* xhat,
                              double* g) {
  layer_norm_backward_rows<double, double>(dy, x, w, mean, rstd, dres, begin, end, C, dx, dw_part,
                                           db_part, dres_part, dx_part, xhat, g);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& x, const Tensor& weight,
                                                      const Tensor& bias, double eps) {
  if (is_bf16(x)) {
    auto [out, mean, rstd] = layer_norm_forward(to_float(x), to_float(weight), to_float(bias), eps);
    return {to_bf16(out), mean, rstd};
  }
  const auto rows = x.sizes().slice(0, x.dim() - 1);
  auto stats = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor out = at::empty_like(x), mean = at::empty(rows, stats), rstd = at::empty(rows, stats);
  Tensor no_sum;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_forward", [&] {
    layer_norm_all_rows<scalar_t>(x, Tensor(), nullptr, weight, bias, eps, no_sum, out, mean,
                                  rstd);
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_forward(const Tensor& x,
                                                                  const Tensor& residual,
                                                                  const Tensor& weight,
                                                                  const Tensor& bias, double eps,
                                                                  const Dropout& dropout) {
  if (is_bf16(x)) {
    // Normalize the rounded sum, the one the backward will see.
    Tensor sum = dropout.active() ? dropout_add(residual, x, dropout) : x + residual;
    auto [out, mean, rstd] = layer_norm_forward(sum, weight, bias, eps);
    return {sum, out, mean, rstd};
  }
  const auto rows = x.sizes().slice(0, x.dim() - 1);
  auto stats = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor sum = at::empty_like(x), out = at::empty_like(x);
  Tensor mean = at::empty(rows, stats), rstd = at::empty(rows, stats);
  const std::optional<DropoutMask> mask =
      dropout.active() ? std::optional<DropoutMask>(dropout) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "add_layer_norm_forward", [&] {
    layer_norm_all_rows<scalar_t>(x, residual, mask ? &*mask : nullptr, weight, bias, eps, sum,
                                  out, mean, rstd);
  });
  return {sum, out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_norm_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& mean,
    const Tensor& rstd, const Tensor& grad_residual, bool column_sums) {
  if (is_bf16(x)) {
    Tensor grad_x, grad_weight, grad_bias;
    std::tie(grad_x, grad_weight, grad_bias, std::ignore, std::ignore) = layer_norm_backward(
        to_float(grad_out), to_float(x), to_float(weight), mean, rstd, to_float(grad_residual),
        /*column_sums=*/false);
    grad_x = to_bf16(grad_x);
    // The sums of grad_x are those of the rounded bfloat16 grad_x, which the
    // float sweep never holds: passes of their own, over the bfloat16 tensors.
    const Tensor grad_residual_sum = column_sums ? bias_grad(grad_residual) : Tensor();
    const Tensor grad_x_sum = column_sums ? bias_grad(grad_x) : Tensor();
    return {grad_x, to_bf16(grad_weight), to_bf16(grad_bias), grad_residual_sum, grad_x_sum};
  }
  const int64_t C = x.size(-1), N = C == 0 ? 0 : x.numel() / C;
  Tensor grad_x = at::empty_like(x);
  Tensor grad_weight = at::empty_like(weight), grad_bias = at::empty_like(weight);
  Tensor grad_residual_sum, grad_x_sum;
  if (column_sums) {
    grad_residual_sum = at::empty_like(weight);
    grad_x_sum = at::empty_like(weight);
  }
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
    // the weight), then the sum of grad_out (for the bias); with column_sums
    // [4, blocks, C], then the sums of grad_residual and of grad_x.
    const RowBlocks blocks(N);
    const int64_t sums = column_sums ? 4 : 2;
    std::vector<acc_t> partials(sums * blocks.count * C, acc_t(0));
    const auto partial = [&](int64_t sum, int64_t block) {
      return partials.data() + (sum * blocks.count + block) * C;
    };
    at::parallel_for(0, blocks.count, 1, [&](int64_t block_begin, int64_t block_end) {
      std::vector<acc_t> xhat(C), g(C);
      for (int64_t block = block_begin; block < block_end; block++) {
        layer_norm_backward_rows(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dres_ptr,
                                 blocks.begin(block, N), blocks.end(block, N), C, dx_ptr,
                                 partial(0, block), partial(1, block),
                                 column_sums ? partial(2, block) : nullptr,
                                 column_sums ? partial(3, block) : nullptr, xhat.data(),
                                 g.data());
      }
    });
    const Tensor outputs[] = {grad_weight, grad_bias, grad_residual_sum, grad_x_sum};
    for (int64_t sum = 0; sum < sums; sum++) {
      sum_partials(partial(sum, 0), blocks.count, C, outputs[sum].mutable_data_ptr<scalar_t>());
    }
  });
  return {grad_x, grad_weight, grad_bias, grad_residual_sum, grad_x_sum};
}

}  // namespace nanoblock::cpu
