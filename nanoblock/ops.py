"""nanoblock's ops as Python functions, with fake kernels and autograd.

The compiled library (nanoblock._C) registers the ops `torch.ops.nanoblock.*`
with their CPU (and CUDA) kernels. This module adds, for each forward op, a
fake (meta) kernel so `torch.compile` can trace it, and an autograd formula
that calls the matching backward op. The public functions below are what the
modules in block.py call:

    layer_norm(x, weight, bias, eps)                 -> out
    add_layer_norm(x, residual, weight, bias, eps)   -> (x + residual, out)
    causal_attention(qkv, n_head, dropout_p)         -> out [B, T, C]
    bias_gelu(x, bias, approximate)                  -> gelu(x + bias)
    block(x, params, n_head, approximate, dropout_p) -> the whole Block

Dropout: the ops take dropout_p and rng, an int64 tensor [2] = (seed,
offset) that fixes every mask (csrc/kernel_api.h); the backward gets its
forward's rng, so it drops exactly what the forward dropped. The functions
below draw a fresh rng per call from the device's default generator
(dropout_rng), so torch.manual_seed makes runs reproducible and each call
gets new masks.
"""
import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.nanoblock)
except ImportError as e:
    raise ImportError(
        f"nanoblock's compiled ops could not be loaded ({e}). Build them against the torch "
        "you have, from the repository root: pip install --no-build-isolation -e . "
        "(after installing torch, and again whenever torch changes)") from e

_ops = torch.ops.nanoblock

# The twelve parameters of a Block, in nanoGPT's order and naming.
BLOCK_PARAM_NAMES = (
    "ln_1.weight", "ln_1.bias",
    "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
)


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# Fake kernels: output shapes and dtypes only, for tracing. Outputs are
# contiguous, as the real kernels make them (inputs are made contiguous first).

@torch.library.register_fake("nanoblock::layer_norm_forward")
def _(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=_stats_dtype(x.dtype))
    return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


@torch.library.register_fake("nanoblock::add_layer_norm_forward")
def _(x, residual, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=_stats_dtype(x.dtype))
    return x.new_empty(x.shape), x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


@torch.library.register_fake("nanoblock::layer_norm_backward")
def _(grad_out, x, weight, mean, rstd, grad_residual):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


@torch.library.register_fake("nanoblock::causal_attention_forward")
def _(qkv, n_head, dropout_p=0.0, rng=None):
    B, T, C3 = qkv.shape
    out = qkv.new_empty((B, T, C3 // 3))
    lse = qkv.new_empty((B, n_head, T), dtype=_stats_dtype(qkv.dtype))
    return out, lse


@torch.library.register_fake("nanoblock::causal_attention_backward")
def _(grad_out, qkv, out, lse, n_head, dropout_p=0.0, rng=None):
    return qkv.new_empty(qkv.shape)


@torch.library.register_fake("nanoblock::gelu_forward")
def _(x, bias, approximate):
    return x.new_empty(x.shape)


@torch.library.register_fake("nanoblock::gelu_backward")
def _(grad_out, x, bias, approximate):
    return x.new_empty(x.shape), x.new_empty((x.shape[-1],))


@torch.library.register_fake("nanoblock::block_forward")
def _(x, *args):
    B, T, C = x.shape
    n_head = args[12]
    return (
        x.new_empty(x.shape),                                         # out
        x.new_empty((B, T, 3 * C)),                                  # qkv
        x.new_empty((B, T, C)),                                      # attn
        x.new_empty((B, n_head, T), dtype=_stats_dtype(x.dtype)),    # lse
        x.new_empty((B, T, C)),                                      # x1
        x.new_empty((B, T, 4 * C)),                                  # fc
    )


@torch.library.register_fake("nanoblock::block_backward")
def _(grad_out, x, *args):
    params = args[:12]
    C = x.shape[-1]
    bias_shapes = (C, 3 * C, C, C, 4 * C, C)
    grads = [x.new_empty(x.shape)]
    for i, p in enumerate(params):
        if p is not None:
            grads.append(p.new_empty(p.shape))
        else:  # an absent bias still gets a gradient slot
            grads.append(x.new_empty((bias_shapes[i // 2],)))
    return tuple(grads)


# ---------------------------------------------------------------------------
# Autograd. The saved statistics (mean, rstd, lse) and the Block's saved
# activations are outputs only so that the backward can have them; they are
# marked non-differentiable.

def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    out, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    # Without this autograd fills a zero gradient for mean and rstd (two
    # kernels and two allocations) before every backward.
    ctx.set_materialize_grads(False)


def _layer_norm_backward(ctx, grad_out, grad_mean, grad_rstd):
    if grad_out is None:  # grads are not materialized; nothing reached out
        return None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    gx, gw, gb = _ops.layer_norm_backward(grad_out, x, weight, mean, rstd, None)
    return gx, gw, gb if ctx.has_bias else None, None


torch.library.register_autograd("nanoblock::layer_norm_forward", _layer_norm_backward,
                                setup_context=_layer_norm_setup)


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    total, out, mean, rstd = output
    ctx.save_for_backward(total, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # as for layer_norm_forward


def _add_layer_norm_backward(ctx, grad_sum, grad_out, grad_mean, grad_rstd):
    if grad_out is None:  # only the sum was used: the LayerNorm adds nothing
        return grad_sum, grad_sum, None, None, None
    total, weight, mean, rstd = ctx.saved_tensors
    # grad_sum (None when the sum was not used) is added to the LayerNorm's
    # input gradient inside the kernel.
    g_total, gw, gb = _ops.layer_norm_backward(grad_out, total, weight, mean, rstd, grad_sum)
    return g_total, g_total, gw, gb if ctx.has_bias else None, None


torch.library.register_autograd("nanoblock::add_layer_norm_forward", _add_layer_norm_backward,
                                setup_context=_add_layer_norm_setup)


def _attention_setup(ctx, inputs, output):
    qkv, n_head, dropout_p, rng = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, rng)
    ctx.n_head, ctx.dropout_p = n_head, dropout_p
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse


def _attention_backward(ctx, grad_out, grad_lse):
    if grad_out is None:  # grads are not materialized; nothing reached out
        return None, None, None, None
    qkv, out, lse, rng = ctx.saved_tensors
    grad_qkv = _ops.causal_attention_backward(grad_out, qkv, out, lse, ctx.n_head, ctx.dropout_p,
                                              rng)
    return grad_qkv, None, None, None


torch.library.register_autograd("nanoblock::causal_attention_forward", _attention_backward,
                                setup_context=_attention_setup)


def _gelu_setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _gelu_backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    gx, gb = _ops.gelu_backward(grad_out, x, bias, ctx.approximate)
    return gx, gb if bias is not None else None, None


torch.library.register_autograd("nanoblock::gelu_forward", _gelu_backward,
                                setup_context=_gelu_setup)


def _block_setup(ctx, inputs, output):
    x, *params = inputs[:13]
    ctx.n_head, ctx.approximate, ctx.dropout_p, rng = inputs[13:]
    out, qkv, attn, lse, x1, fc = output
    ctx.has_param = [p is not None for p in params]
    ctx.save_for_backward(x, *params, qkv, attn, lse, x1, fc, rng)
    ctx.mark_non_differentiable(qkv, attn, lse, x1, fc)
    # Without this autograd fills a zero gradient for each of those outputs
    # (9 C values per token) before every backward.
    ctx.set_materialize_grads(False)


def _block_backward(ctx, grad_out, *unused_grads):
    if grad_out is None:  # grads are not materialized; nothing reached out
        return (None,) * 17
    x, *rest = ctx.saved_tensors
    params, saved, rng = rest[:12], rest[12:17], rest[17]
    grads = _ops.block_backward(grad_out, x, *params, *saved, ctx.n_head, ctx.approximate,
                                ctx.dropout_p, rng)
    grad_params = [g if has else None for g, has in zip(grads[1:], ctx.has_param)]
    return (grads[0], *grad_params, None, None, None, None)


torch.library.register_autograd("nanoblock::block_forward", _block_backward,
                                setup_context=_block_setup)


# The backward ops have no derivative of their own. Without an autograd
# formula PyTorch would backpropagate zeros through them (with a warning), so
# a second derivative (create_graph=True, then backward again) would be
# silently wrong; it raises instead (csrc/ops.cpp, backward_op_autograd: in
# C++, so that the ordinary call costs no Python).

# ---------------------------------------------------------------------------
# Public functions.

def layer_norm(x, weight, bias=None, eps=1e-5):
    """LayerNorm over the last dim of x [..., C]."""
    return _ops.layer_norm_forward(x, weight, bias, eps)[0]


def add_layer_norm(x, residual, weight, bias=None, eps=1e-5):
    """Returns (x + residual, LayerNorm(x + residual)) in one pass."""
    total, out, _, _ = _ops.add_layer_norm_forward(x, residual, weight, bias, eps)
    return total, out


def dropout_rng(device):
    """A fresh rng = (seed, offset) for one call's dropout: int64 [2], drawn
    from the default generator of `device` by torch.randint, an ordinary
    random op that torch.compile traces and CUDA graphs capture."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def causal_attention(qkv, n_head, dropout_p=0.0, rng=None):
    """Causal self-attention of qkv [B, T, 3C] (q, k, v side by side, as c_attn
    makes them) -> [B, T, C], heads merged; the probabilities dropped with
    dropout_p (rng: drawn when not given)."""
    if dropout_p > 0 and rng is None:
        rng = dropout_rng(qkv.device)
    return _ops.causal_attention_forward(qkv, n_head, dropout_p, rng)[0]


def bias_gelu(x, bias=None, approximate="none"):
    """gelu(x + bias); approximate is 'none' (exact, erf) or 'tanh'."""
    return _ops.gelu_forward(x, bias, approximate)


def block(x, params, n_head, approximate="none", dropout_p=0.0, rng=None):
    """The whole Block on x [B, T, C]; params are the twelve tensors named in
    BLOCK_PARAM_NAMES, in that order (None for absent biases). dropout_p > 0:
    nanoGPT's three dropouts (rng: drawn when not given)."""
    if dropout_p > 0 and rng is None:
        rng = dropout_rng(x.device)
    return _ops.block_forward(x, *params, n_head, approximate, dropout_p, rng)[0]
