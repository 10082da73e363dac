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
