"""bfloat16 on the CPU: every op and the whole Block, forward and gradients.

Rule (FlashAttention's, DESIGN.md): measured against float64 on the same
bfloat16-rounded inputs, nanoblock's error is at most twice the error that
PyTorch's own ops (for the Block: the reference Block) make in bfloat16.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from nanoblock import ops

from conftest import block_pair, forward_backward, make_config, rel_err, sdpa_attention

bf16, f64 = torch.bfloat16, torch.float64


def outputs_and_grads(fn, inputs, dtype, seed=0):
    """fn(*inputs cast to dtype) -> its outputs and the gradients of every
    input, for random output gradients (the same for every dtype)."""
    xs = [t.to(dtype).detach().requires_grad_(True) if t is not None else None for t in inputs]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=g, dtype=f64).to(dtype) for o in outs]
    wrt = [x for x in xs if x is not None]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, wrt, grads))


def assert_within_2x_of_pytorch(nanoblock_fn, pytorch_fn, inputs):
    """Inputs are rounded to bfloat16 first, so float64 sees the same values."""
    inputs = [t.to(bf16).to(f64) if t is not None else None for t in inputs]
    exact = outputs_and_grads(pytorch_fn, inputs, f64)
    ours = outputs_and_grads(nanoblock_fn, inputs, bf16)
    theirs = outputs_and_grads(pytorch_fn, inputs, bf16)
    for i, (a, b, e) in enumerate(zip(ours, theirs, exact)):
        assert a.dtype == bf16, i
        err, ref_err = rel_err(a, e), rel_err(b, e)
        assert err <= 2 * ref_err + 1e-5, f"tensor {i}: nanoblock {err:.2e}, pytorch {ref_err:.2e}"


def rand(*shape, scale=1.0, shift=0.0):
    return torch.randn(shape, dtype=f64) * scale + shift


@pytest.mark.parametrize("shape", [(3, 7, 97), (1, 1, 40), (130, 384)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(shape, bias):
    C = shape[-1]
    inputs = [rand(*shape, scale=3, shift=1), rand(C, shift=1), rand(C) if bias else None]
    assert_within_2x_of_pytorch(
        lambda x, w, b: ops.layer_norm(x, w, b),
        lambda x, w, b: F.layer_norm(x, (C,), w, b, 1e-5), inputs)


def test_add_layer_norm():
    inputs = [rand(2, 9, 120), rand(2, 9, 120), rand(120, shift=1), rand(120)]
    assert_within_2x_of_pytorch(
        lambda x, r, w, b: ops.add_layer_norm(x, r, w, b),
        lambda x, r, w, b: (x + r, F.layer_norm(x + r, (120,), w, b, 1e-5)), inputs)


@pytest.mark.parametrize("B,T,C,n_head", [(2, 1, 64, 4), (2, 97, 96, 3), (1, 130, 120, 5),
                                          (1, 300, 128, 1)])
def test_causal_attention(B, T, C, n_head):
    assert_within_2x_of_pytorch(
        lambda qkv: ops.causal_attention(qkv, n_head),
        lambda qkv: sdpa_attention(qkv, n_head), [rand(B, T, 3 * C)])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_bias_gelu(approximate, bias):
    F_ = 4 * 75
    inputs = [rand(3, 11, F_, scale=2), rand(F_) if bias else None]
    assert_within_2x_of_pytorch(
        lambda x, b: ops.bias_gelu(x, b, approximate),
        lambda x, b: F.gelu(x + b if b is not None else x, approximate=approximate), inputs)


def test_statistics_stay_float32():
    x = torch.randn(4, 5, 32, dtype=bf16)
    _, mean, rstd = torch.ops.nanoblock.layer_norm_forward(x, torch.ones(32, dtype=bf16), None,
                                                          1e-5)
    _, lse = torch.ops.nanoblock.causal_attention_forward(torch.randn(2, 5, 96, dtype=bf16), 4)
    assert mean.dtype == rstd.dtype == lse.dtype == torch.float32


@pytest.mark.parametrize("B,T,C,n_head,bias,gelu", [
    (2, 97, 96, 3, True, "exact"),
    (3, 7, 120, 5, False, "tanh"),
    (1, 1, 64, 4, True, "tanh"),
    (1, 160, 256, 2, True, "exact"),
])
def test_block(B, T, C, n_head, bias, gelu):
    nb, ref = block_pair(make_config(C, n_head, bias=bias, gelu=gelu))
    x = torch.randn(B, T, C, dtype=f64).to(bf16)
    grad = torch.randn(B, T, C, dtype=f64).to(bf16)
    # float64 on the bfloat16-rounded weights and inputs
    ref64 = copy.deepcopy(ref).to(bf16).to(f64)
    exact = forward_backward(ref64, x.to(f64), grad.to(f64))
    ours = forward_backward(copy.deepcopy(nb).to(bf16), x, grad)
    theirs = forward_backward(copy.deepcopy(ref).to(bf16), x, grad)
    for name, a, b, e in zip(["out", "x"] + [n for n, _ in nb.named_parameters()],
                             [ours[0], *ours[1]], [theirs[0], *theirs[1]],
                             [exact[0], *exact[1]]):
        assert a.dtype == bf16, name
        err, ref_err = rel_err(a, e), rel_err(b, e)
        assert err <= 2 * ref_err + 1e-5, f"{name}: nanoblock {err:.2e}, reference {ref_err:.2e}"
