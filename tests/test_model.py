"""nanoblock.GPT: nanoGPT's model, built of nanoblock Blocks."""
import pytest
import torch

import nanoblock
from nanoblock.reference import ReferenceGPT

from conftest import assert_compiled_matches_eager, rel_err

# nanoGPT's GPT state_dict keys for one layer, in order.
NANOGPT_KEYS = [
    "transformer.wte.weight", "transformer.wpe.weight",
    "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
    "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
    "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias",
    "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
    "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
    "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias",
    "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight",
]


def tiny_config(**kw):
    cfg = dict(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
               bias=True)
    cfg.update(kw)
    return nanoblock.GPTConfig(**cfg)


def test_state_dict_names_are_nanogpts():
    model = nanoblock.GPT(tiny_config(n_layer=1))
    assert list(model.state_dict().keys()) == NANOGPT_KEYS
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_init_follows_nanogpt():
    torch.manual_seed(0)
    cfg = tiny_config(n_layer=4, n_embd=64, n_head=4, vocab_size=500)
    model = nanoblock.GPT(cfg)
    sd = model.state_dict()
    std = lambda k: sd[k].std().item()  # noqa: E731
    assert abs(std("transformer.h.0.attn.c_attn.weight") - 0.02) < 0.002
    scaled = 0.02 / (2 * cfg.n_layer) ** 0.5
    assert abs(std("transformer.h.3.mlp.c_proj.weight") - scaled) < 0.15 * scaled
    assert abs(std("transformer.h.1.attn.c_proj.weight") - scaled) < 0.15 * scaled
    assert torch.all(sd["transformer.h.0.mlp.c_fc.bias"] == 0)
    assert torch.all(sd["transformer.h.0.ln_1.weight"] == 1)


@pytest.mark.parametrize("bias", [True, False])
def test_gpt_matches_reference_gpt(bias):
    cfg = tiny_config(bias=bias, gelu="tanh" if bias else "exact")
    ref = ReferenceGPT(cfg).double()
    model = nanoblock.GPT(cfg).double()
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (3, 11))
    targets = torch.randint(0, cfg.vocab_size, (3, 11))
    targets[0, :4] = -1  # ignored positions
    logits_nb, loss_nb = model(idx, targets)
    logits_ref, loss_ref = ref(idx, targets)
    assert rel_err(logits_nb, logits_ref) < 1e-10
    loss_nb.backward()
    loss_ref.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-9, name
    # and the state_dict goes back the other way
    ref2 = ReferenceGPT(cfg).double()
    ref2.load_state_dict(model.state_dict())
    assert rel_err(ref2(idx)[0], model(idx)[0]) < 1e-10


def test_gpt_gradcheck():
    cfg = tiny_config(n_embd=8, n_head=2, n_layer=2, vocab_size=11)
    model = nanoblock.GPT(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 5))
    x0 = (model.transformer.wte(idx) + model.transformer.wpe(torch.arange(5))).detach()
    x0.requires_grad_(True)

    def body(x):
        for block in model.transformer.h:
            x = block(x)
        return model.lm_head(model.transformer.ln_f(x))

    assert torch.autograd.gradcheck(body, (x0,))


def test_generate_and_inference_logits():
    cfg = tiny_config()
    model = nanoblock.GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 4))
    logits, loss = model(idx)
    assert logits.shape == (2, 1, cfg.vocab_size) and loss is None
    out = model.generate(idx, 6, temperature=0)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], idx)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))


def test_torch_compile_fullgraph_gpt():
    """A GPT of nanoblock Blocks compiles with no graph breaks, forward and
    backward, and gives eager's numbers."""
    torch._dynamo.reset()
    cfg = tiny_config(n_embd=32, n_head=4)
    model = nanoblock.GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    targets = torch.randint(0, cfg.vocab_size, (2, 12))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_compiled_matches_eager(model, compiled, idx, targets)


def test_torch_compile_inductor_block():
    """The default backend (inductor) around nanoblock ops."""
    torch._dynamo.reset()
    cfg = tiny_config(n_embd=32, n_head=4)
    block = nanoblock.Block(cfg)
    x = torch.randn(2, 7, 32, requires_grad=True)
    compiled = torch.compile(lambda x: block(x).square().mean(), fullgraph=True)
    loss = compiled(x)
    loss.backward()
    expected_grad = torch.autograd.grad(block(x).square().mean(), x)[0]
    torch.testing.assert_close(x.grad, expected_grad)


def test_torch_compile_non_contiguous_input():
    """The fake kernels give contiguous outputs, like the real ones, so a
    transposed input compiles to the same numbers."""
    torch._dynamo.reset()
    block = nanoblock.Block(tiny_config(n_embd=32, n_head=4)).double()
    x = torch.randn(7, 2, 32, dtype=torch.float64).transpose(0, 1)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))


def test_torch_compile_dynamic_shapes_gpt():
    """dynamic=True: one compiled graph serves several sequence lengths and
    batch sizes (no recompilation per shape), each with eager's numbers."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    cfg = tiny_config(n_embd=32, n_head=4)
    model = nanoblock.GPT(cfg).double()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for B, T in ((2, 5), (3, 11), (4, 16)):  # not 1: sizes 0 and 1 are always specialized
        idx = torch.randint(0, cfg.vocab_size, (B, T))
        targets = torch.randint(0, cfg.vocab_size, (B, T))
        assert_compiled_matches_eager(model, compiled, idx, targets,
                                      loss_tol=dict(rtol=1e-12, atol=1e-12),
                                      grad_tol=dict(rtol=1e-10, atol=1e-12))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
