"""Property tests: random shapes, dtypes, bias and GELU choice against the
reference Block (hypothesis picks the cases)."""
import statistics

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import block_pair, forward_backward, make_config
from nanoblock.reference import ReferenceBlock


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


def case_inputs(case):
    """The case's config, input x and output gradient (float64)."""
    cfg = make_config(case["C"], case["n_head"], case["bias"], case["gelu"])
    torch.manual_seed(case["seed"])
    x = torch.randn(case["B"], case["T"], case["C"], dtype=torch.float64)
    return cfg, x, torch.randn_like(x)


def float32_errors(case):
    """Max error against float64 of the output and every gradient, for
    nanoblock, the reference Block (SDPA attention) and the reference with
    PyTorch's explicit softmax attention, all in float32; and the largest
    entry of each exact value."""
    cfg, x, grad = case_inputs(case)
    _, ref64 = block_pair(cfg, seed=case["seed"])
    y_exact, g_exact = forward_backward(ref64, x, grad)
    nb, ref = block_pair(cfg, dtype=torch.float32, seed=case["seed"])
    manual = ReferenceBlock(cfg, attention="manual").float()
    manual.load_state_dict(ref.state_dict())
    errors = []
    for block in (nb, ref, manual):
        y, g = forward_backward(block, x.float(), grad.float())
        errors.append([(a.double() - b).abs().max().item()
                       for a, b in zip([y, *g], [y_exact, *g_exact])])
    return errors, [b.abs().max().item() for b in [y_exact, *g_exact]]


def test_float32_two_features_as_accurate_as_pytorch():
    """n_embd = 2 is a degenerate LayerNorm: its output is +-w*d/sqrt(d^2 + eps)
    for a row (a - d, a + d), and its input gradient the difference of two
    nearly equal terms, eps / (d^2 + eps) of their size, so rounding in the
    forward pass comes out of the backward amplified. A hypothesis run found
    B=1, T=31, bias, exact GELU, seed 2, where nanoblock's c_attn.bias
    gradient error was 3x the reference's (1.6e-5 against 5.2e-6). Traced: on
    the same float32 inputs nanoblock's LayerNorm backward is 30x more
    accurate than PyTorch's there and its attention backward as accurate, and
    PyTorch's own explicit-softmax Block errs as much as nanoblock
    (c_attn.bias 1.7e-5): the SDPA reference was lucky. Measured as
    check_case measures (error over the reference's error plus half its
    floor, so check_case fails above 2), over 100 seeds nanoblock's worst
    ratio had median 0.51 and passed 2 in 6 seeds; PyTorch's explicit-softmax
    Block's had median 0.92 and passed 2 in 11. (At n_embd = 16 neither
    passed 1.1.) So at n_embd = 2 the check is statistical: over 30 seeds
    nanoblock's median ratio stays at most 1 (or 1.5x the explicit-softmax
    Block's). (check_case's plain 2x rule, kept for the property test, can
    so fail at n_embd = 2 by luck; judge such a case by this test.) The case
    found is no longer checked alone: on an AVX-512 machine (session 11)
    PyTorch's explicit-softmax Block got that case's c_attn.bias gradient to
    5.9e-6, as its SDPA Block did, while nanoblock's stayed at 1.6e-5, and
    the seeds' medians stayed where they were (0.52 and 0.97): which Block
    is lucky on one case depends on the machine PyTorch runs on.
    """
    case = dict(B=1, T=31, C=2, n_head=1, bias=True, gelu="exact")
    # error / (reference's error + half check_case's floor): check_case fails above 2
    ratios = {"nanoblock": [], "explicit softmax": []}
    for seed in range(30):
        (ours, sdpa, manual), scales = float32_errors(dict(case, seed=seed))
        for name, errs in [("nanoblock", ours), ("explicit softmax", manual)]:
            ratios[name].append(max(e / (r + 5e-7 * scale + 5e-7)
                                    for e, r, scale in zip(errs, sdpa, scales)))
    medians = {name: statistics.median(r) for name, r in ratios.items()}
    assert medians["nanoblock"] <= max(1.0, 1.5 * medians["explicit softmax"]), medians


def check_case(case):
    cfg, x, grad = case_inputs(case)
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
