// The whole Block, forward and backward, on any backend:
//
//   x1  = x  + c_proj(attn(ln_1(x)))
//   out = x1 + mlp_c_proj(gelu(c_fc(ln_2(x1))))
//
// The four Linear layers are GEMMs (k.matmul, k.matmul_bias,
// k.matmul_bias_add: ATen's on the CPU, which run MKL/OpenBLAS; on CUDA
// cuBLASLt plans for float16/bfloat16, ATen's cuBLAS otherwise, gemm.cu);
// everything between them is nanoblock's kernels. The forward keeps qkv, the attention output and its
// log-sum-exp, x1 and the c_fc output (10 C + n_head values per token, with
// x); the LayerNorm outputs and the GELU output are recomputed in the
// backward, one cheap pass each.
//
// With dropout (nanoGPT's: attention probabilities, attn.c_proj's and
// mlp.c_proj's outputs) the masks are made from rng inside the attention
// kernels, the add+LayerNorm and the final add, and made again in the
// backward; x1 = x + Z1 o proj, out = x1 + Z2 o mlp, so the gradients of the
// c_proj outputs are Z o (the residual stream's gradient).
//
// Shapes: B batch, T sequence, C = n_embd, N = B * T rows; every [B, T, *]
// tensor is contiguous and viewed as [N, *] for the GEMMs.
#include "block.h"

namespace nanoblock {

namespace {

constexpr double kLayerNormEps = 1e-5;

Tensor rows(const Tensor& t) { return t.view({-1, t.size(-1)}); }

// A GEMM's fresh [N, F] result as [B, T, F] for returning from the op: not a
// view (at::_unsafe_view), since an op output that is a view of a hidden
// base breaks in-place ops and hooks on it (FSDP2 warns).
Tensor unrows(const Tensor& t, int64_t B, int64_t T) {
  return at::_unsafe_view(t, {B, T, t.size(-1)});
}

// in [N, K] @ weight[M, K]^T (+ bias [M]) -> [N, M]
Tensor linear(const Kernels& k, const Tensor& in, const Tensor& weight, const Tensor& bias) {
  return bias.defined() ? k.matmul_bias(bias, in, weight.t()) : k.matmul(in, weight.t());
}

// The Block's three dropouts (which: kernels.h); inactive when p == 0.
struct BlockDropouts {
  Dropout attention, attention_residual, mlp_residual;
  BlockDropouts(double p, const Tensor& rng)
      : attention{p, rng, kDropoutAttention},
        attention_residual{p, rng, kDropoutAttentionResidual},
        mlp_residual{p, rng, kDropoutMlpResidual} {}
};

}  // namespace

std::tuple<Tensor, BlockSaved> block_forward(const Kernels& k, const Tensor& x,
                                             const BlockWeights& w, int64_t n_head, bool tanh,
                                             double dropout_p, const Tensor& rng) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const BlockDropouts d(dropout_p, rng);
  BlockSaved s;

  // Attention branch.
  Tensor ln_1 = std::get<0>(k.layer_norm_forward(x, w.ln_1_weight, w.ln_1_bias, kLayerNormEps));
  s.qkv = unrows(linear(k, rows(ln_1), w.c_attn_weight, w.c_attn_bias), B, T);
  ln_1.reset();  // temporaries go as soon as they are used: less peak memory
  std::tie(s.attn, s.lse) = k.causal_attention_forward(s.qkv, n_head, d.attention);
  Tensor proj = linear(k, rows(s.attn), w.attn_c_proj_weight, w.attn_c_proj_bias).view({B, T, C});

  // x1 = x + dropout(proj) and ln_2(x1) in one pass.
  Tensor ln_2;
  std::tie(s.x1, ln_2, std::ignore, std::ignore) = k.add_layer_norm_forward(
      x, proj, w.ln_2_weight, w.ln_2_bias, kLayerNormEps, d.attention_residual);
  proj.reset();

  // MLP branch: c_fc without its bias, which the GELU kernel adds.
  s.fc = unrows(k.matmul(rows(ln_2), w.c_fc_weight.t()), B, T);
  ln_2.reset();
  Tensor gelu = k.gelu_forward(s.fc, w.c_fc_bias, tanh);
  // out = x1 + dropout(gelu @ W^T + bias). Without dropout, one GEMM
  // (matmul_bias_add: on CUDA the residual is cuBLASLt's C and the sum is
  // rounded once; the add's own pass over [N, C] goes). With dropout, the
  // bias in the GEMM's epilogue, then dropout and add in one pass. (ATen's
  // addmm accumulating onto a copy of x1 took a copy and a broadcast bias
  // add: 12.8 + 32.6 us at gpt2-small on an H200, session 3.)
  if (!d.mlp_residual.active()) {
    Tensor out = k.matmul_bias_add(w.mlp_c_proj_bias, rows(gelu), w.mlp_c_proj_weight.t(),
                                   rows(s.x1));
    return {unrows(out, B, T), s};
  }
  Tensor mlp = linear(k, rows(gelu), w.mlp_c_proj_weight, w.mlp_c_proj_bias);
  return {unrows(k.dropout_add(mlp, rows(s.x1), d.mlp_residual), B, T), s};
}

BlockGrads block_backward(const Kernels& k, const Tensor& grad_out, const Tensor& x,
                          const BlockWeights& w, const BlockSaved& s, int64_t n_head,
                          bool tanh, double dropout_p, const Tensor& rng) {
  BlockGrads g;
  BlockWeights& gw = g.weights;
  const BlockDropouts d(dropout_p, rng);
  // The gradient of mlp.c_proj's output [N, C]: Z2 o grad_out with dropout.
  const Tensor dy = d.mlp_residual.active()
                        ? k.dropout_add(rows(grad_out), Tensor(), d.mlp_residual)
                        : rows(grad_out);

  // MLP c_proj (out = x1 + gelu @ W^T + b), then GELU and the c_fc bias: one
  // pass turns d_gelu into d_fc in place and recomputes gelu for c_proj's
  // weight gradient. c_proj's bias gradient, the column sums of dy, comes
  // from ln_2's backward below when dy is grad_out.
  if (d.mlp_residual.active()) gw.mlp_c_proj_bias = k.bias_grad(dy);
  Tensor d_fc = k.matmul(dy, w.mlp_c_proj_weight).view_as(s.fc);  // d_gelu, then d_fc [B, T, 4C]
  Tensor gelu;
  std::tie(gelu, gw.c_fc_bias) = k.gelu_backward_recompute(d_fc, s.fc, w.c_fc_bias, tanh);
  gw.mlp_c_proj_weight = k.matmul(dy.t(), rows(gelu));  // [C, 4C]
  gelu.reset();  // each temporary goes right after its last use (peak memory)

  // c_fc: fc = ln_2 @ W^T.
  auto [ln_2, mean_2, rstd_2] =
      k.layer_norm_forward(s.x1, w.ln_2_weight, w.ln_2_bias, kLayerNormEps);  // recomputed
  gw.c_fc_weight = k.matmul(rows(d_fc).t(), rows(ln_2));  // [4C, C]
  ln_2.reset();
  Tensor d_ln_2 = k.matmul(rows(d_fc), w.c_fc_weight).view_as(s.x1);
  d_fc.reset();

  // ln_2, plus the residual: d_x1 = grad_out + ln_2's input gradient. Its
  // sweep over the rows also sums grad_out and d_x1 over rows [C]: the two
  // c_proj bias gradients when the residual dropouts are inactive (dy =
  // grad_out, d_proj = d_x1), two passes over [N, C] fewer than bias_grad's.
  const bool column_sums = !d.mlp_residual.active() || !d.attention_residual.active();
  Tensor d_x1, grad_out_sum, d_x1_sum;
  std::tie(d_x1, gw.ln_2_weight, gw.ln_2_bias, grad_out_sum, d_x1_sum) = k.layer_norm_backward(
      d_ln_2, s.x1, w.ln_2_weight, mean_2, rstd_2, grad_out, column_sums);
  d_ln_2.reset();
  if (!d.mlp_residual.active()) gw.mlp_c_proj_bias = grad_out_sum;

  // Attention c_proj: x1 = x + dropout(attn @ W^T + b); d_proj [N, C].
  const Tensor d_proj = d.attention_residual.active()
                            ? k.dropout_add(rows(d_x1), Tensor(), d.attention_residual)
                            : rows(d_x1);
  gw.attn_c_proj_weight = k.matmul(d_proj.t(), rows(s.attn));  // [C, C]
  gw.attn_c_proj_bias = d.attention_residual.active() ? k.bias_grad(d_proj) : d_x1_sum;
  Tensor d_attn = k.matmul(d_proj, w.attn_c_proj_weight).view_as(s.attn);

  // Attention, then c_attn: qkv = ln_1 @ W^T + b.
  Tensor d_qkv =
      k.causal_attention_backward(d_attn, s.qkv, s.attn, s.lse, n_head, d.attention);
  d_attn.reset();
  gw.c_attn_bias = k.bias_grad(rows(d_qkv));
  auto [ln_1, mean_1, rstd_1] =
      k.layer_norm_forward(x, w.ln_1_weight, w.ln_1_bias, kLayerNormEps);  // recomputed
  gw.c_attn_weight = k.matmul(rows(d_qkv).t(), rows(ln_1));  // [3C, C]
  ln_1.reset();
  Tensor d_ln_1 = k.matmul(rows(d_qkv), w.c_attn_weight).view_as(x);
  d_qkv.reset();

  // ln_1, plus the residual: dx = d_x1 + ln_1's input gradient.
  std::tie(g.x, gw.ln_1_weight, gw.ln_1_bias, std::ignore, std::ignore) =
      k.layer_norm_backward(d_ln_1, x, w.ln_1_weight, mean_1, rstd_1, d_x1,
                            /*column_sums=*/false);
  return g;
}

}  // namespace nanoblock
