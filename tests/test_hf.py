"""Hugging Face GPT-2 interop: GPT.from_hf and Block.from_hf against a
transformers GPT2LMHeadModel built from a small GPT2Config (nothing is
downloaded). Skipped when transformers is not installed."""
import pytest
import torch

import nanoblock

from conftest import rel_err

transformers = pytest.importorskip("transformers")

CONV1D = nanoblock.block.HF_CONV1D_WEIGHTS


def hf_gpt2(**overrides):
    settings = dict(vocab_size=61, n_positions=40, n_embd=48, n_layer=2, n_head=3,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    bos_token_id=0, eos_token_id=0)
    settings.update(overrides)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings)).double()
    with torch.no_grad():  # GPT-2's init leaves biases 0 and LayerNorms 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.startswith("transformer.h.0.ln"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_grad(hf_model, name):
    g = hf_model.get_parameter(name).grad
    return g.t() if name.endswith(CONV1D) else g


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_gpt_from_hf_same_logits_and_grads(activation):
    hf = hf_gpt2(activation_function=activation)
    model = nanoblock.GPT.from_hf(hf)
    assert model.config.gelu == ("tanh" if activation == "gelu_new" else "exact")
    assert model.transformer.h[0].attn.c_attn.weight.shape == (144, 48)  # nn.Linear layout
    idx = torch.randint(0, 61, (3, 37))
    expected = hf(idx).logits
    logits, _ = model(idx, targets=idx)  # with targets: logits at every position
    assert logits.dtype == torch.float64
    assert rel_err(logits, expected) < 1e-10

    grad = torch.randn_like(expected)
    (expected * grad).sum().backward()
    (logits * grad).sum().backward()
    for name, p in model.named_parameters():
        assert rel_err(p.grad, hf_grad(hf, name)) < 1e-9, name


def test_block_from_hf():
    hf = hf_gpt2()
    block = nanoblock.Block.from_hf(hf.transformer.h[0])
    assert block.approximate == "tanh"
    x = torch.randn(2, 11, 48, dtype=torch.float64)
    expected = hf.transformer.h[0](x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert rel_err(block(x), expected) < 1e-12


def test_float32_hf_model_converts_to_float32():
    hf = hf_gpt2().float()
    model = nanoblock.GPT.from_hf(hf)
    idx = torch.randint(0, 61, (2, 9))
    assert rel_err(model(idx, idx)[0], hf(idx).logits) < 1e-5


@pytest.mark.parametrize("overrides,complaint", [
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(n_inner=100), "n_inner=100"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
    (dict(scale_attn_by_inverse_layer_idx=True), "attention scaled"),
    (dict(attn_pdrop=0.2), "different dropouts"),
])
def test_configs_nanogpt_cannot_express_are_refused(overrides, complaint):
    with pytest.raises(ValueError, match=complaint):
        nanoblock.GPT.from_hf(hf_gpt2(**overrides))


def test_untied_lm_head_is_refused():
    hf = hf_gpt2(tie_word_embeddings=False)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    with pytest.raises(ValueError, match="tied"):
        nanoblock.GPT.from_hf(hf)
