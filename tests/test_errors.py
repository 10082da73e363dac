"""Bad input gets a clear Python error naming the problem, never a crash."""
import pytest
import torch

import nanoblock
from nanoblock import _build_info, ops

from conftest import make_config

nb = torch.ops.nanoblock


def block_and_input(C=32, n_head=2):
    block = nanoblock.Block(make_config(C, n_head))
    return block, torch.randn(2, 5, C)


def test_wrong_rank():
    block, _ = block_and_input()
    with pytest.raises(RuntimeError, match=r"block_forward: x must have 3 dims, got shape \[5, 32\]"):
        block(torch.randn(5, 32))


def test_wrong_last_dim():
    block, _ = block_and_input()
    with pytest.raises(RuntimeError, match=r"x must be \[B, T, n_embd\] with n_embd = 32 \(the size of ln_1.weight\), got shape \[2, 5, 31\]"):
        block(torch.randn(2, 5, 31))


def test_int_and_complex_input():
    block, _ = block_and_input()
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        block(torch.ones(2, 5, 32, dtype=torch.long))
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor, got dtype torch.complex64"):
        ops.layer_norm(torch.ones(2, 5, dtype=torch.complex64), torch.ones(5))


def test_unsupported_dtype_on_cpu():
    block, x = block_and_input()
    with pytest.raises(RuntimeError, match="torch.float16, which the CPU kernels do not support"):
        block.half()(x.half())


def test_mismatched_dtypes():
    block, x = block_and_input()
    with pytest.raises(RuntimeError, match="must have dtype torch.float64 like x, got torch.float32"):
        block(x.double())


def test_n_head_does_not_divide():
    with pytest.raises(ValueError, match="multiple of n_head"):
        nanoblock.Block(make_config(30, 4))
    with pytest.raises(RuntimeError, match="n_embd 30 is not divisible by n_head 4"):
        ops.causal_attention(torch.randn(1, 3, 90), 4)
    with pytest.raises(RuntimeError, match="n_head must be positive, got 0"):
        ops.causal_attention(torch.randn(1, 3, 90), 0)


def test_qkv_not_multiple_of_three():
    with pytest.raises(RuntimeError, match="not a multiple of 3"):
        ops.causal_attention(torch.randn(1, 3, 91), 1)


def test_bad_gelu_choice():
    with pytest.raises(RuntimeError, match="approximate must be 'none'"):
        ops.bias_gelu(torch.randn(3, 4), None, "fast")
    with pytest.raises(ValueError, match="config.gelu must be 'exact' or 'tanh'"):
        nanoblock.Block(make_config(32, 2, gelu="relu"))


def test_bad_saved_tensors_in_backward_ops():
    qkv = torch.randn(2, 4, 48)
    out, lse = nb.causal_attention_forward(qkv, 2)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[2, 4, 4\], got \[2, 2, 4\]"):
        nb.causal_attention_backward(out, qkv, out, lse, 4)
    with pytest.raises(RuntimeError, match="lse must have dtype torch.float32"):
        nb.causal_attention_backward(out, qkv, out, lse.double(), 2)
    x = torch.randn(3, 8)
    _, mean, rstd = nb.layer_norm_forward(x, torch.ones(8), None, 1e-5)
    with pytest.raises(RuntimeError, match=r"mean must have shape \[3\], got \[2\]"):
        nb.layer_norm_backward(x, x, torch.ones(8), mean[:2], rstd, None)


def test_layer_norm_errors():
    with pytest.raises(RuntimeError, match="x must have at least 1 dim, got a scalar"):
        ops.layer_norm(torch.tensor(1.0), torch.ones(1))
    with pytest.raises(RuntimeError, match=r"residual must have shape \[2, 3\], got \[2, 4\]"):
        ops.add_layer_norm(torch.randn(2, 3), torch.randn(2, 4), torch.ones(3))
    with pytest.raises(RuntimeError, match="eps must be positive"):
        ops.layer_norm(torch.randn(2, 3), torch.ones(3), None, 0.0)


def test_missing_weight():
    block, x = block_and_input()
    params = list(block.block_params())
    params[2] = None
    with pytest.raises(RuntimeError):  # the schema itself refuses None for a weight
        ops.block(x, params, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tensors_on_different_devices():
    block, x = block_and_input()
    with pytest.raises(RuntimeError, match="must be on cuda:0 like x, got cpu"):
        block(x.cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_head_dim_beyond_cuda_kernels():
    qkv = torch.randn(1, 4, 3 * 256, device="cuda")
    with pytest.raises(RuntimeError, match=r"head dims \(n_embd / n_head\) up to 128, got 256"):
        ops.causal_attention(qkv, 1)
    assert ops.causal_attention(qkv.cpu().double(), 1).shape == (1, 4, 256)  # the CPU has no limit


def test_double_backward_raises_instead_of_wrong_numbers():
    block, _ = block_and_input()
    block.double()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives .* are not implemented"):
        g.sum().backward()
    # each op alone too
    qkv = torch.randn(1, 4, 24, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(ops.causal_attention(qkv, 2).sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        g.sum().backward()


@pytest.mark.parametrize("op,values", [("attention_kernels", ("auto", "mma")),
                                       ("gemm_kernels", ("cublaslt", "aten"))])
def test_kernel_settings(op, values):
    """The process settings of the CUDA kernels (csrc/ops.cpp): a value out of
    the two is refused by name; a setting returns the one before it."""
    setting = getattr(nb, op)
    with pytest.raises(RuntimeError, match=f"nanoblock.{op}: use must be '{values[0]}' or "
                                           f"'{values[1]}', got 'fast'"):
        setting("fast")
    before = setting()
    try:
        assert setting(values[1]) == before
        # without CUDA kernels in the build there is nothing to set
        assert setting() == (values[1] if _build_info.backend == "cuda" else values[0])
    finally:
        setting(before)
    assert setting() == before
