"""Property tests: random shapes, dtypes, bias and GELU choice against the
reference Block (hypothesis picks the cases)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import block_pair, forward_backward, make_config


@st.composite
def block_cases(draw):
    n_head = draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 40))
    return dict(B=draw(st.integers(1, 3)), T=draw(st.integers(1, 80)), C=n_head * head_dim,
                n_head=n_head, bias=draw(st.booleans()),
                gelu=draw(st.sampled_from(["exact", "tanh"])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=30, deadline=None)
@given(block_cases())
def test_block_matches_reference(case):
    cfg = make_config(case["C"], case["n_head"], case["bias"], case["gelu"])
    torch.manual_seed(case["seed"])
    x = torch.randn(case["B"], case["T"], case["C"], dtype=torch.float64)
    grad = torch.randn_like(x)
    nb64, ref64 = block_pair(cfg, seed=case["seed"])
    y_exact, g_exact = forward_backward(ref64, x, grad)
    if case["dtype"] == torch.float64:
        # relative to the largest entry, with a floor for gradients that are
        # zero in exact math (n_embd = 1: LayerNorm's output is its bias)
        y, g = forward_backward(nb64, x, grad)
        for a, b in zip([y, *g], [y_exact, *g_exact]):
            assert (a - b).abs().max() <= 1e-9 * b.abs().max() + 1e-12
    else:  # float32: within 2x of the reference's own float32 error
        nb32, ref32 = block_pair(cfg, dtype=torch.float32, seed=case["seed"])
        y, g = forward_backward(nb32, x.float(), grad.float())
        y_ref, g_ref = forward_backward(ref32, x.float(), grad.float())
        for a, b, exact in zip([y, *g], [y_ref, *g_ref], [y_exact, *g_exact]):
            scale = exact.abs().max()
            assert (a - exact).abs().max() <= 2 * (b - exact).abs().max() + 1e-6 * scale + 1e-6
