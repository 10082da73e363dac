"""Moving from nanoGPT: Block.from_nanogpt, GPT.from_nanogpt, patch.
nanoblock.reference mirrors nanoGPT's model.py, so it stands in for it."""
import torch

import nanoblock
from nanoblock.reference import ReferenceBlock, ReferenceGPT

from conftest import make_config, randomize_, rel_err


def test_block_from_nanogpt():
    for bias, gelu in [(True, "exact"), (False, "tanh")]:
        ref = randomize_(ReferenceBlock(make_config(48, 3, bias=bias, gelu=gelu))).double()
        block = nanoblock.Block.from_nanogpt(ref)
        assert block.approximate == ("tanh" if gelu == "tanh" else "none")
        x = torch.randn(2, 9, 48, dtype=torch.float64)
        assert rel_err(block(x), ref(x)) < 1e-12
        assert block.ln_1.weight.dtype == torch.float64


def test_gpt_from_nanogpt_and_patch():
    cfg = nanoblock.GPTConfig(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=16)
    ref = ReferenceGPT(cfg).double()
    idx = torch.randint(0, 23, (2, 10))
    expected, _ = ref(idx)
    converted = nanoblock.GPT.from_nanogpt(ref)
    assert isinstance(converted.transformer.h[0], nanoblock.Block)
    assert rel_err(converted(idx)[0], expected) < 1e-12

    patched = nanoblock.patch(ref)
    assert patched is ref
    assert all(type(b) is nanoblock.Block for b in ref.transformer.h)
    assert rel_err(ref(idx)[0], expected) < 1e-12
    # and it trains: gradients reach the new Blocks' parameters
    ref(idx, idx)[1].backward()
    assert ref.transformer.h[0].attn.c_attn.weight.grad is not None
