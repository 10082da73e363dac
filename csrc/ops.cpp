// The op registry: every nanoblock op's schema, its argument checks (here and
// nowhere else), and its binding to each backend's kernels.
//
// Each op function below is a template over a backend's kernel table
// (kernels.h): it checks its arguments, makes the tensors contiguous and
// calls the kernels. TORCH_LIBRARY_IMPL binds the CPU instantiation to the
// CPU dispatch key and, when built with CUDA, the CUDA one to CUDA; the
// Autocast kernels are here too. autograd.cpp adds the Autograd kernels,
// nanoblock/ops.py the fake (meta) kernels.
#include <Python.h>
#include <ATen/DeviceGuard.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "block.h"
#include "check.h"

namespace nanoblock {

namespace {

using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------------------
// Argument checks. Every message names the op, the argument, what was
// expected and what came in.

// Messages are built from strings (check.h says why).
std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

struct Checker {
  const char* op;

  // The first tensor argument of an op: floating, a dtype this device's
  // kernels support, of rank `dim` (or at least 1 when dim < 0).
  void input(const Tensor& t, const char* name, int64_t dim) const {
    NANOBLOCK_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
    NANOBLOCK_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
                " must be a floating-point tensor, got dtype ", dtype_str(t.scalar_type()));
    const bool cpu = t.device().is_cpu();
    const auto dt = t.scalar_type();
    const bool supported = dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 ||
                           (!cpu && dt == at::kHalf);
    NANOBLOCK_CHECK(supported, op, ": ", name, " has dtype ", dtype_str(dt), ", which the ",
                cpu ? "CPU" : "CUDA", " kernels do not support (supported: ",
                cpu ? "torch.bfloat16, torch.float32, torch.float64"
                    : "torch.float16, torch.bfloat16, torch.float32, torch.float64",
                ")");
    if (dim >= 0) {
      NANOBLOCK_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dims, got shape ",
                  shape_str(t.sizes()));
    } else {
      NANOBLOCK_CHECK(t.dim() >= 1, op, ": ", name, " must have at least 1 dim, got a scalar");
    }
  }

  // Another tensor argument: same device and dtype as `ref` (the op's first
  // input), exactly the given shape.
  void like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name,
            at::IntArrayRef shape) const {
    NANOBLOCK_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
    NANOBLOCK_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(),
                " like ", ref_name, ", got ", t.device());
    NANOBLOCK_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ",
                dtype_str(ref.scalar_type()), " like ", ref_name, ", got ",
                dtype_str(t.scalar_type()));
    NANOBLOCK_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape_str(shape),
                ", got ", shape_str(t.sizes()));
  }

  void like(const OptTensor& t, const char* name, const Tensor& ref, const char* ref_name,
            at::IntArrayRef shape) const {
    if (t.has_value()) like(*t, name, ref, ref_name, shape);
  }

  // Saved statistics (mean, rstd, lse): the stats dtype of `ref`.
  void stats(const Tensor& t, const char* name, const Tensor& ref, at::IntArrayRef shape) const {
    NANOBLOCK_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
    NANOBLOCK_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(),
                ", got ", t.device());
    const auto want = stats_dtype(ref.scalar_type());
    NANOBLOCK_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", dtype_str(want),
                " (the statistics dtype for ", dtype_str(ref.scalar_type()), " inputs), got ",
                dtype_str(t.scalar_type()));
    NANOBLOCK_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape_str(shape),
                ", got ", shape_str(t.sizes()));
  }

  // The CUDA attention kernels keep a row of q in registers: head dims up to
  // kMaxCudaHeadDim.
  static constexpr int64_t kMaxCudaHeadDim = 128;

  // n_head heads must split n_embd = C evenly, into heads the device's
  // attention kernels support.
  void heads(int64_t C, int64_t n_head, const c10::Device& device) const {
    NANOBLOCK_CHECK(C > 0, op, ": n_embd (the last dim) must be positive, got ", C);
    NANOBLOCK_CHECK(n_head > 0, op, ": n_head must be positive, got ", n_head);
    NANOBLOCK_CHECK(C % n_head == 0, op, ": n_embd ", C, " is not divisible by n_head ", n_head);
    NANOBLOCK_CHECK(device.is_cpu() || C / n_head <= kMaxCudaHeadDim, op,
                    ": the CUDA kernels support head dims (n_embd / n_head) up to ",
                    kMaxCudaHeadDim, ", got ", C / n_head, " (n_embd ", C, ", n_head ", n_head,
                    ")");
  }

  // qkv [B, T, 3C] as c_attn makes it, split into n_head heads; returns C.
  int64_t qkv(const Tensor& t, int64_t n_head) const {
    input(t, "qkv", 3);
    NANOBLOCK_CHECK(t.size(2) % 3 == 0, op,
                    ": qkv must be [B, T, 3C] (q, k, v side by side), got last dim ", t.size(2),
                    ", which is not a multiple of 3");
    heads(t.size(2) / 3, n_head, t.device());
    return t.size(2) / 3;
  }

  // Dropout with probability p from rng (kernel_api.h), for tensors like
  // ref: p in [0, 1); with p > 0, rng an int64 [2] = (seed, offset) on ref's
  // device. Returns rng contiguous, or undefined when p == 0.
  Tensor dropout_rng(double p, const OptTensor& rng, const Tensor& ref) const {
    NANOBLOCK_CHECK(p >= 0 && p < 1, op, ": dropout_p must be in [0, 1), got ", p);
    if (p == 0) return Tensor();
    NANOBLOCK_CHECK(rng.has_value(), op, ": dropout_p = ", p,
                    " needs rng, an int64 tensor [2] = (seed, offset), got None");
    NANOBLOCK_CHECK(rng->scalar_type() == at::kLong, op, ": rng must have dtype torch.int64, got ",
                    dtype_str(rng->scalar_type()));
    NANOBLOCK_CHECK(rng->device() == ref.device(), op, ": rng must be on ", ref.device(),
                    ", got ", rng->device());
    NANOBLOCK_CHECK(rng->sizes() == at::IntArrayRef{2}, op,
                    ": rng must have shape [2] (seed, offset), got ", shape_str(rng->sizes()));
    return rng->contiguous();
  }

  bool approximate(const std::string& a) const {
    NANOBLOCK_CHECK(a == "none" || a == "tanh", op,
                ": approximate must be 'none' (exact erf GELU) or 'tanh', got '", a, "'");
    return a == "tanh";
  }
};

Tensor contiguous(const Tensor& t) { return t.contiguous(); }
Tensor contiguous(const OptTensor& t) { return t.has_value() ? t->contiguous() : Tensor(); }

at::IntArrayRef leading(const Tensor& t) { return t.sizes().slice(0, t.dim() - 1); }

// ---------------------------------------------------------------------------
// LayerNorm

template <const Kernels* K>
std::tuple<Tensor, Tensor, Tensor> layer_norm_forward_op(const Tensor& x, const Tensor& weight,
                                                         const OptTensor& bias, double eps) {
  const Checker check{"nanoblock.layer_norm_forward"};
  check.input(x, "x", -1);
  const at::OptionalDeviceGuard device_guard(at::device_of(x));
  const int64_t C = x.size(-1);
  check.like(weight, "weight", x, "x", {C});
  check.like(bias, "bias", x, "x", {C});
  NANOBLOCK_CHECK(eps > 0, check.op, ": eps must be positive, got ", eps);
  return K->layer_norm_forward(contiguous(x), contiguous(weight), contiguous(bias), eps);
}

template <const Kernels* K>
std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_forward_op(const Tensor& x,
                                                                     const Tensor& residual,
                                                                     const Tensor& weight,
                                                                     const OptTensor& bias,
                                                                     double eps) {
  const Checker check{"nanoblock.add_layer_norm_forward"};
  check.input(x, "x", -1);
  const at::OptionalDeviceGuard device_guard(at::device_of(x));
  const int64_t C = x.size(-1);
  check.like(residual, "residual", x, "x", x.sizes());
  check.like(weight, "weight", x, "x", {C});
  check.like(bias, "bias", x, "x", {C});
  NANOBLOCK_CHECK(eps > 0, check.op, ": eps must be positive, got ", eps);
  return K->add_layer_norm_forward(contiguous(x), contiguous(residual), contiguous(weight),
                                   contiguous(bias), eps, Dropout{});
}

template <const Kernels* K>
std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_op(const Tensor& grad_out,
                                                          const Tensor& x, const Tensor& weight,
                                                          const Tensor& mean, const Tensor& rstd,
                                                          const OptTensor& grad_residual) {
  const Checker check{"nanoblock.layer_norm_backward"};
  check.input(x, "x", -1);
  const at::OptionalDeviceGuard device_guard(at::device_of(x));
  const int64_t C = x.size(-1);
  check.like(grad_out, "grad_out", x, "x", x.sizes());
  check.like(weight, "weight", x, "x", {C});
  check.stats(mean, "mean", x, leading(x));
  check.stats(rstd, "rstd", x, leading(x));
  check.like(grad_residual, "grad_residual", x, "x", x.sizes());
  Tensor grad_x, grad_weight, grad_bias;
  std::tie(grad_x, grad_weight, grad_bias, std::ignore, std::ignore) = K->layer_norm_backward(
      contiguous(grad_out), contiguous(x), contiguous(weight), contiguous(mean), contiguous(rstd),
      contiguous(grad_residual), /*column_sums=*/false);
  return {grad_x, grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------
// Causal attention

template <const Kernels* K>
std::tuple<Tensor, Tensor> causal_attention_forward_op(const Tensor& qkv, int64_t n_head,
                                                       double dropout_p, const OptTensor& rng) {
  const Checker check{"nanoblock.causal_attention_forward"};
  check.qkv(qkv, n_head);
  const at::OptionalDeviceGuard device_guard(at::device_of(qkv));
  const Dropout dropout{dropout_p, check.dropout_rng(dropout_p, rng, qkv), kDropoutAttention};
  return K->causal_attention_forward(contiguous(qkv), n_head, dropout);
}

template <const Kernels* K>
Tensor causal_attention_backward_op(const Tensor& grad_out, const Tensor& qkv, const Tensor& out,
                                    const Tensor& lse, int64_t n_head, double dropout_p,
                                    const OptTensor& rng) {
  const Checker check{"nanoblock.causal_attention_backward"};
  const int64_t C = check.qkv(qkv, n_head);
  const at::OptionalDeviceGuard device_guard(at::device_of(qkv));
  const int64_t B = qkv.size(0), T = qkv.size(1);
  check.like(grad_out, "grad_out", qkv, "qkv", {B, T, C});
  check.like(out, "out", qkv, "qkv", {B, T, C});
  check.stats(lse, "lse", qkv, {B, n_head, T});
  const Dropout dropout{dropout_p, check.dropout_rng(dropout_p, rng, qkv), kDropoutAttention};
  return K->causal_attention_backward(contiguous(grad_out), contiguous(qkv), contiguous(out),
                                      contiguous(lse), n_head, dropout);
}

// ---------------------------------------------------------------------------
// GELU with the bias add

template <const Kernels* K>
Tensor gelu_forward_op(const Tensor& x, const OptTensor& bias, const std::string& approximate) {
  const Checker check{"nanoblock.gelu_forward"};
  check.input(x, "x", -1);
  const at::OptionalDeviceGuard device_guard(at::device_of(x));
  check.like(bias, "bias", x, "x", {x.size(-1)});
  const bool tanh = check.approximate(approximate);
  return K->gelu_forward(contiguous(x), contiguous(bias), tanh);
}

template <const Kernels* K>
std::tuple<Tensor, Tensor> gelu_backward_op(const Tensor& grad_out, const Tensor& x,
                                            const OptTensor& bias,
                                            const std::string& approximate) {
  const Checker check{"nanoblock.gelu_backward"};
  check.input(x, "x", -1);
  const at::OptionalDeviceGuard device_guard(at::device_of(x));
  check.like(grad_out, "grad_out", x, "x", x.sizes());
  check.like(bias, "bias", x, "x", {x.size(-1)});
  const bool tanh = check.approximate(approximate);
  Tensor grad_x = K->gelu_backward(contiguous(grad_out), contiguous(x), contiguous(bias), tanh);
  return {grad_x, K->bias_grad(grad_x)};
}

// ---------------------------------------------------------------------------
// The whole Block

// Checks x [B, T, C] and the twelve parameters of a Block against nanoGPT's
// shapes; returns them contiguous.
BlockWeights check_block_weights(
    const Checker& check, const Tensor& x, int64_t n_head, const Tensor& ln_1_weight,
    const OptTensor& ln_1_bias, const Tensor& c_attn_weight, const OptTensor& c_attn_bias,
    const Tensor& attn_c_proj_weight, const OptTensor& attn_c_proj_bias,
    const Tensor& ln_2_weight, const OptTensor& ln_2_bias, const Tensor& c_fc_weight,
    const OptTensor& c_fc_bias, const Tensor& mlp_c_proj_weight,
    const OptTensor& mlp_c_proj_bias) {
  check.input(x, "x", 3);
  const int64_t C = x.size(2);
  // The weights fix n_embd; say so when x does not fit them.
  NANOBLOCK_CHECK(!ln_1_weight.defined() || ln_1_weight.dim() != 1 || ln_1_weight.size(0) == C,
              check.op, ": x must be [B, T, n_embd] with n_embd = ", ln_1_weight.size(0),
              " (the size of ln_1.weight), got shape ", shape_str(x.sizes()));
  check.heads(C, n_head, x.device());
  check.like(ln_1_weight, "ln_1.weight", x, "x", {C});
  check.like(ln_1_bias, "ln_1.bias", x, "x", {C});
  check.like(c_attn_weight, "attn.c_attn.weight", x, "x", {3 * C, C});
  check.like(c_attn_bias, "attn.c_attn.bias", x, "x", {3 * C});
  check.like(attn_c_proj_weight, "attn.c_proj.weight", x, "x", {C, C});
  check.like(attn_c_proj_bias, "attn.c_proj.bias", x, "x", {C});
  check.like(ln_2_weight, "ln_2.weight", x, "x", {C});
  check.like(ln_2_bias, "ln_2.bias", x, "x", {C});
  check.like(c_fc_weight, "mlp.c_fc.weight", x, "x", {4 * C, C});
  check.like(c_fc_bias, "mlp.c_fc.bias", x, "x", {4 * C});
  check.like(mlp_c_proj_weight, "mlp.c_proj.weight", x, "x", {C, 4 * C});
  check.like(mlp_c_proj_bias, "mlp.c_proj.bias", x, "x", {C});
  return BlockWeights{contiguous(ln_1_weight),        contiguous(ln_1_bias),
                      contiguous(c_attn_weight),      contiguous(c_attn_bias),
                      contiguous(attn_c_proj_weight), contiguous(attn_c_proj_bias),
                      contiguous(ln_2_weight),        contiguous(ln_2_bias),
                      contiguous(c_fc_weight),        contiguous(c_fc_bias),
                      contiguous(mlp_c_proj_weight),  contiguous(mlp_c_proj_bias)};
}

template <const Kernels* K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> block_forward_op(
    const Tensor& x, const Tensor& ln_1_weight, const OptTensor& ln_1_bias,
    const Tensor& c_attn_weight, const OptTensor& c_attn_bias, const Tensor& attn_c_proj_weight,
    const OptTensor& attn_c_proj_bias, const Tensor& ln_2_weight, const OptTensor& ln_2_bias,
    const Tensor& c_fc_weight, const OptTensor& c_fc_bias, const Tensor& mlp_c_proj_weight,
    const OptTensor& mlp_c_proj_bias, int64_t n_head, const std::string& approximate,
    double dropout_p, const OptTensor& rng) {
  const Checker check{"nanoblock.block_forward"};
  const at::OptionalDeviceGuard device_guard(at::device_of(x));
  const BlockWeights w = check_block_weights(
      check, x, n_head, ln_1_weight, ln_1_bias, c_attn_weight, c_attn_bias, attn_c_proj_weight,
      attn_c_proj_bias, ln_2_weight, ln_2_bias, c_fc_weight, c_fc_bias, mlp_c_proj_weight,
      mlp_c_proj_bias);
  const bool tanh = check.approximate(approximate);
  const Tensor rng_checked = check.dropout_rng(dropout_p, rng, x);
  auto [out, s] = block_forward(*K, contiguous(x), w, n_head, tanh, dropout_p, rng_checked);
  return {out, s.qkv, s.attn, s.lse, s.x1, s.fc};
}

using BlockGradTuple = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                  Tensor, Tensor, Tensor, Tensor, Tensor>;

template <const Kernels* K>
BlockGradTuple block_backward_op(
    const Tensor& grad_out, const Tensor& x, const Tensor& ln_1_weight, const OptTensor& ln_1_bias,
    const Tensor& c_attn_weight, const OptTensor& c_attn_bias, const Tensor& attn_c_proj_weight,
    const OptTensor& attn_c_proj_bias, const Tensor& ln_2_weight, const OptTensor& ln_2_bias,
    const Tensor& c_fc_weight, const OptTensor& c_fc_bias, const Tensor& mlp_c_proj_weight,
    const OptTensor& mlp_c_proj_bias, const Tensor& qkv, const Tensor& attn, const Tensor& lse,
    const Tensor& x1, const Tensor& fc, int64_t n_head, const std::string& approximate,
    double dropout_p, const OptTensor& rng) {
  const Checker check{"nanoblock.block_backward"};
  const at::OptionalDeviceGuard device_guard(at::device_of(x));
  const BlockWeights w = check_block_weights(
      check, x, n_head, ln_1_weight, ln_1_bias, c_attn_weight, c_attn_bias, attn_c_proj_weight,
      attn_c_proj_bias, ln_2_weight, ln_2_bias, c_fc_weight, c_fc_bias, mlp_c_proj_weight,
      mlp_c_proj_bias);
  const bool tanh = check.approximate(approximate);
  const Tensor rng_checked = check.dropout_rng(dropout_p, rng, x);
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  check.like(grad_out, "grad_out", x, "x", x.sizes());
  check.like(qkv, "qkv", x, "x", {B, T, 3 * C});
  check.like(attn, "attn", x, "x", {B, T, C});
  check.stats(lse, "lse", x, {B, n_head, T});
  check.like(x1, "x1", x, "x", {B, T, C});
  check.like(fc, "fc", x, "x", {B, T, 4 * C});
  const BlockSaved saved{contiguous(qkv), contiguous(attn), contiguous(lse), contiguous(x1),
                         contiguous(fc)};
  const BlockGrads g = block_backward(*K, contiguous(grad_out), contiguous(x), w, saved, n_head,
                                      tanh, dropout_p, rng_checked);
  const BlockWeights& gw = g.weights;
  return {g.x,
          gw.ln_1_weight, gw.ln_1_bias, gw.c_attn_weight, gw.c_attn_bias,
          gw.attn_c_proj_weight, gw.attn_c_proj_bias, gw.ln_2_weight, gw.ln_2_bias,
          gw.c_fc_weight, gw.c_fc_bias, gw.mlp_c_proj_weight, gw.mlp_c_proj_bias};
}

// ---------------------------------------------------------------------------
// Autocast: the casts torch.autocast makes before a nanoblock forward op runs,
// as it makes them for PyTorch's own ops. Within an autocast region, the
// op's floating tensor arguments on the region's device are cast (float64
// ones never are), then the op runs with autocast off for that device:
//   - to float32: layer_norm_forward and add_layer_norm_forward, as autocast
//     does for torch's layer_norm;
//   - to the autocast dtype (bfloat16, or float16 on CUDA):
//     causal_attention_forward, gelu_forward, block_forward, as for matmul.
// The backward ops get no casts: autograd hands them what the forward saved.
// Casts are differentiable, so float32 parameters receive float32 gradients.

template <c10::DeviceType kDevice, bool kToFloat32>
void autocast_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const at::ScalarType dtype = kToFloat32 ? at::kFloat : at::autocast::get_autocast_dtype(kDevice);
  const size_t n_args = op.schema().arguments().size();
  for (auto arg = stack->end() - n_args; arg != stack->end(); ++arg) {
    if (arg->isTensor()) *arg = at::autocast::cached_cast(dtype, arg->toTensor(), kDevice);
  }
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  op.callBoxed(stack);
}

}  // namespace

// ---------------------------------------------------------------------------
// Schemas. Parameter names follow nanoGPT's Block. Biases are optional
// (bias=False); the backward ops return a gradient for every bias slot.
// Dropout: dropout_p and rng = (seed, offset), an int64 tensor [2] on the
// op's device (kernel_api.h); they come last with defaults (no dropout), so
// calls written before dropout existed still work. A backward op takes its
// forward's dropout_p and rng.

#define NANOBLOCK_BLOCK_PARAMS                                                        \
  "Tensor ln_1_weight, Tensor? ln_1_bias, Tensor c_attn_weight, Tensor? c_attn_bias, " \
  "Tensor attn_c_proj_weight, Tensor? attn_c_proj_bias, Tensor ln_2_weight, "         \
  "Tensor? ln_2_bias, Tensor c_fc_weight, Tensor? c_fc_bias, "                        \
  "Tensor mlp_c_proj_weight, Tensor? mlp_c_proj_bias"

#define NANOBLOCK_DROPOUT_PARAMS "float dropout_p=0., Tensor? rng=None"

// A process setting of the CUDA kernels (kernels.h) with two values, `on`
// (the default) and `off`, as an op: sets it to `use` if given (None only
// asks) and returns it as it was before. Not an op on tensors; tests and
// benchmarks use these to run both paths in one process. `allowed` and
// `allow` are null in a build without CUDA: nothing to set, it stays `on`.
std::string kernel_setting(const char* op, const std::optional<std::string>& use,
                           const char* on, const char* off, bool (*allowed)(),
                           void (*allow)(bool)) {
  NANOBLOCK_CHECK(!use || *use == on || *use == off, "nanoblock.", op, ": use must be '", on,
                  "' or '", off, "', got '", *use, "'");
  if (allowed == nullptr) return on;
  const std::string before = allowed() ? on : off;
  if (use) allow(*use == on);
  return before;
}

// nanoblock::attention_kernels(use): which kernels the CUDA attention may
// take, "auto" (Hopper's wgmma ones where they apply) or "mma" (never
// wgmma).
std::string attention_kernels(std::optional<std::string> use) {
#ifdef NANOBLOCK_WITH_CUDA
  return kernel_setting("attention_kernels", use, "auto", "mma", &cuda::wgmma_attention_allowed,
                        &cuda::allow_wgmma_attention);
#else
  return kernel_setting("attention_kernels", use, "auto", "mma", nullptr, nullptr);
#endif
}

// nanoblock::gemm_kernels(use): which path the float16 / bfloat16 CUDA GEMMs
// take, "cublaslt" (cuBLASLt with cached plans where it applies) or "aten"
// (ATen's mm / addmm always).
std::string gemm_kernels(std::optional<std::string> use) {
#ifdef NANOBLOCK_WITH_CUDA
  return kernel_setting("gemm_kernels", use, "cublaslt", "aten", &cuda::cublaslt_gemm_allowed,
                        &cuda::allow_cublaslt_gemm);
#else
  return kernel_setting("gemm_kernels", use, "cublaslt", "aten", nullptr, nullptr);
#endif
}

// nanoblock::wgmma_attention_available(): whether the current CUDA device
// runs this build's wgmma attention kernels (False without CUDA).
bool wgmma_attention_available() {
#ifdef NANOBLOCK_WITH_CUDA
  return cuda::wgmma_attention_available();
#else
  return false;
#endif
}

TORCH_LIBRARY(nanoblock, m) {
  m.def("attention_kernels(str? use=None) -> str", &attention_kernels);
  m.def("gemm_kernels(str? use=None) -> str", &gemm_kernels);
  m.def("wgmma_attention_available() -> bool", &wgmma_attention_available);
  m.def("layer_norm_forward(Tensor x, Tensor weight, Tensor? bias, float eps) "
        "-> (Tensor out, Tensor mean, Tensor rstd)");
  m.def("add_layer_norm_forward(Tensor x, Tensor residual, Tensor weight, Tensor? bias, "
        "float eps) -> (Tensor sum, Tensor out, Tensor mean, Tensor rstd)");
  m.def("layer_norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, "
        "Tensor rstd, Tensor? grad_residual) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("causal_attention_forward(Tensor qkv, int n_head, " NANOBLOCK_DROPOUT_PARAMS
        ") -> (Tensor out, Tensor lse)");
  m.def("causal_attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, "
        "int n_head, " NANOBLOCK_DROPOUT_PARAMS ") -> Tensor grad_qkv");
  m.def("gelu_forward(Tensor x, Tensor? bias, str approximate) -> Tensor");
  m.def("gelu_backward(Tensor grad_out, Tensor x, Tensor? bias, str approximate) "
        "-> (Tensor grad_x, Tensor grad_bias)");
  m.def("block_forward(Tensor x, " NANOBLOCK_BLOCK_PARAMS ", int n_head, str approximate, "
        NANOBLOCK_DROPOUT_PARAMS
        ") -> (Tensor out, Tensor qkv, Tensor attn, Tensor lse, Tensor x1, Tensor fc)");
  m.def("block_backward(Tensor grad_out, Tensor x, " NANOBLOCK_BLOCK_PARAMS
        ", Tensor qkv, Tensor attn, Tensor lse, Tensor x1, Tensor fc, int n_head, "
        "str approximate, " NANOBLOCK_DROPOUT_PARAMS
        ") -> (Tensor grad_x, Tensor grad_ln_1_weight, "
        "Tensor grad_ln_1_bias, Tensor grad_c_attn_weight, Tensor grad_c_attn_bias, "
        "Tensor grad_attn_c_proj_weight, Tensor grad_attn_c_proj_bias, "
        "Tensor grad_ln_2_weight, Tensor grad_ln_2_bias, Tensor grad_c_fc_weight, "
        "Tensor grad_c_fc_bias, Tensor grad_mlp_c_proj_weight, Tensor grad_mlp_c_proj_bias)");
}

#define NANOBLOCK_BIND(m, table)                                                  \
  m.impl("layer_norm_forward", &layer_norm_forward_op<&table>);                   \
  m.impl("add_layer_norm_forward", &add_layer_norm_forward_op<&table>);           \
  m.impl("layer_norm_backward", &layer_norm_backward_op<&table>);                 \
  m.impl("causal_attention_forward", &causal_attention_forward_op<&table>);       \
  m.impl("causal_attention_backward", &causal_attention_backward_op<&table>);     \
  m.impl("gelu_forward", &gelu_forward_op<&table>);                               \
  m.impl("gelu_backward", &gelu_backward_op<&table>);                             \
  m.impl("block_forward", &block_forward_op<&table>);                             \
  m.impl("block_backward", &block_backward_op<&table>)

TORCH_LIBRARY_IMPL(nanoblock, CPU, m) { NANOBLOCK_BIND(m, cpu_kernels); }

#ifdef NANOBLOCK_WITH_CUDA
TORCH_LIBRARY_IMPL(nanoblock, CUDA, m) { NANOBLOCK_BIND(m, cuda_kernels); }
#endif

#define NANOBLOCK_AUTOCAST(m, device)                                                      \
  m.impl("layer_norm_forward",                                                             \
         torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<device, true>>());      \
  m.impl("add_layer_norm_forward",                                                         \
         torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<device, true>>());      \
  m.impl("causal_attention_forward",                                                       \
         torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<device, false>>());     \
  m.impl("gelu_forward",                                                                   \
         torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<device, false>>());     \
  m.impl("block_forward",                                                                  \
         torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<device, false>>())

TORCH_LIBRARY_IMPL(nanoblock, AutocastCPU, m) { NANOBLOCK_AUTOCAST(m, c10::DeviceType::CPU); }

#ifdef NANOBLOCK_WITH_CUDA
TORCH_LIBRARY_IMPL(nanoblock, AutocastCUDA, m) { NANOBLOCK_AUTOCAST(m, c10::DeviceType::CUDA); }
#endif

}  // namespace nanoblock

// Importing nanoblock._C loads this library, which registers the ops above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "nanoblock's compiled ops (torch.ops.nanoblock)", -1, nullptr};
  return PyModule_Create(&module);
}
