"""Shared helpers: a nanoblock Block and the reference Block with the same
random weights, and relative-error measures."""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import nanoblock
from nanoblock.reference import ReferenceBlock

# Under compute-sanitizer's initcheck (scripts/gpu_check.sh sets
# NANOBLOCK_SDPA_MATH=1) the references' attention runs on PyTorch's math
# backend: cuDNN's SDPA backward reads memory it never wrote (reports in its
# compute_dot_do_o kernel, seen 2026-11-28), and those reports would bury
# any in nanoblock's kernels.
if os.environ.get("NANOBLOCK_SDPA_MATH") == "1":
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)


def make_config(C, n_head, bias=True, gelu="exact", dropout=0.0):
    return nanoblock.GPTConfig(n_embd=C, n_head=n_head, bias=bias, gelu=gelu, dropout=dropout)


def randomize_(module, generator=None, scale=0.3):
    """Random weights everywhere, LayerNorm weights around 1 (never zeros or ones)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale)
            if name.startswith("ln_") and name.endswith("weight"):
                p.add_(1.0)
    return module


def block_pair(config, dtype=torch.float64, device="cpu", seed=0):
    """(nanoblock Block, reference Block) with the same random weights."""
    g = torch.Generator().manual_seed(seed)
    ref = randomize_(ReferenceBlock(config).double(), g).to(device=device, dtype=dtype)
    nb = nanoblock.Block(config).to(device=device, dtype=dtype)
    nb.load_state_dict(ref.state_dict())
    return nb, ref


def block_op_of(block, dropout_p=0.0, rng=None):
    """The Block op of `block` as a function of (x, *its present parameters),
    for gradcheck (absent biases stay None), and those parameters."""
    present = [p is not None for p in block.block_params()]
    params = [p for p in block.block_params() if p is not None]

    def block_op(x, *ps):
        it = iter(ps)
        full = [next(it) if has else None for has in present]
        return nanoblock.ops.block(x, full, block.n_head, block.approximate, dropout_p, rng)

    return block_op, params


def sdpa_attention(qkv, n_head):
    """PyTorch's causal attention (SDPA) of qkv [B, T, 3C] -> [B, T, C], heads merged."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.reshape(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, C)


def rel_err(a, b):
    """max |a - b| / max |b| (b the more accurate)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_compiled_matches_eager(model, compiled, idx, targets, loss_tol=None, grad_tol=None):
    """A GPT `compiled` (torch.compile of `model`) gives the eager model's loss
    and parameter gradients on (idx, targets), to the given assert_close
    tolerances (default: assert_close's for the dtype)."""
    params = list(model.parameters())
    _, loss = compiled(idx, targets)
    grads = torch.autograd.grad(loss, params)
    _, loss_eager = model(idx, targets)
    grads_eager = torch.autograd.grad(loss_eager, params)
    torch.testing.assert_close(loss, loss_eager, **(loss_tol or {}))
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b, **(grad_tol or {}))


def forward_backward(block, x, grad):
    """Output and gradients of x and every parameter (in named_parameters order)."""
    x = x.detach().requires_grad_(True)
    y = block(x)
    params = [p for _, p in block.named_parameters()]
    grads = torch.autograd.grad(y, [x] + params, grad)
    return y.detach(), grads


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# NaN / Inf containment along the sequence. Causal attention makes position t
# depend on positions <= t only: so a non-finite input at t may reach outputs
# at t and later, never before; and a non-finite output gradient at t may
# reach input gradients at t and earlier, never after. Outside those cones
# the values must be those of a clean run, or of the sequence cut off at t
# (`same` compares). Sequence 1 is never touched and must stay clean too.

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


def same_values(a, b):
    """a is finite and equals b up to a few roundings of its dtype: a block
    of the CPU attention that meets a NaN runs as loops instead of a GEMM,
    which sums in another order (csrc/cpu/attention.cpp, causal_matmul)."""
    if a.numel() == 0:
        return a.shape == b.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(a.dtype, 1e-2)
    scale = max(b.abs().max().item(), 1.0)
    return a.shape == b.shape and bool(torch.isfinite(a).all()) and torch.allclose(
        a.double(), b.double(), rtol=tol, atol=tol * scale)


def poisoned(t, pos, col, value):
    """A copy of t [B, T, *] with t[0, pos, col] = value."""
    t = t.detach().clone()
    t[0, pos, col] = value
    return t


def check_attention_causal(qkv, grad_out, n_head, pos, part, value, dropout_p=0.0, rng=None):
    """value at position pos of sequence 0, in q, k or v (part 0, 1, 2) or in
    grad_out (part 3), through the attention op. Asserts (same_values) that
    with the input poisoned, the outputs, lse and query gradients (dq) before
    pos are those of the sequence cut off at pos (its first pos positions
    alone; with dropout, whose masks depend on T, those of the clean run),
    and with grad_out poisoned, every gradient after pos is the clean run's;
    sequence 1 is the clean run's. Key and value gradients before pos are not
    checked: queries at pos and later, whose outputs are non-finite, read
    those keys, so exact math makes them non-finite too (as PyTorch does).
    Returns where the values, though contained, differ in bits from what they
    are compared with (the CUDA kernels promise the same bits)."""
    ops = torch.ops.nanoblock
    C = qkv.shape[-1] // 3
    drop = (dropout_p, rng)
    differ = []

    def same(name, ours, expected):
        where = f"{name} (pos {pos}, part {part}, value {value})"
        assert same_values(ours, expected), f"reached: {where}"
        if not torch.equal(ours, expected):
            diff = (ours.double() - expected.double()).abs().max().item()
            differ.append(f"{where}: max difference {diff:.3e}")

    out, lse = ops.causal_attention_forward(qkv, n_head, *drop)
    grad = ops.causal_attention_backward(grad_out, qkv, out, lse, n_head, *drop)
    if part == 3:
        bad_grad = ops.causal_attention_backward(poisoned(grad_out, pos, C // 2, value), qkv,
                                                 out, lse, n_head, *drop)
        assert not torch.isfinite(bad_grad[0, :pos + 1]).all()  # it did get in
        same("gradients after pos", bad_grad[0, pos + 1:], grad[0, pos + 1:])
        same("gradients of sequence 1", bad_grad[1], grad[1])
        return differ

    bad_qkv = poisoned(qkv, pos, part * C + C // 2, value)
    bad_out, bad_lse = ops.causal_attention_forward(bad_qkv, n_head, *drop)
    bad_grad = ops.causal_attention_backward(grad_out, bad_qkv, bad_out, bad_lse, n_head, *drop)
    assert not (torch.isfinite(bad_out[0]).all() and torch.isfinite(bad_grad[0]).all())
    if pos > 0:
        if dropout_p == 0:  # the sequence cut off at pos
            cut = qkv[:, :pos].contiguous()
            ref_out, ref_lse = ops.causal_attention_forward(cut, n_head)
            ref_grad = ops.causal_attention_backward(grad_out[:, :pos].contiguous(), cut,
                                                     ref_out, ref_lse, n_head)
        else:
            ref_out, ref_lse, ref_grad = out[:, :pos], lse[:, :, :pos], grad[:, :pos]
        same("outputs before pos", bad_out[0, :pos], ref_out[0])
        same("lse before pos", bad_lse[0, :, :pos], ref_lse[0])
        same("dq before pos", bad_grad[0, :pos, :C], ref_grad[0, :, :C])
    same("outputs of sequence 1", bad_out[1], out[1])
    same("gradients of sequence 1", bad_grad[1], grad[1])
    return differ


def check_block_causal(block, x, grad_out, pos, value, same=same_values):
    """The whole Block: value in the input at position pos of sequence 0
    leaves the outputs before pos as they were; in the output gradient, it
    leaves the input gradients after pos as they were. Parameter gradients
    sum over every position, so they turn non-finite, as in PyTorch."""
    y, (dx, *_) = forward_backward(block, x, grad_out)
    bad_y, _ = forward_backward(block, poisoned(x, pos, 0, value), grad_out)
    assert not torch.isfinite(bad_y[0, pos]).all()
    assert same(bad_y[0, :pos], y[0, :pos]), "forward: reached an earlier output"
    assert same(bad_y[1], y[1]), "forward: reached sequence 1"

    _, (bad_dx, *bad_param_grads) = forward_backward(block, x, poisoned(grad_out, pos, 0, value))
    assert not torch.isfinite(bad_dx[0, pos]).all()
    assert same(bad_dx[0, pos + 1:], dx[0, pos + 1:]), "backward: reached a later input gradient"
    assert same(bad_dx[1], dx[1]), "backward: reached sequence 1"
    assert not all(torch.isfinite(g).all() for g in bad_param_grads)


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op thread count set to n, then back."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
