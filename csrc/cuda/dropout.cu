// dropout_add on CUDA: out = residual + dropout(x), or dropout(x) alone
// without residual (kernel_api.h). x, residual, out [N, C] contiguous: the
// flat element i = row * C + c is mask index i. One elementwise pass in
// 16-byte vectors where the size and pointers allow; the mask of a vector's
// VEC elements takes one Philox call per four (DeviceMask, common.cuh).
#include "common.cuh"

namespace nanoblock::cuda {

namespace {

template <typename scalar_t, int VEC>
__global__ void dropout_add_kernel(const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ residual,
                                   scalar_t* __restrict__ out, int64_t vectors,
                                   DropoutArgs dropout) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const DeviceMask mask(dropout, true);
  const acc_t scale = static_cast<acc_t>(dropout.scale);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t offset = i * VEC;
    const V a = load_vec<scalar_t, VEC>(x + offset);
    V r;
    if (residual != nullptr) r = load_vec<scalar_t, VEC>(residual + offset);
    bool keep[VEC];
    mask.kept(static_cast<uint64_t>(offset), keep);
    V y;
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      // x * 0 keeps a NaN, as PyTorch's dropout (and the CPU kernel) do.
      acc_t v = static_cast<acc_t>(a.v[k]) * (keep[k] ? scale : acc_t(0));
      if (residual != nullptr) v += static_cast<acc_t>(r.v[k]);
      y.v[k] = static_cast<scalar_t>(v);
    }
    store_vec<scalar_t, VEC>(out + offset, y);
  }
}

}  // namespace

Tensor dropout_add(const Tensor& x, const Tensor& residual, const Dropout& dropout) {
  if (!dropout.active()) return residual.defined() ? residual + x : x.clone();
  Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const DropoutArgs args = dropout_args(dropout);
  const cudaStream_t stream = current_stream();
  NANOBLOCK_DISPATCH(x.scalar_type(), "dropout_add", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* res_ptr = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    const int vec = vector_width<scalar_t>(x.numel(), {x_ptr, res_ptr, out_ptr});
    with_vector_width<scalar_t>(vec, [&](auto vec_constant) {
      constexpr int VEC = decltype(vec_constant)::value;
      const int64_t vectors = x.numel() / VEC;
      dropout_add_kernel<scalar_t, VEC>
          <<<elementwise_grid(vectors, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
              x_ptr, res_ptr, out_ptr, vectors, args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace nanoblock::cuda
