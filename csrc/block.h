// The whole Block as one forward and one backward, composed of one backend's
// kernels (kernels.h) and ATen GEMMs. Written once for every backend.
#pragma once

#include "kernels.h"

#include <tuple>

namespace nanoblock {

// nanoGPT's parameter names; a bias is undefined when the config has
// bias=False. Shapes for n_embd = C, nn.Linear layout [out, in]:
struct BlockWeights {
  Tensor ln_1_weight, ln_1_bias;            // [C]
  Tensor c_attn_weight, c_attn_bias;        // [3C, C], [3C]
  Tensor attn_c_proj_weight, attn_c_proj_bias;  // [C, C], [C]
  Tensor ln_2_weight, ln_2_bias;            // [C]
  Tensor c_fc_weight, c_fc_bias;            // [4C, C], [4C]
  Tensor mlp_c_proj_weight, mlp_c_proj_bias;    // [C, 4C], [C]
};

// What the forward keeps for the backward, besides x and the weights.
// LayerNorm outputs and statistics and the GELU output are recomputed.
struct BlockSaved {
  Tensor qkv;   // [B, T, 3C]  c_attn output
  Tensor attn;  // [B, T, C]   attention output, heads merged (c_proj input)
  Tensor lse;   // [B, n_head, T]  attention log-sum-exp (stats dtype)
  Tensor x1;    // [B, T, C]   x + attention branch (ln_2 input)
  Tensor fc;    // [B, T, 4C]  c_fc output before its bias (GELU input)
};

struct BlockGrads {
  Tensor x;
  BlockWeights weights;  // every bias gradient is computed, even for absent biases
};

// x [B, T, C] -> out [B, T, C] and what the backward needs. dropout_p > 0:
// nanoGPT's three dropouts, each with probability dropout_p, from
// rng [2] = (seed, offset) (kernel_api.h); the backward takes the same.
std::tuple<Tensor, BlockSaved> block_forward(const Kernels& k, const Tensor& x,
                                             const BlockWeights& w, int64_t n_head, bool tanh,
                                             double dropout_p, const Tensor& rng);

BlockGrads block_backward(const Kernels& k, const Tensor& grad_out, const Tensor& x,
                          const BlockWeights& w, const BlockSaved& saved, int64_t n_head,
                          bool tanh, double dropout_p, const Tensor& rng);

}  // namespace nanoblock
