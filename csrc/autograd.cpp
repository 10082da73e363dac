// Autograd of every nanoblock op: the kernels registered for the Autograd
// dispatch key. In C++ rather than torch.library.register_autograd's Python
// wrapper, which costs host time on every call (at small shapes it was the
// largest host cost of a Block's step).
//
// Forward ops: a torch::autograd::Function each. Its forward calls the op
// below autograd (at::AutoDispatchBelowADInplaceOrView), so the CPU/CUDA
// kernels or, under torch.compile, the fake kernels (nanoblock/ops.py) run;
// its backward calls the matching backward op through the dispatcher.
// torch.autocast's casts (ops.cpp) come before this key, so the Function sees
// the cast tensors and the casts' own nodes carry the gradients back to the
// caller's dtype. Every backward returns one gradient per forward argument:
// undefined (None) for an absent bias and for non-tensor arguments.
//
// The saved statistics (mean, rstd, lse) and the Block's saved activations are
// the op's outputs only so that the backward can have them; they get no
// gradient. The Function does not return them (nor mark them
// non-differentiable, which compiled autograd refuses for a C++ Function:
// CppNode::compiled_args asserts that none is marked); its forward hands them
// back through its last argument, a `NoGrad*`, and the op returns them beside
// the Function's outputs. So they have no autograd history (requires_grad
// false), as marked outputs would, and the backward receives gradients for the
// differentiable outputs only.
//
// Compiled autograd (torch._dynamo.compiled_autograd) traces each Function's
// backward into its graph (is_traceable): a backward reads nothing but its
// gradients, its saved tensors and ctx->saved_data, which compiled autograd
// collects, and calls the backward ops, whose fake kernels trace.
//
// Backward ops: no derivative of their own. They run inside the forward ops'
// backward, where grad mode is off unless the caller asked for
// create_graph=True. Then their outputs get a node that raises when a second
// derivative is taken, rather than silently giving zeros.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace nanoblock {

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

// The op nanoblock::`name`, to call with the C++ signature Sig (the one its
// kernels in ops.cpp are registered with; the dispatcher checks it).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Calls op with the Autograd keys skipped: the next kernel (backend, fake,
// functionalization) runs, and its outputs get no autograd history here.
template <typename Sig, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Sig>& op, const Args&... args) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(args...);
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// Whether autograd has to record a call with these arguments: grad mode on
// and some tensor argument requires grad.
bool requires_grad(const Tensor& t) { return t.requires_grad(); }
bool requires_grad(const OptTensor& t) { return present(t) && t->requires_grad(); }
template <typename... Ts>
bool records(const Ts&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

// A saved optional tensor (undefined when it was None) as the op takes it.
OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The outputs of an op that get no gradient, filled in by its Function's
// forward (see the top of this file). A pointer is not a tensor, so
// Function::apply takes it as a non-tensor argument (its gradient: undefined).
using NoGrad = variable_list;

// ---------------------------------------------------------------------------
// LayerNorm

using LayerNormForward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                             const OptTensor&, double);
using AddLayerNormForward = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double);
using LayerNormBackward = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&);

const c10::TypedOperatorHandle<LayerNormBackward>& layer_norm_backward_op() {
  static const auto op = find_op<LayerNormBackward>("nanoblock::layer_norm_backward");
  return op;
}

struct LayerNormFunction : torch::autograd::Function<LayerNormFunction> {
  static constexpr bool is_traceable = true;  // for compiled autograd (top of this file)
  // no_grad <- mean, rstd.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const OptTensor& bias, double eps, NoGrad* no_grad) {
    static const auto op = find_op<LayerNormForward>("nanoblock::layer_norm_forward");
    auto [out, mean, rstd] = call_below_autograd(op, x, weight, bias, eps);
    ctx->save_for_backward({x, weight, mean, rstd});
    ctx->saved_data["has_bias"] = present(bias);
    ctx->set_materialize_grads(false);  // an undefined grad_out stays so (no zero fill)
    *no_grad = {mean, rstd};
    return {out};
  }

  // grads: out (undefined: grads are not materialized).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(5);  // nothing reached out
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_x, grad_weight, grad_bias] = layer_norm_backward_op().call(
        grads[0], saved[0], saved[1], saved[2], saved[3], std::nullopt);
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    return {grad_x, grad_weight, has_bias ? grad_bias : Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward_autograd(const Tensor& x,
                                                               const Tensor& weight,
                                                               const OptTensor& bias,
                                                               double eps) {
  if (!records(x, weight, bias)) {
    static const auto op = find_op<LayerNormForward>("nanoblock::layer_norm_forward");
    return call_below_autograd(op, x, weight, bias, eps);
  }
  NoGrad no_grad;
  const variable_list outs = LayerNormFunction::apply(x, weight, bias, eps, &no_grad);
  return {outs[0], no_grad[0], no_grad[1]};
}

// x + residual, then LayerNorm: the backward adds the sum's own gradient
// (grad_residual of layer_norm_backward) and hands the total to both inputs.
struct AddLayerNormFunction : torch::autograd::Function<AddLayerNormFunction> {
  static constexpr bool is_traceable = true;  // for compiled autograd (top of this file)
  // no_grad <- mean, rstd.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& residual,
                               const Tensor& weight, const OptTensor& bias, double eps,
                               NoGrad* no_grad) {
    static const auto op = find_op<AddLayerNormForward>("nanoblock::add_layer_norm_forward");
    auto [sum, out, mean, rstd] = call_below_autograd(op, x, residual, weight, bias, eps);
    ctx->save_for_backward({sum, weight, mean, rstd});
    ctx->saved_data["has_bias"] = present(bias);
    // Without this autograd fills a zero gradient for whichever of sum and out
    // was not used (a kernel and an allocation) before the backward.
    ctx->set_materialize_grads(false);
    *no_grad = {mean, rstd};
    return {sum, out};
  }

  // grads: sum, out (undefined: grads are not materialized).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[1].defined()) {  // only the sum was used: the LayerNorm adds nothing
      return {grads[0], grads[0], Tensor(), Tensor(), Tensor(), Tensor()};
    }
    const variable_list saved = ctx->get_saved_variables();
    // grads[0] (undefined when the sum was not used) is added to the
    // LayerNorm's input gradient inside the kernel.
    auto [grad_sum, grad_weight, grad_bias] = layer_norm_backward_op().call(
        grads[1], saved[0], saved[1], saved[2], saved[3], optional(grads[0]));
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    return {grad_sum, grad_sum, grad_weight, has_bias ? grad_bias : Tensor(), Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_forward_autograd(
    const Tensor& x, const Tensor& residual, const Tensor& weight, const OptTensor& bias,
    double eps) {
  if (!records(x, residual, weight, bias)) {
    static const auto op = find_op<AddLayerNormForward>("nanoblock::add_layer_norm_forward");
    return call_below_autograd(op, x, residual, weight, bias, eps);
  }
  NoGrad no_grad;
  const variable_list outs =
      AddLayerNormFunction::apply(x, residual, weight, bias, eps, &no_grad);
  return {outs[0], outs[1], no_grad[0], no_grad[1]};
}

// ---------------------------------------------------------------------------
// Causal attention

using AttentionForward = std::tuple<Tensor, Tensor>(const Tensor&, int64_t, double,
                                                    const OptTensor&);
using AttentionBackward = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 int64_t, double, const OptTensor&);

struct AttentionFunction : torch::autograd::Function<AttentionFunction> {
  static constexpr bool is_traceable = true;  // for compiled autograd (top of this file)
  // no_grad <- lse.
  static variable_list forward(AutogradContext* ctx, const Tensor& qkv, int64_t n_head,
                               double dropout_p, const OptTensor& rng, NoGrad* no_grad) {
    static const auto op = find_op<AttentionForward>("nanoblock::causal_attention_forward");
    auto [out, lse] = call_below_autograd(op, qkv, n_head, dropout_p, rng);
    // rng: the forward's, so the backward drops what the forward dropped.
    ctx->save_for_backward({qkv, out, lse, present(rng) ? *rng : Tensor()});
    ctx->saved_data["n_head"] = n_head;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->set_materialize_grads(false);  // an undefined grad_out stays so (no zero fill)
    *no_grad = {lse};
    return {out};
  }

  // grads: out (undefined: grads are not materialized).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(5);  // nothing reached out
    static const auto op = find_op<AttentionBackward>("nanoblock::causal_attention_backward");
    const variable_list saved = ctx->get_saved_variables();
    Tensor grad_qkv = op.call(grads[0], saved[0], saved[1], saved[2],
                              ctx->saved_data["n_head"].toInt(),
                              ctx->saved_data["dropout_p"].toDouble(), optional(saved[3]));
    return {grad_qkv, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> causal_attention_forward_autograd(const Tensor& qkv, int64_t n_head,
                                                             double dropout_p,
                                                             const OptTensor& rng) {
  if (!records(qkv)) {
    static const auto op = find_op<AttentionForward>("nanoblock::causal_attention_forward");
    return call_below_autograd(op, qkv, n_head, dropout_p, rng);
  }
  NoGrad no_grad;
  const variable_list outs = AttentionFunction::apply(qkv, n_head, dropout_p, rng, &no_grad);
  return {outs[0], no_grad[0]};
}

// ---------------------------------------------------------------------------
// GELU with the bias add

using GeluForward = Tensor(const Tensor&, const OptTensor&, const std::string&);
using GeluBackward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                const std::string&);

struct GeluFunction : torch::autograd::Function<GeluFunction> {
  static constexpr bool is_traceable = true;  // for compiled autograd (top of this file)
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& bias,
                               const std::string& approximate) {
    static const auto op = find_op<GeluForward>("nanoblock::gelu_forward");
    Tensor out = call_below_autograd(op, x, bias, approximate);
    ctx->save_for_backward({x, present(bias) ? *bias : Tensor()});
    ctx->saved_data["approximate"] = approximate;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<GeluBackward>("nanoblock::gelu_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& bias = saved[1];
    auto [grad_x, grad_bias] = op.call(grads[0], saved[0], optional(bias),
                                       ctx->saved_data["approximate"].toStringRef());
    return {grad_x, bias.defined() ? grad_bias : Tensor(), Tensor()};
  }
};

Tensor gelu_forward_autograd(const Tensor& x, const OptTensor& bias,
                             const std::string& approximate) {
  if (!records(x, bias)) {
    static const auto op = find_op<GeluForward>("nanoblock::gelu_forward");
    return call_below_autograd(op, x, bias, approximate);
  }
  return GeluFunction::apply(x, bias, approximate)[0];
}

// ---------------------------------------------------------------------------
// The whole Block

// The twelve parameters of a Block, in the schema's order (ops.cpp).
#define NANOBLOCK_BLOCK_PARAM_TYPES                                                        \
  const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&,         \
      const OptTensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, \
      const Tensor&, const OptTensor&

using BlockForward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, NANOBLOCK_BLOCK_PARAM_TYPES, int64_t, const std::string&, double,
    const OptTensor&);
using BlockBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                 Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, NANOBLOCK_BLOCK_PARAM_TYPES, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, int64_t, const std::string&, double,
    const OptTensor&);

struct BlockFunction : torch::autograd::Function<BlockFunction> {
  static constexpr bool is_traceable = true;  // for compiled autograd (top of this file)
  // no_grad <- qkv, attn, lse, x1, fc (the saved activations).
  static variable_list forward(
      AutogradContext* ctx, const Tensor& x, const Tensor& ln_1_weight,
      const OptTensor& ln_1_bias, const Tensor& c_attn_weight, const OptTensor& c_attn_bias,
      const Tensor& attn_c_proj_weight, const OptTensor& attn_c_proj_bias,
      const Tensor& ln_2_weight, const OptTensor& ln_2_bias, const Tensor& c_fc_weight,
      const OptTensor& c_fc_bias, const Tensor& mlp_c_proj_weight,
      const OptTensor& mlp_c_proj_bias, int64_t n_head, const std::string& approximate,
      double dropout_p, const OptTensor& rng, NoGrad* no_grad) {
    static const auto op = find_op<BlockForward>("nanoblock::block_forward");
    auto [out, qkv, attn, lse, x1, fc] = call_below_autograd(
        op, x, ln_1_weight, ln_1_bias, c_attn_weight, c_attn_bias, attn_c_proj_weight,
        attn_c_proj_bias, ln_2_weight, ln_2_bias, c_fc_weight, c_fc_bias, mlp_c_proj_weight,
        mlp_c_proj_bias, n_head, approximate, dropout_p, rng);
    // An absent bias is saved as an undefined tensor; the backward gives it
    // no gradient.
    auto saved_bias = [](const OptTensor& b) { return present(b) ? *b : Tensor(); };
    ctx->save_for_backward({x, ln_1_weight, saved_bias(ln_1_bias), c_attn_weight,
                            saved_bias(c_attn_bias), attn_c_proj_weight,
                            saved_bias(attn_c_proj_bias), ln_2_weight, saved_bias(ln_2_bias),
                            c_fc_weight, saved_bias(c_fc_bias), mlp_c_proj_weight,
                            saved_bias(mlp_c_proj_bias), qkv, attn, lse, x1, fc,
                            saved_bias(rng)});
    ctx->saved_data["n_head"] = n_head;
    ctx->saved_data["approximate"] = approximate;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->set_materialize_grads(false);  // an undefined grad_out stays so (no zero fill)
    *no_grad = {qkv, attn, lse, x1, fc};
    return {out};
  }

  // grads: out (undefined: grads are not materialized).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // x, 12 params, n_head, approximate, dropout_p, rng, no_grad
    constexpr size_t kNumArgs = 18;
    if (!grads[0].defined()) return variable_list(kNumArgs);  // nothing reached out
    static const auto op = find_op<BlockBackward>("nanoblock::block_backward");
    const variable_list s = ctx->get_saved_variables();
    // s: x, the 12 params (undefined: absent bias), qkv, attn, lse, x1, fc, rng.
    const auto g = op.call(
        grads[0], s[0], s[1], optional(s[2]), s[3], optional(s[4]), s[5], optional(s[6]), s[7],
        optional(s[8]), s[9], optional(s[10]), s[11], optional(s[12]), s[13], s[14], s[15],
        s[16], s[17], ctx->saved_data["n_head"].toInt(),
        ctx->saved_data["approximate"].toStringRef(), ctx->saved_data["dropout_p"].toDouble(),
        optional(s[18]));
    variable_list result = {std::get<0>(g),  std::get<1>(g),  std::get<2>(g),  std::get<3>(g),
                            std::get<4>(g),  std::get<5>(g),  std::get<6>(g),  std::get<7>(g),
                            std::get<8>(g),  std::get<9>(g),  std::get<10>(g), std::get<11>(g),
                            std::get<12>(g)};
    for (size_t i = 1; i <= 12; i++) {
      if (!s[i].defined()) result[i] = Tensor();  // an absent bias
    }
    result.resize(kNumArgs);  // n_head, approximate, dropout_p, rng, no_grad: none
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> block_forward_autograd(
    const Tensor& x, const Tensor& ln_1_weight, const OptTensor& ln_1_bias,
    const Tensor& c_attn_weight, const OptTensor& c_attn_bias, const Tensor& attn_c_proj_weight,
    const OptTensor& attn_c_proj_bias, const Tensor& ln_2_weight, const OptTensor& ln_2_bias,
    const Tensor& c_fc_weight, const OptTensor& c_fc_bias, const Tensor& mlp_c_proj_weight,
    const OptTensor& mlp_c_proj_bias, int64_t n_head, const std::string& approximate,
    double dropout_p, const OptTensor& rng) {
  if (!records(x, ln_1_weight, ln_1_bias, c_attn_weight, c_attn_bias, attn_c_proj_weight,
               attn_c_proj_bias, ln_2_weight, ln_2_bias, c_fc_weight, c_fc_bias,
               mlp_c_proj_weight, mlp_c_proj_bias, rng)) {
    static const auto op = find_op<BlockForward>("nanoblock::block_forward");
    return call_below_autograd(op, x, ln_1_weight, ln_1_bias, c_attn_weight, c_attn_bias,
                               attn_c_proj_weight, attn_c_proj_bias, ln_2_weight, ln_2_bias,
                               c_fc_weight, c_fc_bias, mlp_c_proj_weight, mlp_c_proj_bias,
                               n_head, approximate, dropout_p, rng);
  }
  NoGrad no_grad;
  const Tensor out = BlockFunction::apply(
      x, ln_1_weight, ln_1_bias, c_attn_weight, c_attn_bias, attn_c_proj_weight,
      attn_c_proj_bias, ln_2_weight, ln_2_bias, c_fc_weight, c_fc_bias, mlp_c_proj_weight,
      mlp_c_proj_bias, n_head, approximate, dropout_p, rng, &no_grad)[0];
  return {out, no_grad[0], no_grad[1], no_grad[2], no_grad[3], no_grad[4]};
}

// ---------------------------------------------------------------------------
// Backward ops: a node that raises on a second derivative. Its pointer type
// is std::shared_ptr in older torch and c10::intrusive_ptr in newer.

using NodePtr = decltype(torch::autograd::Edge::function);

template <typename Ptr>
Ptr make_error_node(std::string msg, torch::autograd::edge_list next_edges) {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<torch::autograd::Error>(std::move(msg), std::move(next_edges));
  } else {
    return c10::make_intrusive<torch::autograd::Error>(std::move(msg), std::move(next_edges));
  }
}

void backward_op_autograd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t n_args = op.schema().arguments().size();
  std::vector<Tensor> need_grad;
  if (at::GradMode::is_enabled()) {
    for (const c10::IValue& arg : torch::jit::last(*stack, n_args)) {
      if (arg.isTensor() && arg.toTensor().requires_grad()) need_grad.push_back(arg.toTensor());
    }
  }
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.callBoxed(stack);
  }
  if (need_grad.empty()) return;
  const NodePtr no_second_derivative = make_error_node<NodePtr>(
      "nanoblock: second derivatives (backward through a gradient computed with "
      "create_graph=True) are not implemented by nanoblock's ops (" + op.schema().name() +
          "). Use the reference Block (nanoblock.reference.ReferenceBlock) where you need them.",
      torch::autograd::collect_next_edges(need_grad));
  const size_t n_outputs = op.schema().returns().size();
  for (const c10::IValue& out : torch::jit::last(*stack, n_outputs)) {
    if (out.isTensor() && at::isFloatingType(out.toTensor().scalar_type())) {
      torch::autograd::set_history(out.toTensor(), no_second_derivative);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(nanoblock, Autograd, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_autograd);
  m.impl("add_layer_norm_forward", &add_layer_norm_forward_autograd);
  m.impl("causal_attention_forward", &causal_attention_forward_autograd);
  m.impl("gelu_forward", &gelu_forward_autograd);
  m.impl("block_forward", &block_forward_autograd);
  for (const char* name : {"layer_norm_backward", "causal_attention_backward", "gelu_backward",
                           "block_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&backward_op_autograd>());
  }
}

}  // namespace nanoblock
