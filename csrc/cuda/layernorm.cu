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
//
// One thread block per row: the row is read with 16-byte vector loads where
// the row length and pointers allow, the mean and the variance take two passes
// over the row (the second pass hits L1/L2) for accuracy, sums run in acc_t
// (float32, float64 for float64). The weight and bias gradients are column
// sums over all rows and are computed deterministically: a partial kernel
// gives each group of rows its own [C] partial (no atomics), and
// sum_partials_kernel adds the partials in group order.
#include "common.cuh"

namespace nanoblock::cuda {

namespace {

// Threads per row block: enough for one vector per thread across the row,
// a multiple of 32, between 32 and 512.
int row_threads(int64_t C, int vec) {
  const int64_t vectors = ceil_div(C, vec);
  return static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, ceil_div(vectors, 32) * 32)));
}

// ---------------------------------------------------------------------------
// Forward. One block per row. With residual != nullptr the row normalized is
// sum = x + residual (x + dropout(residual) with DROPOUT), which is written
// to sum_out first (each thread re-reads only the elements it wrote itself,
// so no barrier is needed in between).
template <typename scalar_t, int VEC, bool DROPOUT>
__global__ void layer_norm_forward_kernel(const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ residual,
                                          const scalar_t* __restrict__ weight,
                                          const scalar_t* __restrict__ bias,
                                          scalar_t* __restrict__ sum_out,
                                          scalar_t* __restrict__ out,
                                          acc_type<scalar_t>* __restrict__ mean_out,
                                          acc_type<scalar_t>* __restrict__ rstd_out, int64_t C,
                                          acc_type<scalar_t> eps, DropoutArgs dropout) {
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
    const scalar_t* res = residual + row * C;
    scalar_t* s = sum_out + row * C;
    for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
      V a = load_vec<scalar_t, VEC>(in + i * VEC);
      const V b = load_vec<scalar_t, VEC>(res + i * VEC);
      if constexpr (DROPOUT) {
        bool keep[VEC];
        mask.kept(static_cast<uint64_t>(row * C + i * VEC), keep);
        const acc_t scale = static_cast<acc_t>(dropout.scale);
#pragma unroll
        for (int k = 0; k < VEC; k++) {
          const acc_t r = static_cast<acc_t>(b.v[k]) * (keep[k] ? scale : acc_t(0));
          a.v[k] = static_cast<scalar_t>(static_cast<acc_t>(a.v[k]) + r);
          sum += static_cast<acc_t>(a.v[k]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) {
          a.v[k] = static_cast<scalar_t>(static_cast<acc_t>(a.v[k]) + static_cast<acc_t>(b.v[k]));
          sum += static_cast<acc_t>(a.v[k]);
        }
      }
      store_vec<scalar_t, VEC>(s + i * VEC, a);
    }
    in = s;  // the rest normalizes the rounded sum, as x + residual then LayerNorm would
  } else {
    for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
      const V a = load_vec<scalar_t, VEC>(in + i * VEC);
#pragma unroll
      for (int k = 0; k < VEC; k++) sum += static_cast<acc_t>(a.v[k]);
    }
  }
  const acc_t mean = block_sum(sum, scratch) / static_cast<acc_t>(C);

  // Pass 2: the variance around the mean (two-pass for accuracy).
  acc_t sq = 0;
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    const V a = load_vec<scalar_t, VEC>(in + i * VEC);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      const acc_t d = static_cast<acc_t>(a.v[k]) - mean;
      sq += d * d;
    }
  }
  const acc_t rstd = rsqrt_acc(block_sum(sq, scratch) / static_cast<acc_t>(C) + eps);

  // Pass 3: normalize, scale, shift.
  scalar_t* o = out + row * C;
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    const V a = load_vec<scalar_t, VEC>(in + i * VEC);
    const V w = load_vec<scalar_t, VEC>(weight + i * VEC);
    V y;
    if (bias != nullptr) {
      const V b = load_vec<scalar_t, VEC>(bias + i * VEC);
#pragma unroll
      for (int k = 0; k < VEC; k++) {
        y.v[k] = static_cast<scalar_t>((static_cast<acc_t>(a.v[k]) - mean) * rstd *
                                           static_cast<acc_t>(w.v[k]) +
                                       static_cast<acc_t>(b.v[k]));
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; k++) {
        y.v[k] = static_cast<scalar_t>((static_cast<acc_t>(a.v[k]) - mean) * rstd *
                                       static_cast<acc_t>(w.v[k]));
      }
    }
    store_vec<scalar_t, VEC>(o + i * VEC, y);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// ---------------------------------------------------------------------------
// Backward, grad_x. One block per row: two row sums, then the elementwise
// formula (the second pass re-reads the row from cache).
template <typename scalar_t, int VEC>
__global__ void layer_norm_grad_x_kernel(const scalar_t* __restrict__ grad_out,
                                         const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ weight,
                                         const acc_type<scalar_t>* __restrict__ mean,
                                         const acc_type<scalar_t>* __restrict__ rstd,
                                         const scalar_t* __restrict__ grad_residual,
                                         scalar_t* __restrict__ grad_x, int64_t C) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  __shared__ acc_t scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t vectors = C / VEC;
  const scalar_t* dy = grad_out + row * C;
  const scalar_t* xr = x + row * C;
  const acc_t mu = mean[row], rs = rstd[row];

  acc_t g_sum = 0, gx_sum = 0;
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    const V d = load_vec<scalar_t, VEC>(dy + i * VEC);
    const V a = load_vec<scalar_t, VEC>(xr + i * VEC);
    const V w = load_vec<scalar_t, VEC>(weight + i * VEC);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      const acc_t g = static_cast<acc_t>(d.v[k]) * static_cast<acc_t>(w.v[k]);
      g_sum += g;
      gx_sum += g * (static_cast<acc_t>(a.v[k]) - mu) * rs;
    }
  }
  const acc_t g_mean = block_sum(g_sum, scratch) / static_cast<acc_t>(C);
  const acc_t gx_mean = block_sum(gx_sum, scratch) / static_cast<acc_t>(C);

  scalar_t* dx = grad_x + row * C;
  const scalar_t* dres = grad_residual != nullptr ? grad_residual + row * C : nullptr;
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    const V d = load_vec<scalar_t, VEC>(dy + i * VEC);
    const V a = load_vec<scalar_t, VEC>(xr + i * VEC);
    const V w = load_vec<scalar_t, VEC>(weight + i * VEC);
    V r;
    if (dres != nullptr) r = load_vec<scalar_t, VEC>(dres + i * VEC);
    V result;
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      const acc_t g = static_cast<acc_t>(d.v[k]) * static_cast<acc_t>(w.v[k]);
      const acc_t xhat = (static_cast<acc_t>(a.v[k]) - mu) * rs;
      acc_t v = rs * (g - g_mean - xhat * gx_mean);
      if (dres != nullptr) v += static_cast<acc_t>(r.v[k]);
      result.v[k] = static_cast<scalar_t>(v);
    }
    store_vec<scalar_t, VEC>(dx + i * VEC, result);
  }
}

// ---------------------------------------------------------------------------
// Backward, weight and bias partials. Grid (column tiles of 32, row groups);
// block (32, kPartialRows): lane = column, threadIdx.y walks the group's rows
// with stride kPartialRows; the kPartialRows sums are then added in y order.
// partials [2, groups, C]: the grad_weight partials, then the grad_bias ones.
template <typename scalar_t>
__global__ void layer_norm_param_partials_kernel(const scalar_t* __restrict__ grad_out,
                                                 const scalar_t* __restrict__ x,
                                                 const acc_type<scalar_t>* __restrict__ mean,
                                                 const acc_type<scalar_t>* __restrict__ rstd,
                                                 int64_t N, int64_t C, int64_t rows_per_group,
                                                 acc_type<scalar_t>* __restrict__ partials) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t dw_tile[kPartialRows][32];
  __shared__ acc_t db_tile[kPartialRows][32];
  const int64_t c = blockIdx.x * 32 + threadIdx.x;
  const int64_t group = blockIdx.y, groups = gridDim.y;
  const int64_t row_begin = group * rows_per_group;
  const int64_t row_end = std::min(N, row_begin + rows_per_group);
  acc_t dw = 0, db = 0;
  if (c < C) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kPartialRows) {
      const acc_t d = static_cast<acc_t>(grad_out[row * C + c]);
      const acc_t xhat = (static_cast<acc_t>(x[row * C + c]) - mean[row]) * rstd[row];
      dw += d * xhat;
      db += d;
    }
  }
  dw_tile[threadIdx.y][threadIdx.x] = dw;
  db_tile[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t dw_total = 0, db_total = 0;
#pragma unroll
    for (int y = 0; y < kPartialRows; y++) {
      dw_total += dw_tile[y][threadIdx.x];
      db_total += db_tile[y][threadIdx.x];
    }
    partials[group * C + c] = dw_total;
    partials[(groups + group) * C + c] = db_total;
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
    with_dropout(dropout, [&](auto dropout_constant) {
      constexpr bool DROPOUT = decltype(dropout_constant)::value;
      layer_norm_forward_kernel<scalar_t, VEC, DROPOUT><<<N, row_threads(C, VEC), 0, stream>>>(
          x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, mean.mutable_data_ptr<acc_t>(),
          rstd.mutable_data_ptr<acc_t>(), C, static_cast<acc_t>(eps), dropout);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
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

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& grad_out, const Tensor& x,
                                                       const Tensor& weight, const Tensor& mean,
                                                       const Tensor& rstd,
                                                       const Tensor& grad_residual) {
  const int64_t C = x.size(-1), N = C == 0 ? 0 : x.numel() / C;
  Tensor grad_x = at::empty_like(x);
  if (N == 0) {
    // Sums over no rows are zero.
    return {grad_x, at::zeros_like(weight), at::zeros_like(weight)};
  }
  Tensor grad_weight = at::empty_like(weight), grad_bias = at::empty_like(weight);
  const cudaStream_t stream = current_stream();
  NANOBLOCK_DISPATCH(x.scalar_type(), "layer_norm_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* dy_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* w_ptr = weight.const_data_ptr<scalar_t>();
    const scalar_t* dres_ptr =
        grad_residual.defined() ? grad_residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    const acc_t* mean_ptr = mean.const_data_ptr<acc_t>();
    const acc_t* rstd_ptr = rstd.const_data_ptr<acc_t>();

    const int vec = vector_width<scalar_t>(C, {dy_ptr, x_ptr, w_ptr, dres_ptr, dx_ptr});
    with_vector_width<scalar_t>(vec, [&](auto vec_constant) {
      constexpr int VEC = decltype(vec_constant)::value;
      layer_norm_grad_x_kernel<scalar_t, VEC><<<N, row_threads(C, VEC), 0, stream>>>(
          dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dres_ptr, dx_ptr, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });

    const int64_t groups = row_groups_for(N);
    const int64_t rows_per_group = ceil_div(N, groups);
    Tensor partials = at::empty({2, groups, C}, x.options().dtype(stats_dtype(x.scalar_type())));
    acc_t* partials_ptr = partials.mutable_data_ptr<acc_t>();
    const dim3 grid(static_cast<unsigned>(ceil_div(C, 32)), static_cast<unsigned>(groups));
    layer_norm_param_partials_kernel<scalar_t><<<grid, dim3(32, kPartialRows), 0, stream>>>(
        dy_ptr, x_ptr, mean_ptr, rstd_ptr, N, C, rows_per_group, partials_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_sum_partials<scalar_t, acc_t>(partials_ptr, groups, C,
                                         grad_weight.mutable_data_ptr<scalar_t>(), stream);
    launch_sum_partials<scalar_t, acc_t>(partials_ptr + groups * C, groups, C,
                                         grad_bias.mutable_data_ptr<scalar_t>(), stream);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace nanoblock::cuda
