"""nanoblock.Block: a drop-in for nanoGPT's Block.

Same config fields (n_embd, n_head, bias, dropout), same submodules and
parameter names (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj),
so state_dicts move both ways. `Block.forward` is one call into the fused
Block op; the submodules also work on their own, each through nanoblock's ops.

Dropout in training mode, where nanoGPT has it: the Block op drops the
attention probabilities and both c_proj outputs inside its kernels. The
submodules on their own (and a float32 Block under autocast, which runs as
its parts) drop the probabilities in nanoblock's attention op and the c_proj
outputs with PyTorch's F.dropout.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

_GELU_APPROXIMATE = {"exact": "none", "tanh": "tanh"}


@dataclass
class GPTConfig:
    """nanoGPT's GPTConfig plus the GELU choice; a Block reads n_embd, n_head,
    bias, dropout and gelu."""
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    gelu: str = "exact"  # "exact" (erf, nanoGPT's nn.GELU()) or "tanh" (GPT-2, HF gelu_new)


def gelu_approximate(config):
    """The GELU choice of a config as F.gelu's `approximate` ('none' or 'tanh').
    Configs without a `gelu` field (nanoGPT's own) get the exact GELU."""
    gelu = getattr(config, "gelu", "exact")
    if gelu not in _GELU_APPROXIMATE:
        raise ValueError(f"config.gelu must be 'exact' or 'tanh', got {gelu!r}")
    return _GELU_APPROXIMATE[gelu]


def check_config(config):
    if config.n_embd <= 0 or config.n_head <= 0 or config.n_embd % config.n_head != 0:
        raise ValueError(f"n_embd ({config.n_embd}) must be a positive multiple of n_head "
                         f"({config.n_head})")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")


def config_of_nanogpt_block(block):
    """The config a nanoGPT-style Block was built with, read off its modules."""
    try:
        n_embd = block.ln_1.weight.shape[0]
        n_head = block.attn.n_head
        bias = block.ln_1.bias is not None
        dropout = getattr(block.attn, "dropout", 0.0)
    except AttributeError as e:
        raise TypeError(f"{type(block).__name__} is not a nanoGPT-style Block (ln_1, attn with "
                        f"n_head, ln_2, mlp): {e}") from e
    gelu_module = getattr(block.mlp, "gelu", None)
    gelu = "tanh" if getattr(gelu_module, "approximate", "none") == "tanh" else "exact"
    return GPTConfig(n_embd=n_embd, n_head=n_head, bias=bias, dropout=dropout, gelu=gelu)


def take_over(new, old, transpose=()):
    """Gives the freshly built module `new` the weights, device, dtype and
    train/eval mode of `old`, whose state_dict has the same names; returns it.
    Weights whose names end with one of `transpose` are transposed on the way
    (Hugging Face's Conv1D keeps [in, out], nn.Linear [out, in])."""
    like = next(old.parameters())
    new.to(device=like.device, dtype=like.dtype)
    old_state = old.state_dict()
    new.load_state_dict({name: old_state[name].t() if name.endswith(transpose) else old_state[name]
                         for name in new.state_dict()})
    return new.train(old.training)


# The Linear weights that Hugging Face's GPT-2 stores as Conv1D ([in, out]).
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                     "mlp.c_proj.weight")

# transformers' names for GELU: "gelu" is the exact (erf) one.
_HF_GELU = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def config_of_hf(hf_config):
    """nanoblock's GPTConfig for a transformers GPT2Config; a ValueError names
    what nanoGPT's Block cannot express."""
    c = hf_config
    C = c.n_embd
    unsupported = []
    if c.activation_function not in _HF_GELU:
        unsupported.append(f"activation_function={c.activation_function!r} (supported: "
                           f"{', '.join(_HF_GELU)})")
    if c.n_inner not in (None, 4 * C):
        unsupported.append(f"n_inner={c.n_inner} (nanoGPT's MLP is 4 * n_embd = {4 * C})")
    if c.layer_norm_epsilon != 1e-5:
        unsupported.append(f"layer_norm_epsilon={c.layer_norm_epsilon} (nanoblock uses 1e-5)")
    if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
        unsupported.append("attention scaled other than by 1/sqrt(head_dim)")
    if not (c.resid_pdrop == c.embd_pdrop == c.attn_pdrop):
        unsupported.append(f"different dropouts (resid {c.resid_pdrop}, embd {c.embd_pdrop}, "
                           f"attn {c.attn_pdrop}; nanoGPT has one)")
    if unsupported:
        raise ValueError("nanoblock cannot express this GPT-2 config: " + "; ".join(unsupported))
    return GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                     n_head=c.n_head, n_embd=C, dropout=c.resid_pdrop, bias=True,
                     gelu=_HF_GELU[c.activation_function])


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's), through nanoblock's op."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: c_attn, causal attention, c_proj."""

    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        p = self.dropout if self.training else 0.0
        y = self.c_proj(ops.causal_attention(self.c_attn(x), self.n_head, p))
        return F.dropout(y, p) if p > 0 else y


class MLP(nn.Module):
    """nanoGPT's MLP: c_fc, GELU, c_proj, with the c_fc bias add fused into the GELU."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.approximate = gelu_approximate(config)
        self.dropout = config.dropout

    def forward(self, x):
        h = ops.bias_gelu(x @ self.c_fc.weight.t(), self.c_fc.bias, self.approximate)
        y = self.c_proj(h)
        p = self.dropout if self.training else 0.0
        return F.dropout(y, p) if p > 0 else y


class Block(nn.Module):
    """x -> x + attn(ln_1(x)) -> x1 + mlp(ln_2(x1)), as one nanoblock op.

    x: [B, T, n_embd], bfloat16, float32 or float64 (float16 too on CUDA);
    a float32 Block also runs under torch.autocast. `config` is nanoGPT's
    GPTConfig or nanoblock.GPTConfig.
    """

    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.approximate = gelu_approximate(config)

    @classmethod
    def from_nanogpt(cls, block):
        """A nanoblock Block with the weights, device and dtype of a nanoGPT
        Block (or any module with its submodules and parameter names)."""
        return take_over(cls(config_of_nanogpt_block(block)), block)

    @classmethod
    def from_hf(cls, block):
        """A nanoblock Block with the weights, device and dtype of a Hugging
        Face transformers GPT2Block (its Conv1D weights transposed)."""
        return take_over(cls(config_of_hf(block.attn.config)), block, HF_CONV1D_WEIGHTS)

    def block_params(self):
        """The twelve parameters in the Block op's order (None for absent biases)."""
        # Read from the modules' _parameters dicts: the same tensors as
        # self.ln_1.weight etc. (nn.Module.__getattr__ reads those dicts), but
        # 3 us a call instead of 35 on this project's CPU (twelve attribute
        # chains through __getattr__): host time decides small Blocks' speed.
        m = self._modules
        attn, mlp = m["attn"]._modules, m["mlp"]._modules
        return tuple(p for mod in (m["ln_1"], attn["c_attn"], attn["c_proj"], m["ln_2"],
                                   mlp["c_fc"], mlp["c_proj"])
                     for p in (mod._parameters["weight"], mod._parameters.get("bias")))

    def forward(self, x):
        if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
            return self.forward_autocast(x)
        p = self.dropout if self.training else 0.0
        return ops.block(x, self.block_params(), self.n_head, self.approximate, p)

    def forward_autocast(self, x):
        """A float32 Block under torch.autocast, as its parts, each with the
        casts autocast gives it (ops.cpp): LayerNorms in float32, the Linears,
        attention and GELU in the autocast dtype, the residual stream in
        float32; the reference Block gets the same casts. The fused Block op
        takes one dtype for everything: in bfloat16 its residual stream
        made 5-25x the reference's error at GPT-like weight scales."""
        x1, h = ops.add_layer_norm(x, self.attn(self.ln_1(x)), self.ln_2.weight, self.ln_2.bias)
        return x1 + self.mlp(h)
