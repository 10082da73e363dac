// Until the CUDA kernels take dropout (issue 7): kernel_api.h's signatures on
// top of today's CUDA kernels (csrc/cuda/*.cu), which have no dropout. The op
// boundary (ops.cpp) refuses dropout_p > 0 on CUDA, so `dropout` is never
// active here. Mirroring kernel_api.h in csrc/cuda/*.cu replaces this file
// (and its line in setup.py). Built only with CUDA.
#include "check.h"
#include "kernels.h"

namespace nanoblock::cuda {

// The signatures csrc/cuda/*.cu define today.
std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_forward(const Tensor& x,
                                                                  const Tensor& residual,
                                                                  const Tensor& weight,
                                                                  const Tensor& bias, double eps);
std::tuple<Tensor, Tensor> causal_attention_forward(const Tensor& qkv, int64_t n_head);
Tensor causal_attention_backward(const Tensor& grad_out, const Tensor& qkv, const Tensor& out,
                                 const Tensor& lse, int64_t n_head);

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_forward(const Tensor& x,
                                                                  const Tensor& residual,
                                                                  const Tensor& weight,
                                                                  const Tensor& bias, double eps,
                                                                  const Dropout&) {
  return add_layer_norm_forward(x, residual, weight, bias, eps);
}

std::tuple<Tensor, Tensor> causal_attention_forward(const Tensor& qkv, int64_t n_head,
                                                    const Dropout&) {
  return causal_attention_forward(qkv, n_head);
}

Tensor causal_attention_backward(const Tensor& grad_out, const Tensor& qkv, const Tensor& out,
                                 const Tensor& lse, int64_t n_head, const Dropout&) {
  return causal_attention_backward(grad_out, qkv, out, lse, n_head);
}

Tensor dropout_add(const Tensor&, const Tensor&, const Dropout&) {
  fail_not_implemented("nanoblock: dropout has no CUDA kernels yet (issue 7)");
}

}  // namespace nanoblock::cuda
