"""nanoblock.Block against the reference Block: forward and every gradient."""
import pytest
import torch

import nanoblock
from nanoblock.reference import ReferenceBlock

from conftest import block_op_of, block_pair, forward_backward, make_config, rel_err

# (B, T, C, n_head): T = 1, 7, 97, 1025; head dims 16..128; C not a power of two.
SHAPES = [
    (2, 1, 64, 4),      # T = 1, hd 16
    (3, 7, 96, 3),      # hd 32, C not a power of two
    (2, 97, 120, 5),    # hd 24, odd T
    (1, 97, 80, 1),     # hd 80
    (1, 1025, 128, 1),  # long T, hd 128
    (2, 64, 192, 2),    # hd 96
    (1, 33, 48, 3),     # hd 16
]


@pytest.mark.parametrize("B,T,C,n_head", SHAPES)
@pytest.mark.parametrize("bias,gelu", [(True, "exact"), (False, "tanh")])
def test_block_matches_reference_float64(B, T, C, n_head, bias, gelu):
    nb, ref = block_pair(make_config(C, n_head, bias, gelu))
    x = torch.randn(B, T, C, dtype=torch.float64)
    grad = torch.randn(B, T, C, dtype=torch.float64)
    y_nb, g_nb = forward_backward(nb, x, grad)
    y_ref, g_ref = forward_backward(ref, x, grad)
    assert rel_err(y_nb, y_ref) < 1e-9
    for (name, _), a, b in zip([("x", None)] + list(nb.named_parameters()), g_nb, g_ref):
        assert rel_err(a, b) < 1e-9, name


@pytest.mark.parametrize("B,T,C,n_head", [(2, 7, 96, 3), (2, 97, 120, 5), (1, 300, 128, 2)])
@pytest.mark.parametrize("bias,gelu", [(True, "exact"), (True, "tanh"), (False, "exact")])
def test_block_float32_as_accurate_as_reference(B, T, C, n_head, bias, gelu):
    """float32: nanoblock's error against float64 is at most 2x the reference's."""
    cfg = make_config(C, n_head, bias, gelu)
    nb64, ref64 = block_pair(cfg)
    nb32, ref32 = block_pair(cfg, dtype=torch.float32)
    x = torch.randn(B, T, C, dtype=torch.float64)
    grad = torch.randn(B, T, C, dtype=torch.float64)
    y64, g64 = forward_backward(ref64, x, grad)
    y_nb, g_nb = forward_backward(nb32, x.float(), grad.float())
    y_ref, g_ref = forward_backward(ref32, x.float(), grad.float())
    assert rel_err(y_nb, y64) <= 2 * rel_err(y_ref, y64) + 1e-6
    for a, b, exact in zip(g_nb, g_ref, g64):
        assert rel_err(a, exact) <= 2 * rel_err(b, exact) + 1e-6


@pytest.mark.parametrize("bias,gelu", [(True, "exact"), (False, "tanh")])
def test_block_gradcheck(bias, gelu):
    """gradcheck of the Block op in x and all twelve parameters (or six)."""
    nb, _ = block_pair(make_config(24, 3, bias=bias, gelu=gelu))
    x = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    block_op, params = block_op_of(nb)
    assert torch.autograd.gradcheck(block_op, (x, *params))


def test_non_contiguous_input():
    nb, ref = block_pair(make_config(48, 2))
    base = torch.randn(7, 3, 48, dtype=torch.float64)
    x = base.transpose(0, 1)  # [3, 7, 48], not contiguous
    assert not x.is_contiguous()
    grad = torch.randn(3, 7, 48, dtype=torch.float64)
    y_nb, g_nb = forward_backward(nb, x, grad)
    y_ref, g_ref = forward_backward(ref, x, grad)
    assert rel_err(y_nb, y_ref) < 1e-9
    for a, b in zip(g_nb, g_ref):
        assert rel_err(a, b) < 1e-9
    # non-contiguous parameters too (a transposed view of a weight)
    w = nb.attn.c_proj.weight.detach().t().contiguous().t()
    assert not w.is_contiguous()
    params = list(nb.block_params())
    params[4] = w
    y2 = nanoblock.ops.block(x, params, nb.n_head, nb.approximate)
    assert torch.equal(y2, y_nb)


def test_block_op_outputs_are_not_views():
    """A view of a hidden base would break in-place ops and autograd hooks
    on the output (FSDP2 warns about it)."""
    nb, _ = block_pair(make_config(48, 2))
    outputs = torch.ops.nanoblock.block_forward(torch.randn(2, 5, 48, dtype=torch.float64),
                                                *nb.block_params(), 2, "none")
    assert not any(t._is_view() for t in outputs)


def test_backward_is_deterministic():
    nb, _ = block_pair(make_config(96, 3), dtype=torch.float32)
    x = torch.randn(4, 130, 96)
    grad = torch.randn(4, 130, 96)
    y1, g1 = forward_backward(nb, x, grad)
    y2, g2 = forward_backward(nb, x, grad)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_parameter_grads_accumulate():
    """Gradient accumulation over two micro-batches equals one larger batch."""
    nb, _ = block_pair(make_config(32, 2))
    x = torch.randn(4, 5, 32, dtype=torch.float64)
    nb(x[:2]).square().sum().backward()
    nb(x[2:]).square().sum().backward()
    accumulated = [p.grad.clone() for p in nb.parameters()]
    nb.zero_grad()
    nb(x).square().sum().backward()
    for a, p in zip(accumulated, nb.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_with_reference():
    cfg = make_config(64, 4, bias=True)
    nb, ref = block_pair(cfg)
    assert list(nb.state_dict().keys()) == list(ref.state_dict().keys())
    assert list(nb.state_dict().keys()) == [
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
        "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
        "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    # and back: reference <- nanoblock
    ref2 = ReferenceBlock(cfg).double()
    ref2.load_state_dict(nb.state_dict())
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    assert rel_err(nb(x), ref2(x)) < 1e-12
    # bias=False has no bias keys, like nanoGPT
    nb_nobias, ref_nobias = block_pair(make_config(64, 4, bias=False))
    assert not any(k.endswith("bias") for k in nb_nobias.state_dict())
    assert list(nb_nobias.state_dict()) == list(ref_nobias.state_dict())


def test_submodules_work_on_their_own():
    """ln_1, attn and mlp each match the reference's when called alone."""
    nb, ref = block_pair(make_config(48, 3, gelu="tanh"))
    x = torch.randn(2, 11, 48, dtype=torch.float64)
    for name in ("ln_1", "attn", "ln_2", "mlp"):
        assert rel_err(getattr(nb, name)(x), getattr(ref, name)(x)) < 1e-12, name


def test_empty_batch_and_sequence():
    nb, ref = block_pair(make_config(32, 2))
    for shape in [(0, 5, 32), (3, 0, 32)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y = nb(x)
        assert y.shape == shape
        y.sum().backward()
        assert x.grad.shape == shape
        assert all(p.grad is not None for p in nb.parameters())


def test_eval_mode_with_dropout_config_matches_reference():
    nb, ref = block_pair(make_config(32, 2, dropout=0.1))
    nb.eval()
    ref.eval()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    assert rel_err(nb(x), ref(x)) < 1e-12
