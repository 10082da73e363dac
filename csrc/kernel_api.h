// The kernels every backend implements, declared once and included inside
// each backend's namespace by kernels.h (no include guard on purpose).
// Shapes are given next to each tensor; see kernels.h for what a kernel may
// assume about its arguments.
//
// Dropout (issue 7; nanoGPT's three: attention probabilities, and the outputs
// of attn.c_proj and mlp.c_proj). A kernel given a `Dropout` d with d.p > 0
// drops elements of one tensor; d.p == 0 is the plain kernel, bit for bit.
// The mask is never stored: every element's fate is a pure function of
//   (seed, offset) = d.rng [2] (int64, on the tensors' device),
//   which = d.which (0 attention probabilities, 1 attention residual,
//           2 MLP residual; kDropout* in kernels.h),
//   index = the element's position in that tensor, row-major:
//           attention probabilities [B, n_head, T, T] (query i, key j:
//           ((b * n_head + h) * T + i) * T + j), residuals [B, T, C],
// through Philox4x32-10 (philox.h, DropoutBits): key = seed, counter =
// (index / 4, offset + which), word index % 4; kept when the word is
// >= floor(p * 2^32), then scaled by 1 / (1 - p). So a backward regenerates
// its forward's mask from the same rng, and CPU and GPU drop the same
// elements. One Block call uses offsets offset .. offset + 2: a caller that
// advances a generator's offset (PyTorch's fused CUDA kernels do, through
// philox_cuda_state, which CUDA graphs capture) must advance it by 4 per
// call. nanoblock's Python layer instead draws a fresh (seed, offset) per call
// with torch.randint from the device's default generator (nanoblock/ops.py),
// which torch.manual_seed, torch.compile and CUDA graph capture all handle.
// CUDA kernels must read rng in device code (never copy it to the host), so
// a captured graph reads each replay's fresh draw. d.p == 0: rng may be
// undefined and must not be read.

// LayerNorm over the last dim.
// x [N, C], weight [C], bias [C] or undefined
// -> out [N, C], mean [N], rstd [N]
std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(
    const Tensor& x, const Tensor& weight, const Tensor& bias, double eps);
// The residual add fused in front of the LayerNorm:
// sum = x + dropout(residual), out = LayerNorm(sum).
// -> sum [N, C], out [N, C], mean [N], rstd [N]
std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_forward(
    const Tensor& x, const Tensor& residual, const Tensor& weight,
    const Tensor& bias, double eps, const Dropout& dropout);
// grad_out [N, C], x [N, C] (the LayerNorm's input), mean/rstd [N],
// grad_residual [N, C] or undefined: added to grad_x when given (the
// gradient that reaches the LayerNorm's input through the residual).
// column_sums (grad_residual given): also grad_residual and grad_x (as
// written, rounded to the dtype) summed over rows in a fixed order, from the
// same sweep; the Block's backward takes them as the c_proj bias gradients
// instead of two bias_grad passes. Otherwise they are returned undefined.
// -> grad_x [N, C], grad_weight [C], grad_bias [C],
//    grad_residual_sum [C], grad_x_sum [C]
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_norm_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight,
    const Tensor& mean, const Tensor& rstd, const Tensor& grad_residual,
    bool column_sums);
// Causal self-attention straight from c_attn's output.
// qkv [B, T, 3C] (q, k, v in that order, heads of hd = C / n_head)
// -> out [B, T, C] (heads merged), lse [B, n_head, T] (stats dtype)
// With dropout (which 0) on the probabilities P: out = (P o Z) v, Z the
// mask scaled by 1 / (1 - p); lse is that of the undropped scores, as
// without dropout (FlashAttention's convention).
std::tuple<Tensor, Tensor> causal_attention_forward(const Tensor& qkv,
                                                    int64_t n_head,
                                                    const Dropout& dropout);
// grad_out [B, T, C], qkv [B, T, 3C], out [B, T, C], lse [B, n_head, T],
// dropout: the forward's (same rng) -> grad_qkv [B, T, 3C]. With dropout,
// P = exp(S - lse) as without, dv = (P o Z)^T dO, dS = P o (Z o dO v^T - D)
// and still D = rowsum(dO o out): sum_j P_ij Z_ij (dO_i . v_j) = dO_i . out_i.
Tensor causal_attention_backward(const Tensor& grad_out, const Tensor& qkv,
                                 const Tensor& out, const Tensor& lse,
                                 int64_t n_head, const Dropout& dropout);
// out = residual + dropout(x), or dropout(x) alone when residual is
// undefined; x [N, C], residual [N, C]. The Block's final add (which 2; with
// dropout inactive, the plain add), and in the backward the gradient through
// a residual dropout (Z o grad).
Tensor dropout_add(const Tensor& x, const Tensor& residual, const Dropout& dropout);
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
// The GEMMs of the Block's Linear layers: a [M, K] @ b [K, N] (+ bias [N])
// -> [M, N], contiguous; a and b may be transposed views (weight.t()).
// ATen's mm and addmm on the CPU; on CUDA, cuBLASLt with cached plans for
// float16 / bfloat16, ATen's (without the dispatcher) otherwise (gemm.cu).
Tensor matmul(const Tensor& a, const Tensor& b);
Tensor matmul_bias(const Tensor& bias, const Tensor& a, const Tensor& b);
// residual [M, N] + a @ b (+ bias [N], may be undefined) -> [M, N]: the
// Block's last Linear and its residual add (dropout inactive). On the CPU
// the two ops, matmul_bias and dropout_add; on CUDA by cuBLASLt, one GEMM
// with the residual as its C (beta = 1), rounded once (gemm.cu).
Tensor matmul_bias_add(const Tensor& bias, const Tensor& a, const Tensor& b,
                       const Tensor& residual);
