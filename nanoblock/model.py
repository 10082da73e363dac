"""nanoblock.GPT: nanoGPT's GPT, a stack of nanoblock Blocks.

Token and position embeddings, n_layer Blocks, a final LayerNorm and an
lm_head tied to the token embedding; nanoGPT's initialization (normal(0, 0.02),
with every c_proj.weight scaled by 1/sqrt(2 n_layer)) and parameter names, so
a nanoGPT GPT's state_dict loads as it is.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import HF_CONV1D_WEIGHTS, Block, GPTConfig, LayerNorm, config_of_hf, take_over

__all__ = ["GPT", "GPTConfig", "patch"]


class GPT(nn.Module):
    block_class = Block
    layer_norm_class = LayerNorm

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([self.block_class(config) for _ in range(config.n_layer)]),
            ln_f=self.layer_norm_class(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_nanogpt(cls, model):
        """A nanoblock GPT with the config, weights, device and dtype of a
        nanoGPT GPT (its `config` fields; `gelu` if it has one)."""
        c = model.config
        config = GPTConfig(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, dropout=c.dropout, bias=c.bias,
                           gelu=getattr(c, "gelu", "exact"))
        return take_over(cls(config), model)

    @classmethod
    def from_hf(cls, model):
        """A nanoblock GPT with the config, weights, device and dtype of a
        Hugging Face transformers GPT2LMHeadModel (Conv1D weights transposed,
        GELU from its activation_function: gelu_new is the tanh GELU). Gives
        the same logits; needs lm_head tied to the token embedding, as
        GPT-2's is and nanoGPT's always is."""
        if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
            raise ValueError("nanoblock.GPT.from_hf: lm_head.weight must be tied to "
                             "transformer.wte.weight (tie_word_embeddings=True), as in GPT-2")
        return take_over(cls(config_of_hf(model.config)), model, HF_CONV1D_WEIGHTS)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):
        """idx [B, T] token ids -> (logits, loss). With targets [B, T] (-1 to
        ignore a position) logits cover every position and loss is the mean
        cross-entropy; without, logits are for the last position only."""
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t} is longer than block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Appends max_new_tokens sampled tokens to idx [B, T]
        (temperature 0: greedy)."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :]
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def patch(model):
    """Swaps, in place, every nanoGPT-style Block inside model (a module named
    ...Block with ln_1, attn, ln_2 and mlp) for a nanoblock Block with the same
    weights; returns model. Optimizers built before the swap hold the old
    parameters: build them after patching."""
    for name, child in list(model.named_children()):
        if isinstance(child, Block):
            continue
        if type(child).__name__.endswith("Block") and all(
                hasattr(child, m) for m in ("ln_1", "attn", "ln_2", "mlp")):
            setattr(model, name, Block.from_nanogpt(child))
        else:
            patch(child)
    return model
