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


# derandomize: CI sees the same cases every run (explore more with
# --hypothesis-seed and a larger max_examples when changing kernels)
@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(block_cases())
def test_block_matches_reference(case):
    check_case(case)


def test_float32_tanh_gelu_case_found_by_hypothesis():
    """A random run of the property above found this case: large activations,
    tanh GELU, where 1 - sigmoid cancelled in the GELU gradient (3.4x the
    reference's error in ln_1.weight's gradient before the fix)."""
    check_case(dict(B=2, T=3, C=92, n_head=4, bias=False, gelu="tanh", dtype=torch.float32,
                    seed=0))


def test_float32_single_position_case_found_by_hypothesis():
    """T = 1: dq and dk are 0 in exact math (one key, softmax constant); they
    came out as rounding noise from dP - D, 5-8x the reference's error in
    the x, c_attn and ln_1 gradients, until D was summed like dP."""
    check_case(dict(B=1, T=1, C=29, n_head=1, bias=False, gelu="exact", dtype=torch.float32,
                    seed=0))


def check_case(case):
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
