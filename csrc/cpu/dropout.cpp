// dropout_add on the CPU: out = residual + dropout(x) (kernel_api.h). Rows
// [N, C] run in parallel; element (row, c) has mask index row * C + c.
#include "dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "bfloat16.h"

namespace nanoblock::cpu {

Tensor dropout_add(const Tensor& x, const Tensor& residual, const Dropout& dropout) {
  if (!dropout.active()) return residual.defined() ? residual + x : x.clone();
  if (is_bf16(x)) {
    return to_bf16(dropout_add(to_float(x), to_float(residual), dropout));
  }
  const int64_t C = x.size(-1), N = C == 0 ? 0 : x.numel() / C;
  Tensor out = at::empty_like(x);
  const DropoutMask mask(dropout);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout_add", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* res_ptr = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* in = x_ptr + row * C;
        const scalar_t* res = res_ptr ? res_ptr + row * C : nullptr;
        scalar_t* o = out_ptr + row * C;
        mask.for_each<scalar_t>(C, uint64_t(row * C), [&](int64_t c, scalar_t z) {
          o[c] = res ? res[c] + in[c] * z : in[c] * z;
        });
      }
    });
  });
  return out;
}

}  // namespace nanoblock::cpu
