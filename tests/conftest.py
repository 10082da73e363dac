"""Shared helpers: a nanoblock Block and the reference Block with the same
random weights, and relative-error measures."""
import pytest
import torch
import torch.nn.functional as F

import nanoblock
from nanoblock.reference import ReferenceBlock


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
# the values must be those of a clean run (`same` compares). Sequence 1 is
# never touched and must stay clean too.


def same_values(a, b):
    """a is finite and equals b up to a few roundings of its dtype: a block
    of the attention that meets a NaN runs as loops instead of a GEMM, which
    sums in another order (csrc/cpu/attention.cpp, causal_matmul)."""
    if a.numel() == 0:
        return a.shape == b.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(a.dtype, 1e-2)
    scale = max(b.abs().max().item(), 1.0)
    return bool(torch.isfinite(a).all()) and torch.allclose(a.double(), b.double(), rtol=tol,
                                                            atol=tol * scale)


def poisoned(t, pos, col, value):
    """A copy of t [B, T, *] with t[0, pos, col] = value."""
    t = t.detach().clone()
    t[0, pos, col] = value
    return t


def check_attention_causal(qkv, grad_out, n_head, pos, part, value, same=same_values,
                           reach=0):
    """value at position pos of sequence 0 in q, k or v (part 0, 1, 2), then
    in grad_out: the attention op's outputs (out, lse), query gradients (dq)
    and, for the poisoned grad_out, every gradient are checked outside their
    cones. Key and value gradients before pos are not checked: queries at pos
    and later, whose outputs are non-finite, read those keys, so exact math
    makes them non-finite too (as PyTorch does). reach > 0 widens each cone
    by that many positions (the CUDA kernels: the masked pairs of a diagonal
    tile enter its tensor-core products, so 0 x NaN reaches the tile)."""
    ops = torch.ops.nanoblock
    C = qkv.shape[-1] // 3
    out, lse = ops.causal_attention_forward(qkv, n_head)
    grad = ops.causal_attention_backward(grad_out, qkv, out, lse, n_head)

    bad_qkv = poisoned(qkv, pos, part * C + C // 2, value)
    bad_out, bad_lse = ops.causal_attention_forward(bad_qkv, n_head)
    bad_grad = ops.causal_attention_backward(grad_out, bad_qkv, bad_out, bad_lse, n_head)
    before, after = max(0, pos - reach), pos + 1 + reach  # the cone's edges
    assert not torch.isfinite(bad_grad[0, pos]).all()  # it did get in
    assert same(bad_out[0, :before], out[0, :before]), "forward: reached an earlier output"
    assert same(bad_lse[0, :, :before], lse[0, :, :before]), "forward: reached an earlier lse"
    assert same(bad_grad[0, :before, :C], grad[0, :before, :C]), "backward: reached an earlier dq"
    assert same(bad_out[1], out[1]) and same(bad_grad[1], grad[1]), "reached sequence 1"

    bad_grad_out = poisoned(grad_out, pos, C // 2, value)
    bad_grad = ops.causal_attention_backward(bad_grad_out, qkv, out, lse, n_head)
    assert not torch.isfinite(bad_grad[0, pos]).all()
    assert same(bad_grad[0, after:], grad[0, after:]), "backward: reached a later gradient"
    assert same(bad_grad[1], grad[1]), "backward: reached sequence 1"


def check_block_causal(block, x, grad_out, pos, value, same=same_values, reach=0):
    """The whole Block: value in the input at position pos of sequence 0
    leaves the outputs before pos (pos - reach) as they were; in the output
    gradient, it leaves the input gradients after pos (pos + reach) as they
    were. Parameter gradients sum over every position, so they turn
    non-finite, as in PyTorch."""
    before, after = max(0, pos - reach), pos + 1 + reach
    y, (dx, *_) = forward_backward(block, x, grad_out)
    bad_y, _ = forward_backward(block, poisoned(x, pos, 0, value), grad_out)
    assert not torch.isfinite(bad_y[0, pos]).all()
    assert same(bad_y[0, :before], y[0, :before]), "forward: reached an earlier output"
    assert same(bad_y[1], y[1]), "forward: reached sequence 1"

    _, (bad_dx, *bad_param_grads) = forward_backward(block, x, poisoned(grad_out, pos, 0, value))
    assert not torch.isfinite(bad_dx[0, pos]).all()
    assert same(bad_dx[0, after:], dx[0, after:]), "backward: reached a later input gradient"
    assert same(bad_dx[1], dx[1]), "backward: reached sequence 1"
    assert not all(torch.isfinite(g).all() for g in bad_param_grads)
