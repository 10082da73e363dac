// The kernels every backend implements, declared once and included inside
// each backend's namespace by kernels.h (no include guard on purpose).
// Shapes are given next to each tensor; see kernels.h for what a kernel may
// assume about its arguments.

// LayerNorm over the last dim.
// x [N, C], weight [C], bias [C] or undefined
// -> out [N, C], mean [N], rstd [N]
std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(
    const Tensor& x, const Tensor& weight, const Tensor& bias, double eps);
// The residual add fused in front of the LayerNorm:
// sum = x + residual, out = LayerNorm(sum).
// -> sum [N, C], out [N, C], mean [N], rstd [N]
std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_forward(
    const Tensor& x, const Tensor& residual, const Tensor& weight,
    const Tensor& bias, double eps);
// grad_out [N, C], x [N, C] (the LayerNorm's input), mean/rstd [N],
// grad_residual [N, C] or undefined: added to grad_x when given (the
// gradient that reaches the LayerNorm's input through the residual).
// -> grad_x [N, C], grad_weight [C], grad_bias [C]
std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight,
    const Tensor& mean, const Tensor& rstd, const Tensor& grad_residual);
// Causal self-attention straight from c_attn's output.
// qkv [B, T, 3C] (q, k, v in that order, heads of hd = C / n_head)
// -> out [B, T, C] (heads merged), lse [B, n_head, T] (stats dtype)
std::tuple<Tensor, Tensor> causal_attention_forward(const Tensor& qkv,
                                                    int64_t n_head);
// grad_out [B, T, C], qkv [B, T, 3C], out [B, T, C], lse [B, n_head, T]
// -> grad_qkv [B, T, 3C]
Tensor causal_attention_backward(const Tensor& grad_out, const Tensor& qkv,
                                 const Tensor& out, const Tensor& lse,
                                 int64_t n_head);
// out = gelu(x + bias); x [N, F], bias [F] or undefined.
// tanh: the tanh approximation (GPT-2) instead of the exact erf form.
Tensor gelu_forward(const Tensor& x, const Tensor& bias, bool tanh);
// -> grad_x [N, F] = grad_out * gelu'(x + bias)
Tensor gelu_backward(const Tensor& grad_out, const Tensor& x,
                     const Tensor& bias, bool tanh);
// The gradient of a bias: grad [N, F] summed over rows -> [F], in a
// fixed order (deterministic).
Tensor bias_grad(const Tensor& grad);
// The Block's backward through its MLP GELU, one pass where the backend can:
// grad_out [N, F] (the gradient of gelu(x + bias)) is overwritten with
// grad_x = grad_out * gelu'(x + bias); returns out = gelu(x + bias) [N, F]
// (recomputed: the c_proj weight gradient needs it, the forward does not keep
// it) and grad_bias [F] = grad_x summed over rows in a fixed order (also
// without bias: the Block's backward returns a gradient for every bias slot).
std::tuple<Tensor, Tensor> gelu_backward_recompute(const Tensor& grad_out,
                                                   const Tensor& x,
                                                   const Tensor& bias, bool tanh);
