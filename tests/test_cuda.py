"""nanoblock's CUDA kernels: gradients, agreement with the CPU kernels in
float64, low-precision accuracy against the plain PyTorch Block, determinism,
empty sizes and dropout (the same masks as the CPU's). Every test is marked
`cuda` and skipped without a GPU.

Accuracy rule for float16 / bfloat16 (FlashAttention's): measured against a
float64 reference, nanoblock's error must be at most twice the error that the
reference Block (nanoblock.reference.ReferenceBlock) makes in the same dtype,
plus a tiny floor.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import nanoblock
from nanoblock import ops
from nanoblock.reference import ReferenceBlock, ReferenceGPT

from conftest import (NON_FINITE, block_op_of, block_pair, check_attention_causal,
                      check_block_causal, sdpa_attention)
from test_dropout import (attention_mask, block_masks, check_attention_statistics,
                          check_eval_and_p0_bit_for_bit, check_manual_seed_reproducible,
                          check_masks_differ, check_residual_statistics, reference_attention,
                          reference_block_with_masks, rng_of, validation_loss_after_training)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

_ops = torch.ops.nanoblock


def cuda_built():
    try:
        from nanoblock import _build_info
        return _build_info.backend == "cuda"
    except ImportError:
        return False


@pytest.fixture(autouse=True)
def _needs_cuda_build():
    if not cuda_built():
        pytest.fail("a GPU is present but nanoblock was built without CUDA "
                    "(see nanoblock/_build_info.py)")


DEV = "cuda"


# Which kernels the float16 / bfloat16 attention takes (csrc/ops.cpp,
# nanoblock::attention_kernels): "wgmma" (Hopper's, where the device and the
# build have them; skipped elsewhere) or "mma" (mma.sync, forced). Tests of
# head dims the wgmma kernels take (64, 128) run both.
ATTENTION_PATHS = ["wgmma", "mma"]


@pytest.fixture(params=ATTENTION_PATHS)
def attention_path(request):
    path = request.param
    if path == "wgmma" and not _ops.wgmma_attention_available():
        pytest.skip("the wgmma attention needs a compute capability 9.0 GPU and an sm_90a build")
    before = _ops.attention_kernels("auto" if path == "wgmma" else "mma")
    try:
        yield path
    finally:
        _ops.attention_kernels(before)


# Which path the float16 / bfloat16 GEMMs take (csrc/cuda/gemm.cu,
# nanoblock::gemm_kernels): "cublaslt" (cached cuBLASLt plans, the default)
# or "aten" (ATen's mm / addmm).
@pytest.fixture(params=["cublaslt", "aten"])
def gemm_path(request):
    before = _ops.gemm_kernels(request.param)
    try:
        yield request.param
    finally:
        _ops.gemm_kernels(before)


def skip_unless_wgmma_takes(path, hd):
    """The wgmma path only differs where it applies (head dims 64 and 128)."""
    if path == "wgmma" and hd not in (64, 128):
        pytest.skip(f"head dim {hd}: the wgmma kernels do not take it (the mma path runs)")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_config(C, n_head, bias=True, gelu="exact"):
    return nanoblock.GPTConfig(n_embd=C, n_head=n_head, bias=bias, dropout=0.0, gelu=gelu)


def randomize(block, seed=0):
    """Non-trivial LayerNorm weights and biases (defaults are 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.startswith("ln_"):
                if name.endswith("weight"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return block


def check_within_2x(name, ours, ref, exact, floor):
    """FlashAttention's rule: ours (low precision) is at most 2x as far from
    exact (float64) as ref (PyTorch in the same dtype), plus a floor; max
    absolute errors."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err_ours = (ours.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    assert err_ours <= 2 * err_ref + floor, (
        f"{name}: max error {err_ours:.3e} > 2 x reference's {err_ref:.3e} + {floor:.1e}")


def run_block(block, x, grad_out):
    """Forward and backward; returns the output and every gradient by name."""
    x = x.detach().clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    y = block(x)
    y.backward(grad_out)
    grads = {"x": x.grad.detach()}
    grads.update({n: p.grad.detach() for n, p in block.named_parameters()})
    return y.detach(), grads


# ---------------------------------------------------------------------------
# gradcheck in float64 on the GPU


def f64(*shape, requires_grad=True):
    return torch.randn(*shape, device=DEV, dtype=torch.float64, requires_grad=requires_grad)


def test_gradcheck_layer_norm_small():
    torch.manual_seed(0)
    x, w, b = f64(5, 7, 24), f64(24), f64(24)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: ops.layer_norm(x, w, None), (x, w))


def test_gradcheck_add_layer_norm_small():
    torch.manual_seed(1)
    x, r, w, b = f64(3, 5, 20), f64(3, 5, 20), f64(20), f64(20)
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: ops.add_layer_norm(x, r, w, b), (x, r, w, b))


@pytest.mark.parametrize("B,T,C,n_head", [(2, 9, 32, 2), (1, 35, 24, 2), (2, 4, 12, 1)])
def test_gradcheck_attention_small(B, T, C, n_head):
    torch.manual_seed(2)
    qkv = f64(B, T, 3 * C)
    assert torch.autograd.gradcheck(lambda t: ops.causal_attention(t, n_head), (qkv,))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck_gelu_small(approximate):
    torch.manual_seed(3)
    x, b = f64(6, 16), f64(16)
    assert torch.autograd.gradcheck(lambda x, b: ops.bias_gelu(x, b, approximate), (x, b))
    assert torch.autograd.gradcheck(lambda x: ops.bias_gelu(x, None, approximate), (x,))


@pytest.mark.parametrize("bias,gelu", [(True, "exact"), (False, "tanh")])
def test_gradcheck_block_small(bias, gelu):
    torch.manual_seed(4)
    block = randomize(nanoblock.Block(make_config(32, 2, bias, gelu))).double().to(DEV)
    x = f64(2, 9, 32)
    params = tuple(p for p in block.block_params())

    def fn(x, *ps):
        it = iter(ps)
        full = tuple(next(it) if p is not None else None for p in params)
        return ops.block(x, full, 2, block.approximate)

    inputs = (x,) + tuple(p.detach().clone().requires_grad_(True) for p in params if p is not None)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# ---------------------------------------------------------------------------
# CUDA float64 == CPU float64


def assert_close_rel(a, b, tol=1e-10, what=""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = rel_err(a.cpu(), b.cpu())
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def both_devices(fn, *inputs):
    """Runs fn on CPU and CUDA copies of float64 inputs; returns each device's
    outputs and the gradients of sum(outputs * fixed random weights)."""
    results = []
    for dev in ("cpu", DEV):
        xs = [t.detach().to(dev).requires_grad_(t.requires_grad) if t is not None else None
              for t in inputs]
        outs = fn(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator().manual_seed(123)
        weights = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(dev) for o in outs]
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        diff = [t for t in xs if t is not None and t.requires_grad]
        grads = torch.autograd.grad(loss, diff) if diff else ()
        results.append(([o.detach() for o in outs], list(grads)))
    return results


@pytest.mark.parametrize("shape", [(4, 33), (3, 7, 768), (2, 97, 120), (1, 1, 8)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_cpu_float64(shape, with_bias):
    torch.manual_seed(5)
    C = shape[-1]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(C, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True) if with_bias else None
    (cpu_out, cpu_g), (gpu_out, gpu_g) = both_devices(
        lambda x, w, b: ops.layer_norm(x, w, b), x, w, b)
    for a, c in zip(gpu_out + gpu_g, cpu_out + cpu_g):
        assert_close_rel(a, c, what="layer_norm")


@pytest.mark.parametrize("shape", [(4, 33), (2, 97, 120)])
def test_add_layer_norm_matches_cpu_float64(shape):
    torch.manual_seed(6)
    C = shape[-1]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    r = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(C, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    (cpu_out, cpu_g), (gpu_out, gpu_g) = both_devices(
        lambda x, r, w, b: ops.add_layer_norm(x, r, w, b), x, r, w, b)
    for a, c in zip(gpu_out + gpu_g, cpu_out + cpu_g):
        assert_close_rel(a, c, what="add_layer_norm")


# The fused LayerNorm backward's paths (csrc/cuda/layernorm.cu): many row
# groups, so many blocks' partials are summed; row counts that leave the last
# round of a block, or whole groups, empty; one warp a row and several, one
# row a block and several; the scalar path (odd C); a row longer than its
# team's registers (C = 2049, scalar loads); with and without grad_residual
# (add_layer_norm's sum is an output too) and bias.
@pytest.mark.parametrize("N,C", [(3000, 33), (1001, 768), (517, 300), (130, 2049), (4100, 64)])
def test_layer_norm_backward_paths_match_cpu_float64(N, C):
    torch.manual_seed(14)
    x = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    r = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(C, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    (cpu_out, cpu_g), (gpu_out, gpu_g) = both_devices(
        lambda x, w, b: ops.layer_norm(x, w, b), x, w, b)
    for a, c in zip(gpu_out + gpu_g, cpu_out + cpu_g):
        assert_close_rel(a, c, what=f"layer_norm N={N} C={C}")
    (cpu_out, cpu_g), (gpu_out, gpu_g) = both_devices(
        lambda x, r, w: ops.add_layer_norm(x, r, w, None), x, r, w)
    for a, c in zip(gpu_out + gpu_g, cpu_out + cpu_g):
        assert_close_rel(a, c, what=f"add_layer_norm N={N} C={C}")


ATTENTION_SHAPES = [  # B, T, n_head, hd
    (2, 1, 2, 16), (2, 7, 3, 24), (1, 97, 2, 40), (1, 65, 1, 128), (2, 33, 2, 100),
    (1, 70, 2, 8), (1, 130, 3, 72),
]


@pytest.mark.parametrize("B,T,n_head,hd", ATTENTION_SHAPES)
def test_attention_matches_cpu_float64(B, T, n_head, hd):
    torch.manual_seed(7)
    qkv = torch.randn(B, T, 3 * n_head * hd, dtype=torch.float64, requires_grad=True)
    (cpu_out, cpu_g), (gpu_out, gpu_g) = both_devices(
        lambda t: ops.causal_attention(t, n_head), qkv)
    for a, c in zip(gpu_out + gpu_g, cpu_out + cpu_g):
        assert_close_rel(a, c, what=f"attention T={T} hd={hd}")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(5, 128), (3, 4, 37)])
def test_gelu_matches_cpu_float64(approximate, shape):
    torch.manual_seed(8)
    x = 3 * torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True)
    (cpu_out, cpu_g), (gpu_out, gpu_g) = both_devices(
        lambda x, b: ops.bias_gelu(x, b, approximate), x, b)
    for a, c in zip(gpu_out + gpu_g, cpu_out + cpu_g):
        assert_close_rel(a, c, what=f"gelu {approximate}")


def gelu_float64_tail_exact(u, approximate):
    """GELU and its derivative in float64 by formulas that keep their
    relative accuracy in the left tail, where PyTorch's own float64 kernel
    (0.5 u (1 + erf(u / sqrt 2))) cancels: at u = -8.25 it gives -4.58e-16
    for -6.53e-16."""
    if approximate == "none":
        cdf = 0.5 * torch.special.erfc(-u / math.sqrt(2))
        return u * cdf, cdf + u * torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    # 0.5 (1 + tanh(y)) = sigmoid(2 y)
    y = math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)
    s = torch.sigmoid(2 * y)
    dy = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * u * u)
    return u * s, s + 2 * u * s * torch.sigmoid(-2 * y) * dy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_low_precision_elementwise(approximate, dtype):
    """The 16-bit GELU kernels' own math (gelu.cu, Gelu16Math: erfc and tanh
    of hardware exponentials) against float64, element by element: output
    and gradient at most one unit in the last place of the dtype off the
    exact value, over the left tail too (results down to 1e-30, where only
    a relative error bound keeps them right: PyTorch's 1 + erf(u / sqrt 2)
    in float is 0 below u = -5.5), and inf and NaN as PyTorch has them.
    Plus the bias gradient within 2x PyTorch's error."""
    torch.manual_seed(17)
    u = torch.cat([torch.linspace(-14, 14, 20001), 3 * torch.randn(20000),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-4])])
    width = 256
    u = u[: u.numel() // width * width].view(-1, width)
    x = u.to(dtype)
    y64, g64 = gelu_float64_tail_exact(x.double(), approximate)
    xd = x.to(DEV).requires_grad_(True)
    y = ops.bias_gelu(xd, None, approximate)
    (g,) = torch.autograd.grad(y, xd, torch.ones_like(y))

    def ulp(v):  # spacing of dtype at |v| (its smallest normal's below that)
        info = torch.finfo(dtype)
        return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(info.tiny)))) * info.eps

    for name, ours, exact in (("gelu", y, y64), ("grad", g, g64)):
        err = (ours.double().cpu() - exact).abs()
        # results past float's normal range come out as 0 (flushed)
        big = exact.abs() >= 1e-30
        worst = (err[big] / ulp(exact[big])).max().item()
        assert worst <= 1.0, f"{name} {approximate} {dtype}: {worst:.2f} ulp off float64"
        assert (err[~big] <= 1e-30).all()

    # inf and NaN: the values PyTorch's own kernel gives in the dtype
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0], device=DEV,
                           dtype=dtype).repeat(8).view(4, 8)
    sx = special.clone().requires_grad_(True)
    ours = ops.bias_gelu(sx, None, approximate)
    (ours_g,) = torch.autograd.grad(ours, sx, torch.ones_like(ours))
    rx = special.clone().requires_grad_(True)
    theirs = torch.nn.functional.gelu(rx, approximate=approximate)
    (theirs_g,) = torch.autograd.grad(theirs, rx, torch.ones_like(theirs))
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    torch.testing.assert_close(ours_g, theirs_g, equal_nan=True)

    # the bias gradient: a column sum of the (rounded) gradient
    xb = (3 * torch.randn(4096, 384)).to(dtype)
    b = torch.randn(384).to(dtype)
    gyb = torch.randn(4096, 384).to(dtype)

    def run(x, b, dt, fn):
        x, b = x.to(dt).requires_grad_(True), b.to(dt).requires_grad_(True)
        return torch.autograd.grad(fn(x, b), (x, b), gyb.to(x.device, dt))

    torch_gelu = lambda x, b: torch.nn.functional.gelu(x + b, approximate=approximate)
    exact = run(xb, b, torch.float64, torch_gelu)
    ref = run(xb.to(DEV), b.to(DEV), dtype, torch_gelu)
    ours = run(xb.to(DEV), b.to(DEV), dtype, lambda x, b: ops.bias_gelu(x, b, approximate))
    for name, a, r, e in zip(("grad x", "grad bias"), ours, ref, exact):
        check_within_2x(f"{name} {approximate}", a, r, e.to(DEV), 0.0)


@pytest.mark.parametrize("B,T,C,n_head,bias,gelu", [
    (2, 9, 32, 2, True, "exact"),
    (2, 97, 120, 3, False, "tanh"),
    (1, 70, 128, 1, True, "tanh"),
])
def test_block_matches_cpu_float64(B, T, C, n_head, bias, gelu):
    torch.manual_seed(9)
    cfg = make_config(C, n_head, bias, gelu)
    cpu_block = randomize(nanoblock.Block(cfg)).double()
    gpu_block = copy.deepcopy(cpu_block).to(DEV)
    x = torch.randn(B, T, C, dtype=torch.float64)
    gy = torch.randn(B, T, C, dtype=torch.float64)
    y_cpu, g_cpu = run_block(cpu_block, x, gy)
    y_gpu, g_gpu = run_block(gpu_block, x.to(DEV), gy.to(DEV))
    assert_close_rel(y_gpu, y_cpu, what="block out")
    assert g_cpu.keys() == g_gpu.keys()
    for name in g_cpu:
        assert_close_rel(g_gpu[name], g_cpu[name], what=f"grad {name}")


# ---------------------------------------------------------------------------
# float32 forward against float64 (covers the vector / scalar load paths)


@pytest.mark.parametrize("C", [33, 64, 768, 1600])
@pytest.mark.parametrize("misaligned", [False, True])
def test_layer_norm_float32_small(C, misaligned):
    torch.manual_seed(10)
    N = 37
    if misaligned:  # contiguous, but one element past a 16-byte boundary
        x = torch.randn(N * C + 1, device=DEV)[1:].view(N, C)
    else:
        x = torch.randn(N, C, device=DEV)
    w = 1 + 0.2 * torch.randn(C, device=DEV)
    b = torch.randn(C, device=DEV)
    r = torch.randn(N, C, device=DEV)
    ref = F.layer_norm(x.double(), (C,), w.double(), b.double(), 1e-5)
    assert rel_err(ops.layer_norm(x, w, b), ref) < 1e-6
    total, out = ops.add_layer_norm(x, r, w, b)
    assert rel_err(total, x.double() + r.double()) < 1e-7
    ref = F.layer_norm(x.double() + r.double(), (C,), w.double(), b.double(), 1e-5)
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("C", [768, 1600, 7000, 16392])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_layer_norm_backward_low_precision_shapes(C, dtype):
    """The backward's shapes in 16-bit types (csrc/cuda/layernorm.cu,
    backward_shape): two warps a row, four teams a block (C = 768), four
    warps a row, two teams a block, each on its own barrier (1600), fourteen
    warps alone in a block (7000), and a row longer than its team's slots
    (16392). Every output and gradient at most 2x PyTorch's error in the same
    dtype, against float64; N spreads the rows over every row group."""
    torch.manual_seed(16)
    N = 1203
    x = torch.randn(N, C, device=DEV)
    r = torch.randn(N, C, device=DEV)
    w = 1 + 0.3 * torch.randn(C, device=DEV)
    b = torch.randn(C, device=DEV)
    gs, gy = torch.randn(N, C, device=DEV), torch.randn(N, C, device=DEV)

    def run(fn, dt):
        ins = [t.to(dt).requires_grad_(True) for t in (x, r, w, b)]
        total, out = fn(*ins)
        grads = torch.autograd.grad((total, out), ins, (gs.to(dt), gy.to(dt)))
        return [total, out] + list(grads)

    def reference(x, r, w, b):
        total = x + r
        return total, F.layer_norm(total, (C,), w, b, 1e-5)

    exact = run(reference, torch.float64)
    ref = run(reference, dtype)
    ours = run(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b), dtype)
    names = ["sum", "out", "grad x", "grad residual", "grad weight", "grad bias"]
    for name, a, rf, ex in zip(names, ours, ref, exact):
        check_within_2x(f"{name} C={C}", a, rf, ex, 1e-3 * ex.abs().max().item())


@pytest.mark.parametrize("misaligned", [False, True])
def test_layer_norm_backward_float32_small(misaligned):
    # misaligned: rows one element past a 16-byte boundary, so the backward
    # takes narrower vectors than 16 bytes
    torch.manual_seed(15)
    N, C = 300, 768
    base = torch.randn(N * C + 1, device=DEV)
    x = (base[1:] if misaligned else base[:-1]).view(N, C).requires_grad_(True)
    w = (1 + 0.2 * torch.randn(C, device=DEV)).requires_grad_(True)
    b = torch.randn(C, device=DEV, requires_grad=True)
    gy = torch.randn(N, C, device=DEV)
    grads = torch.autograd.grad(ops.layer_norm(x, w, b), (x, w, b), gy)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref = torch.autograd.grad(F.layer_norm(x64, (C,), w64, b64, 1e-5), (x64, w64, b64),
                              gy.double())
    for name, g, r in zip(("x", "weight", "bias"), grads, ref):
        assert rel_err(g, r) < 1e-5, f"grad {name}: {rel_err(g, r):.2e}"


# ---------------------------------------------------------------------------
# float16 / bfloat16: at most 2x the reference Block's error


LOW_PRECISION_CASES = [
    # B, T, n_head, hd, dtype, gelu
    (3, 1, 2, 32, torch.bfloat16, "exact"),
    (2, 97, 3, 64, torch.bfloat16, "tanh"),
    (2, 97, 2, 80, torch.float16, "exact"),
    (1, 1025, 2, 80, torch.bfloat16, "exact"),
    (1, 1025, 4, 32, torch.float16, "tanh"),
    (1, 2048, 2, 128, torch.bfloat16, "tanh"),
    (1, 2048, 2, 64, torch.float16, "exact"),
    # issue 5: long sequences on the GPU, against float64
    (1, 8192, 2, 64, torch.bfloat16, "exact"),
    (1, 8192, 2, 64, torch.float32, "tanh"),
]


@pytest.mark.parametrize("B,T,n_head,hd,dtype,gelu", LOW_PRECISION_CASES)
def test_block_low_precision_vs_reference(B, T, n_head, hd, dtype, gelu):
    check_block_low_precision(B, T, n_head, hd, dtype, gelu, bias=False)


@pytest.mark.parametrize("B,T,n_head,hd,dtype", [
    (8, 64, 6, 64, torch.bfloat16),  # C = 384, the tiny config's rows: one warp a row
    (2, 97, 12, 64, torch.float16),  # C = 768: two warps a row
    (3, 33, 6, 66, torch.bfloat16),  # C = 396: 8-byte vectors, four slots a thread
    (1, 50, 25, 64, torch.bfloat16),  # C = 1600: four warps a row, two teams a block
    (2, 65, 3, 64, torch.float32),
    # C = 8256: 16-bit rows past 8192 elements, where ln_2's backward has no
    # room for the running column sums and the launcher takes them in
    # bias_grad passes of their own (layernorm.cu, kMaxRunningSumBytes)
    (1, 9, 86, 96, torch.bfloat16),
])
def test_block_low_precision_biases_vs_reference(B, T, n_head, hd, dtype):
    """bias=True without dropout: both c_proj bias gradients are column sums
    that ln_2's backward takes in its sweep (grad_out's and d_x1's, block.cpp)."""
    check_block_low_precision(B, T, n_head, hd, dtype, "exact", bias=True)


@pytest.mark.parametrize("B,T,n_head,hd,dtype,bias", [
    (8, 64, 6, 64, torch.bfloat16, True),  # the tiny config's C = 384
    # the tiny config itself: weight gradients with K = 16384, where cuBLAS
    # picks split-K kernels that take more workspace than PyTorch's cuBLASLt one
    (64, 256, 6, 64, torch.bfloat16, True),
    (2, 97, 12, 64, torch.float16, True),
    (3, 33, 6, 66, torch.bfloat16, False),  # C = 396: rows 8-byte aligned
    (2, 13, 3, 25, torch.bfloat16, True),  # C = 75: rows 2-byte aligned, odd leading dims
    (1, 1, 2, 32, torch.float16, True),  # one row: every GEMM goes to ATen (a dim of 1)
])
def test_block_low_precision_gemm_paths(B, T, n_head, hd, dtype, bias, gemm_path):
    """The Block's GEMMs by cuBLASLt's cached plans (the bias in its epilogue,
    transposed operands for the weight gradients, the last residual add as
    the GEMM's C) and by ATen."""
    check_block_low_precision(B, T, n_head, hd, dtype, "exact", bias=bias)


def check_block_low_precision(B, T, n_head, hd, dtype, gelu, bias):
    """The Block's output and every gradient in dtype: at most 2x the error of
    the reference Block in dtype, against it in float64."""
    torch.manual_seed(11)
    C = n_head * hd
    cfg = make_config(C, n_head, bias=bias, gelu=gelu)
    ours = randomize(nanoblock.Block(cfg)).to(DEV)
    ref = ReferenceBlock(cfg).to(DEV)
    ref.load_state_dict(ours.state_dict())
    ref64 = ReferenceBlock(cfg, attention="manual").to(DEV).double()
    ref64.load_state_dict(ours.state_dict())
    ours.to(dtype)
    ref.to(dtype)

    x = torch.randn(B, T, C, device=DEV)
    gy = torch.randn(B, T, C, device=DEV)
    y64, g64 = run_block(ref64, x.double(), gy.double())
    y_ours, g_ours = run_block(ours, x.to(dtype), gy.to(dtype))
    y_ref, g_ref = run_block(ref, x.to(dtype), gy.to(dtype))

    def check(name, a, r, exact):
        # float32's own rounding is 1e-7: a floor of 1e-4 would hide a real defect
        floor = (1e-6 if dtype == torch.float32 else 1e-4) * exact.abs().max().item() + 1e-6
        check_within_2x(name, a, r, exact, floor)

    check("out", y_ours, y_ref, y64)
    for name in g64:
        check(f"grad {name}", g_ours[name], g_ref[name], g64[name])


# ---------------------------------------------------------------------------
# Determinism and odd inputs


@pytest.mark.parametrize("dtype,C", [(torch.bfloat16, 192), (torch.float32, 192),
                                     (torch.bfloat16, 75)])
def test_block_backward_deterministic(dtype, C, gemm_path):
    """Bit for bit the same twice; with cuBLASLt, because a shape keeps the
    algorithm its plan chose (gemm.cu)."""
    torch.manual_seed(12)
    cfg = make_config(C, 3, bias=True, gelu="exact")
    block = randomize(nanoblock.Block(cfg)).to(DEV, dtype)
    x = torch.randn(2, 300, C, device=DEV, dtype=dtype)
    gy = torch.randn_like(x)
    y1, g1 = run_block(block, x, gy)
    y2, g2 = run_block(block, x, gy)
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"grad {name} differs between two runs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_plans_made_under_graph_capture(dtype):
    """GEMM shapes first seen inside a CUDA graph capture: their cuBLASLt
    plans (the heuristic: host work only) are made during the capture, and
    the replay gives the bits of an eager call, which reuses those plans."""
    torch.manual_seed(14)
    block = randomize(nanoblock.Block(make_config(96, 2, bias=True))).to(DEV, dtype)
    params = [p.detach() for p in block.block_params()]
    warm = torch.randn(2, 8, 96, device=DEV, dtype=dtype)
    x = torch.randn(3, 41, 96, device=DEV, dtype=dtype)  # 123 rows: new GEMM shapes
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # warm-up off the capture
        _ops.block_forward(warm, *params, 2, "none")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = _ops.block_forward(x, *params, 2, "none")[0]
    graph.replay()
    with torch.no_grad():
        eager = _ops.block_forward(x, *params, 2, "none")[0]
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_ops_backward_deterministic_small():
    torch.manual_seed(13)
    qkv = torch.randn(2, 200, 3 * 96, device=DEV)
    gy = torch.randn(2, 200, 96, device=DEV)
    out, lse = _ops.causal_attention_forward(qkv, 3)
    g1 = _ops.causal_attention_backward(gy, qkv, out, lse, 3)
    g2 = _ops.causal_attention_backward(gy, qkv, out, lse, 3)
    assert torch.equal(g1, g2)
    x = torch.randn(4000, 96, device=DEV)
    assert torch.equal(_ops.gelu_backward(x, x, None, "none")[1],
                       _ops.gelu_backward(x, x, None, "none")[1])
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(5000, 768, device=DEV, dtype=dtype)
        w = torch.randn(768, device=DEV, dtype=dtype)
        gy, res = torch.randn_like(x), torch.randn_like(x)
        _, mean, rstd = _ops.layer_norm_forward(x, w, None, 1e-5)
        g1 = _ops.layer_norm_backward(gy, x, w, mean, rstd, res)
        g2 = _ops.layer_norm_backward(gy, x, w, mean, rstd, res)
        for a, c in zip(g1, g2):
            assert torch.equal(a, c)


def test_empty_sizes_small():
    for dtype in (torch.float32, torch.bfloat16):
        qkv = torch.randn(2, 0, 96, device=DEV, dtype=dtype, requires_grad=True)
        out = ops.causal_attention(qkv, 2)
        assert out.shape == (2, 0, 32)
        out.sum().backward()
        assert qkv.grad.shape == qkv.shape
        qkv0 = torch.randn(0, 5, 96, device=DEV, dtype=dtype)
        assert ops.causal_attention(qkv0, 2).shape == (0, 5, 32)

        x = torch.randn(0, 16, device=DEV, dtype=dtype, requires_grad=True)
        w = torch.ones(16, device=DEV, dtype=dtype, requires_grad=True)
        b = torch.zeros(16, device=DEV, dtype=dtype, requires_grad=True)
        ops.layer_norm(x, w, b).sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w))
        assert torch.equal(b.grad, torch.zeros_like(b))
        assert ops.bias_gelu(torch.randn(0, 16, device=DEV, dtype=dtype), b).shape == (0, 16)
        gx, gb = _ops.gelu_backward(torch.empty(0, 16, device=DEV, dtype=dtype),
                                    torch.empty(0, 16, device=DEV, dtype=dtype), b, "none")
        assert gx.shape == (0, 16) and torch.equal(gb, torch.zeros_like(gb))


def test_attention_float32_vs_sdpa_small():
    """A float32 spot check against PyTorch's own attention, non-contiguous input."""
    torch.manual_seed(14)
    B, T, nh, hd = 2, 77, 4, 48
    C = nh * hd
    base = torch.randn(B, 3 * C, T, device=DEV)
    qkv = base.transpose(1, 2).requires_grad_(False)  # non-contiguous [B, T, 3C]
    qkv = qkv.detach().requires_grad_(True)
    out = ops.causal_attention(qkv, nh)
    q, k, v = qkv.double().split(C, dim=2)
    heads = lambda t: t.view(B, T, nh, hd).transpose(1, 2)
    ref = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    ref = ref.transpose(1, 2).reshape(B, T, C)
    assert rel_err(out, ref) < 1e-5
    gy = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, gy)
    qkv64 = qkv.detach().double().requires_grad_(True)
    q, k, v = qkv64.split(C, dim=2)
    ref = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    (g64,) = torch.autograd.grad(ref.transpose(1, 2).reshape(B, T, C), qkv64, gy.double())
    assert rel_err(g, g64) < 1e-5
    assert math.isfinite(rel_err(g, g64))


# ---------------------------------------------------------------------------
# The attention op alone in float16 / bfloat16 (the tensor-core path for head
# dims 32, 64, 80, 96, 128; the generic path for others and for misaligned
# input), against float64, at most 2x the error of PyTorch's SDPA.


_sdpa_heads = sdpa_attention


def attention_fwd_bwd(fn, qkv, gy):
    """fn(qkv) and the gradient of qkv for the output gradient gy."""
    qkv = qkv.detach().requires_grad_(True)
    out = fn(qkv)
    (g,) = torch.autograd.grad(out, qkv, gy)
    return out.detach(), g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hd", [32, 64, 80, 96, 128, 48])
@pytest.mark.parametrize("T", [1, 17, 64, 65, 200])
def test_attention_low_precision_small(dtype, hd, T, attention_path):
    skip_unless_wgmma_takes(attention_path, hd)
    check_attention_low_precision(dtype, hd, T)


# Lengths around and past the wgmma kernels' tiles (64 and 128 positions,
# blocks of up to 128): partial last tiles, many key tiles.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("T", [97, 1025, 2048])
def test_attention_low_precision_long(dtype, hd, T, attention_path):
    check_attention_low_precision(dtype, hd, T, B=1)


def check_attention_low_precision(dtype, hd, T, B=2, misaligned=False, qkv64=None):
    torch.manual_seed(15)
    nh = 2
    C = nh * hd
    if qkv64 is None:
        qkv64 = torch.randn(B, T, 3 * C, device=DEV, dtype=torch.float64)
    gy64 = torch.randn(B, T, C, device=DEV, dtype=torch.float64)
    if misaligned:
        storage = torch.empty(qkv64.numel() + 1, device=DEV, dtype=dtype)
        qkv_low = storage[1:].view(B, T, 3 * C)
        qkv_low.copy_(qkv64)
    else:
        qkv_low = qkv64.to(dtype)
    gy_low = gy64.to(dtype)
    out64, g64 = attention_fwd_bwd(lambda t: _sdpa_heads(t, nh), qkv64, gy64)
    out_ours, g_ours = attention_fwd_bwd(lambda t: ops.causal_attention(t, nh), qkv_low, gy_low)
    out_ref, g_ref = attention_fwd_bwd(lambda t: _sdpa_heads(t, nh), qkv_low.contiguous(), gy_low)
    for name, a, r, exact in [("out", out_ours, out_ref, out64), ("grad_qkv", g_ours, g_ref, g64)]:
        check_within_2x(name, a, r, exact, 1e-3 * exact.abs().max().item())


# Scores that rise along the keys, by small steps and by jumps of up to 12
# (natural-log units) now and then: a row's running max moves on many key
# tiles, by small and by large amounts, so the online softmax rescales its
# sums and outputs often and by factors far from 1 (random scores move it
# rarely after the first tiles). Queries point along u, keys along u by
# their rising level c_j, plus noise: s_ij ~ c_j.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hd", [64, 128])
def test_attention_low_precision_rising_scores(dtype, hd, attention_path):
    torch.manual_seed(16)
    B, T, nh = 2, 1025, 2
    u = torch.randn(hd, device=DEV, dtype=torch.float64)
    u /= u.norm()
    steps = 0.2 * torch.randn(B, T, nh, device=DEV, dtype=torch.float64)
    jumps = torch.rand(B, T, nh, device=DEV, dtype=torch.float64) < 1 / 40
    steps += jumps * 12 * torch.rand(B, T, nh, device=DEV, dtype=torch.float64)
    level = steps.cumsum(1)
    level -= level.amax(1, keepdim=True) / 2  # scores of both signs
    q = hd ** 0.5 * u * (1 + 0.1 * torch.randn(B, T, nh, 1, device=DEV, dtype=torch.float64))
    k = level[..., None] * u + 0.3 * torch.randn(B, T, nh, hd, device=DEV, dtype=torch.float64)
    v = torch.randn(B, T, nh, hd, device=DEV, dtype=torch.float64)
    qkv64 = torch.cat([q, k, v], dim=2).reshape(B, T, 3 * nh * hd)
    check_attention_low_precision(dtype, hd, T, B=B, qkv64=qkv64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_low_precision_misaligned_small(dtype, attention_path):
    check_attention_low_precision(dtype, 64, 65, misaligned=True)


@pytest.mark.parametrize("dtype,hd", [(torch.bfloat16, 64), (torch.float16, 128)])
def test_attention_low_precision_deterministic(dtype, hd, attention_path):
    """Two runs of the forward and backward, bit for bit."""
    torch.manual_seed(17)
    qkv = torch.randn(2, 1025, 3 * 2 * hd, device=DEV, dtype=dtype)
    gy = torch.randn(2, 1025, 2 * hd, device=DEV, dtype=dtype)
    out1, lse1 = _ops.causal_attention_forward(qkv, 2)
    out2, lse2 = _ops.causal_attention_forward(qkv, 2)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    g1 = _ops.causal_attention_backward(gy, qkv, out1, lse1, 2)
    g2 = _ops.causal_attention_backward(gy, qkv, out1, lse1, 2)
    assert torch.equal(g1, g2)


# Run in a fresh process (the dispatch reads NANOBLOCK_WGMMA_* once): the
# wgmma attention's forward and backward at head dim HD, errors of out and
# of grad_qkv against float64, as JSON.
_WGMMA_SHAPE_WORKER = """
import json, sys, torch
import nanoblock
_ops = torch.ops.nanoblock
hd = int(sys.argv[1])
torch.manual_seed(21)
B, T, nh = 2, 300, 2
qkv64 = torch.randn(B, T, 3 * nh * hd, device="cuda", dtype=torch.float64)
gy64 = torch.randn(B, T, nh * hd, device="cuda", dtype=torch.float64)
def run(qkv, gy):
    out, lse = _ops.causal_attention_forward(qkv, nh)
    return out, _ops.causal_attention_backward(gy, qkv, out, lse, nh)
out64, g64 = run(qkv64, gy64)
out, g = run(qkv64.bfloat16(), gy64.bfloat16())
err = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
print(json.dumps({"out": err(out, out64), "grad": err(g, g64)}))
"""


def run_wgmma_shape_worker(hd, env):
    import json, os, subprocess, sys
    done = subprocess.run([sys.executable, "-c", _WGMMA_SHAPE_WORKER, str(hd)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    return done, (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None)


@pytest.mark.parametrize("hd,forward,grad_kv,grad_q", [
    (64, "128,2,2", "64,2,2", "128,2,2"),   # producer forward, pipelined grad_kv and grad_q
    (64, "64,2,0", "128,2,0", "64,1,0"),    # serial forward (the default at hd 128)
    (128, "64,2,2", "64,2,0", "64,2,2"),
])
def test_wgmma_tile_shapes_from_the_environment(hd, forward, grad_kv, grad_q):
    """NANOBLOCK_WGMMA_FORWARD / _GRAD_KV / _GRAD_Q put other built shapes in
    the dispatch (for timing them): those runs are as accurate as the
    default shapes', and a malformed shape raises, naming the variable."""
    if not _ops.wgmma_attention_available():
        pytest.skip("the wgmma attention needs a compute capability 9.0 GPU and an sm_90a build")
    names = ("NANOBLOCK_WGMMA_FORWARD", "NANOBLOCK_WGMMA_GRAD_KV", "NANOBLOCK_WGMMA_GRAD_Q")
    done, default = run_wgmma_shape_worker(hd, {})
    assert default is not None, done.stderr[-2000:]
    done, other = run_wgmma_shape_worker(hd, dict(zip(names, (forward, grad_kv, grad_q))))
    assert other is not None, done.stderr[-2000:]
    for part in ("out", "grad"):
        assert other[part] <= 2 * default[part] + 1e-4, (part, other, default)
    done, _ = run_wgmma_shape_worker(hd, {"NANOBLOCK_WGMMA_FORWARD": "128,2"})
    assert done.returncode != 0 and "NANOBLOCK_WGMMA_FORWARD must be TILE,WARPGROUPS,SCHEDULE" \
        in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("dtype,hd", [(torch.bfloat16, 64), (torch.float16, 128)])
def test_attention_low_precision_in_cuda_graph(dtype, hd, attention_path):
    """The forward and backward captured in a CUDA graph (no host sync, the
    current stream, PyTorch's allocator) replay to the eager bits."""
    torch.manual_seed(18)
    qkv = torch.randn(2, 300, 3 * 2 * hd, device=DEV, dtype=dtype)
    gy = torch.randn(2, 300, 2 * hd, device=DEV, dtype=dtype)
    out, lse = _ops.causal_attention_forward(qkv, 2)
    grad = _ops.causal_attention_backward(gy, qkv, out, lse, 2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture
        _ops.causal_attention_backward(gy, qkv, *_ops.causal_attention_forward(qkv, 2), 2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = _ops.causal_attention_forward(qkv, 2)
        g_grad = _ops.causal_attention_backward(gy, qkv, g_out, g_lse, 2)
    qkv_clean = qkv.clone()
    qkv.normal_()  # the replay must read the inputs anew
    graph.replay()
    qkv.copy_(qkv_clean)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g_out, out) and torch.equal(g_lse, lse) and torch.equal(g_grad, grad)


# ---------------------------------------------------------------------------
# Reliability (issue 5): NaN / Inf stay causal, two streams, flat memory

# conftest.check_attention_causal, strict: a NaN or Inf reaches no earlier
# position at all (masked pairs of a diagonal tile are skipped, or their
# non-finite operands set to 0, csrc/cuda/attention_mma.cu), and what it
# does not reach has the very bits of the sequence cut off before it (or of
# the clean run). The tensor-core kernels' tiles are 16 to 128 positions, the
# generic kernels' 32: positions sit at the start, inside and at the end of
# the first, a middle and the last (partial) tile, T = 300 being a multiple
# of none; T = 7 is shorter than any tile.
NAN_POSITIONS = [0, 5, 31, 63, 64, 127, 128, 150, 191, 255, 256, 290, 299]


def check_nan_is_causal(dtype, T, hd, part, positions, n_head=2, dropout_p=0.0):
    torch.manual_seed(16)
    qkv = torch.randn(2, T, 3 * n_head * hd, device=DEV, dtype=dtype)
    grad_out = torch.randn(2, T, n_head * hd, device=DEV, dtype=dtype)
    rng = torch.tensor([16, 0], dtype=torch.int64, device=DEV) if dropout_p else None
    differ = []
    for pos in positions:
        for value in NON_FINITE:
            differ += check_attention_causal(qkv, grad_out, n_head, pos, part, value,
                                             dropout_p, rng)
    assert not differ, "contained, but not the same bits:\n" + "\n".join(differ[:20])


# Tensor-core kernels: forward warps of 32 (head dims <= 64) or 16 queries,
# grad_q key tiles of 64 or 32, grad_kv query tiles of 32.
# wgmma kernels (attention_path "wgmma", head dims 64, 128): query blocks
# of 64 or 128, key tiles of 64, grad_kv query tiles of 64 or 128.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hd", [32, 64, 80, 128])
@pytest.mark.parametrize("part", [0, 1, 2, 3])  # q, k, v, grad_out
def test_nan_is_causal_in_attention_mma(dtype, hd, part, attention_path):
    skip_unless_wgmma_takes(attention_path, hd)
    check_nan_is_causal(dtype, 300, hd, part, NAN_POSITIONS)
    check_nan_is_causal(dtype, 7, hd, part, [0, 3, 6])


# Generic kernels: float32 / float64, and float16 / bfloat16 at head dims the
# tensor-core kernels do not take.
@pytest.mark.parametrize("dtype,hd", [(torch.float32, 16), (torch.float32, 64),
                                      (torch.float64, 40), (torch.float64, 128),
                                      (torch.bfloat16, 16), (torch.float16, 48)])
@pytest.mark.parametrize("part", [0, 1, 2, 3])
def test_nan_is_causal_in_attention_generic(dtype, hd, part):
    check_nan_is_causal(dtype, 300, hd, part, NAN_POSITIONS)
    check_nan_is_causal(dtype, 7, hd, part, [0, 3, 6])


@pytest.mark.parametrize("dtype,hd", [(torch.bfloat16, 64), (torch.float16, 128),
                                      (torch.float32, 64)])
@pytest.mark.parametrize("part", [0, 1, 2, 3])
def test_nan_is_causal_in_attention_with_dropout(dtype, hd, part):
    """With dropout the comparison is the clean run (same T, same rng)."""
    check_nan_is_causal(dtype, 300, hd, part, [0, 64, 150, 299], dropout_p=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_is_causal_in_the_block_small(dtype):
    """conftest.check_block_causal: the whole Block on CUDA, to rounding."""
    nb, _ = block_pair(make_config(128, 2), dtype=dtype, device=DEV)
    x = torch.randn(2, 300, 128, device=DEV, dtype=dtype)
    grad_out = torch.randn_like(x)
    for pos in [0, 100, 127, 128, 299]:
        for value in NON_FINITE:
            check_block_causal(nb, x, grad_out, pos, value)


def test_two_streams_give_the_results_of_one():
    """Blocks forward + backward on two CUDA streams at once equal the same
    work done one at a time on the default stream, bit for bit."""
    torch.manual_seed(17)
    block = randomize(nanoblock.Block(make_config(256, 4))).to(DEV)
    inputs = [torch.randn(4, 512, 256, device=DEV) for _ in range(2)]
    grad = torch.randn(4, 512, 256, device=DEV)
    alone = [run_block(block, x, grad) for x in inputs]
    streams = [torch.cuda.Stream() for _ in inputs]
    results = [None, None]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())  # inputs are ready
    for _ in range(5):  # interleaved launches, so the streams overlap
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                x = inputs[i].detach().requires_grad_(True)
                y = block(x)
                g = torch.autograd.grad(y, [x, *block.parameters()], grad)
                results[i] = (y.detach(), g)
    torch.cuda.synchronize()
    for (y, g), (y_alone, g_alone) in zip(results, alone):
        assert torch.equal(y, y_alone)
        assert torch.equal(g[0], g_alone["x"])
        for (name, _), a in zip(block.named_parameters(), g[1:]):
            assert torch.equal(a, g_alone[name]), f"grad {name} differs on two streams"


def test_device_memory_stays_flat_over_1000_steps():
    """1000 training steps of a GPT of nanoblock Blocks: the live tensors
    (torch.cuda.memory_allocated) are exactly what they were after warm-up,
    and the device's free memory (outside the caching allocator too) has not
    shrunk by more than a few MiB."""
    model = nanoblock.GPT(nanoblock.GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2,
                                              n_embd=64)).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 50, (8, 64), device=DEV)

    def step():
        _, loss = model(idx, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(50):
        step()
    torch.cuda.synchronize()
    allocated, free = torch.cuda.memory_allocated(), torch.cuda.mem_get_info()[0]
    for _ in range(1000):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated
    shrunk = free - torch.cuda.mem_get_info()[0]
    assert shrunk < 16 * 2**20, f"free device memory shrank by {shrunk / 2**20:.1f} MiB"



# ---------------------------------------------------------------------------
# Dropout (issue 7). For the same rng the CUDA kernels drop exactly the
# elements the CPU kernels drop (the mask is a function of rng and the
# element's index, kernel_api.h): float64 agrees with the CPU to rounding,
# the masks read off each attention kernel equal the CPU's bit for bit in
# every dtype and path, and float16 / bfloat16 are within 2x of PyTorch's
# error in the same dtype given the same masks. The mask-reading helpers are
# tests/test_dropout.py's, run on the GPU.

P_DROP = 0.2


@pytest.mark.parametrize("B,T,n_head,hd", ATTENTION_SHAPES)
def test_dropout_attention_matches_cpu_float64(B, T, n_head, hd):
    """The generic kernels (float64), forward and backward, on the CPU's
    float64 result with the same rng."""
    torch.manual_seed(7)
    qkv = torch.randn(B, T, 3 * n_head * hd, dtype=torch.float64, requires_grad=True)
    (cpu_out, cpu_g), (gpu_out, gpu_g) = both_devices(
        lambda t, rng: ops.causal_attention(t, n_head, 0.3, rng), qkv, rng_of(2024, 12))
    for a, c in zip(gpu_out + gpu_g, cpu_out + cpu_g):
        assert_close_rel(a, c, what=f"attention with dropout T={T} hd={hd}")


def attention_masks_read_off(B, T, n_head, hd, p, rng, dtype):
    """Which attention probabilities [B, n_head, T (query), T (key)] the
    attention op keeps, read off exactly (kept <=> nonzero) from each of its
    kernels, on rng's device in `dtype` (T <= hd): q = 0, so every visible
    key has probability P_ij = 1 / (i + 1), and k_j = e_j (unit vectors);
      forward: v_j = e_j, so out_i = sum_j P_ij Z_ij e_j;
      backward: v_j = ones, dO_i = e_i, out = 0 (so D = 0), so
        dS_ij = P_ij Z_ij dP_ij = P_ij Z_ij, dq_i = scale sum_j dS_ij e_j,
        and dv_j = sum_i P_ij Z_ij e_i.
    -> (forward, grad_kv (from dv), grad_q (from dq)) boolean masks."""
    C = n_head * hd
    eye = torch.eye(T, hd, dtype=dtype, device=rng.device)  # row j: e_j
    qkv = torch.zeros(B, T, 3 * C, dtype=dtype, device=rng.device)
    qkv[:, :, C:] = eye.repeat(1, 2 * n_head)  # k_j = v_j = e_j in every head
    out, lse = _ops.causal_attention_forward(qkv, n_head, p, rng)

    def heads(t):  # [B, T, C] -> [B, n_head, T, T (the first T of the head dims)]
        return t.view(B, T, n_head, hd).transpose(1, 2)[..., :T]

    forward = heads(out) != 0
    qkv[:, :, 2 * C:] = 1
    grad_out = eye.repeat(1, n_head).expand(B, T, C).contiguous()
    grad = _ops.causal_attention_backward(grad_out, qkv, torch.zeros_like(out), lse, n_head, p,
                                          rng)
    grad_q = heads(grad[..., :C]) != 0
    grad_kv = heads(grad[..., 2 * C:]).transpose(-1, -2) != 0
    return forward, grad_kv, grad_q


@pytest.mark.parametrize("dtype,T,hd", [
    # tensor-core kernels: several query and key tiles, odd T (mask pairs that
    # straddle Philox's groups of four), every head dim
    (torch.bfloat16, 128, 128), (torch.bfloat16, 97, 128), (torch.float16, 64, 64),
    (torch.bfloat16, 61, 64), (torch.float16, 80, 80), (torch.bfloat16, 95, 96),
    (torch.float16, 31, 32),
    # generic kernels
    (torch.float64, 97, 100), (torch.float32, 48, 48), (torch.bfloat16, 40, 48),
])
def test_dropout_masks_of_every_attention_kernel_equal_the_cpus(dtype, T, hd):
    """The forward, grad_kv and grad_q kernels keep exactly the probabilities
    the CPU keeps (same rng); on a mismatch, the first (b, h, query, key)."""
    B, n_head, p = 2, 2, 0.5
    rng = rng_of(99, 8)
    cpu = attention_masks_read_off(B, T, n_head, hd, p, rng, torch.float64)
    assert torch.equal(cpu[1], cpu[0]) and torch.equal(cpu[2], cpu[0])
    gpu = attention_masks_read_off(B, T, n_head, hd, p, rng.to(DEV), dtype)
    for kernel, mask in zip(("forward", "grad_kv", "grad_q"), gpu):
        wrong = mask.cpu() != cpu[0]
        assert not wrong.any(), (
            f"{kernel}: {int(wrong.sum())} of {wrong.numel()} mask elements differ from the "
            f"CPU's, the first at (b, h, query, key) = {wrong.nonzero()[0].tolist()}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hd", [32, 64, 80, 96, 128, 48])
@pytest.mark.parametrize("T", [17, 65, 200])
def test_dropout_attention_low_precision_small(dtype, hd, T):
    """The tensor-core kernels (the generic ones for head dim 48) with
    dropout, against float64 attention with the same mask (read off on the
    CPU): at most 2x the error of PyTorch's attention in the same dtype with
    that mask, for out and for dq, dk, dv."""
    torch.manual_seed(15)
    B, nh = 2, 2
    C = nh * hd
    rng = rng_of(31, 4)
    Z = attention_mask(B, T, nh, P_DROP, rng).to(DEV)
    qkv64 = torch.randn(B, T, 3 * C, device=DEV, dtype=torch.float64)
    gy64 = torch.randn(B, T, C, device=DEV, dtype=torch.float64)
    qkv_low, gy_low = qkv64.to(dtype), gy64.to(dtype)
    out64, g64 = attention_fwd_bwd(lambda t: reference_attention(t, nh, Z), qkv64, gy64)
    out_ours, g_ours = attention_fwd_bwd(
        lambda t: ops.causal_attention(t, nh, P_DROP, rng.to(DEV)), qkv_low, gy_low)
    out_ref, g_ref = attention_fwd_bwd(lambda t: reference_attention(t, nh, Z.to(dtype)),
                                       qkv_low, gy_low)
    check_within_2x("out", out_ours, out_ref, out64, 1e-3 * out64.abs().max().item())
    for part, name in enumerate(("dq", "dk", "dv")):
        cols = slice(part * C, (part + 1) * C)
        exact = g64[..., cols]
        check_within_2x(name, g_ours[..., cols], g_ref[..., cols], exact,
                        1e-3 * exact.abs().max().item())


@pytest.mark.parametrize("B,T,C,n_head,bias,gelu", [
    (2, 9, 32, 2, True, "exact"),
    (2, 97, 120, 3, False, "tanh"),
    (1, 70, 45, 3, True, "exact"),  # odd C: the residual masks' rows straddle groups of four
    # wide rows: float64's (2052 vectors of 2) take the add + LayerNorm
    # forward's long-row kernel, float32's its widest register teams
    (1, 3, 4104, 36, True, "tanh"),
])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_dropout_block_matches_cpu_float64(B, T, C, n_head, bias, gelu, dtype, tol):
    """The whole Block op with dropout (the attention kernels, the
    add + LayerNorm and dropout_add), forward and every gradient, on the
    CPU's float64 result with the same rng. In float32 (16-byte vectors of 4
    in the elementwise kernels) a single element dropped differently would
    still show: it moves the relative error by about 1 / sqrt(B T C), 1e-2."""
    torch.manual_seed(9)
    block = randomize(nanoblock.Block(make_config(C, n_head, bias, gelu))).double()
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)

    def block_op(x, rng, *params):  # float64 on the CPU, dtype on the GPU; float64 out
        work = dtype if x.is_cuda else torch.float64
        y = ops.block(x.to(work), [q if q is None else q.to(work) for q in params], n_head,
                      block.approximate, P_DROP, rng)
        return y.double()

    params = [q.detach().requires_grad_(True) if q is not None else None
              for q in block.block_params()]
    (cpu_out, cpu_g), (gpu_out, gpu_g) = both_devices(block_op, x, rng_of(123, 8), *params)
    names = ["out", "grad x"] + [f"grad {n}" for n, q in zip(nanoblock.ops.BLOCK_PARAM_NAMES,
                                                              params) if q is not None]
    for name, a, c in zip(names, gpu_out + gpu_g, cpu_out + cpu_g):
        assert_close_rel(a, c, tol, what=f"block with dropout, {dtype}: {name}")


@pytest.mark.parametrize("B,T,n_head,hd,dtype", [
    (2, 97, 3, 64, torch.bfloat16),
    (2, 65, 2, 80, torch.float16),
    (1, 200, 2, 128, torch.bfloat16),
])
def test_dropout_block_low_precision_vs_reference(B, T, n_head, hd, dtype):
    """The Block op with dropout in float16 / bfloat16 (tensor-core attention,
    16-byte vectors of 8 in the elementwise kernels), against the Block in
    float64 with the op's masks (read off on the CPU): at most 2x the error
    of the same computation in PyTorch in the same dtype."""
    torch.manual_seed(11)
    C = n_head * hd
    rng = rng_of(4321, 16)
    masks = block_masks(B, T, C, n_head, P_DROP, rng)
    ours = randomize(nanoblock.Block(make_config(C, n_head))).to(DEV, dtype)
    exact = copy.deepcopy(ours).double()
    x = torch.randn(B, T, C, device=DEV)
    gy = torch.randn(B, T, C, device=DEV)

    def run(block, fn, dtype):
        xd = x.to(dtype).requires_grad_(True)
        params = [q for q in block.block_params() if q is not None]
        y = fn(block, xd)
        return [y.detach()] + list(torch.autograd.grad(y, [xd] + params, gy.to(dtype)))

    def nanoblock_op(block, xd):
        return ops.block(xd, block.block_params(), n_head, block.approximate, P_DROP, rng.to(DEV))

    def reference(block, xd):
        return reference_block_with_masks(block, xd, masks)

    results = zip(run(ours, nanoblock_op, dtype), run(ours, reference, dtype),
                  run(exact, reference, torch.float64))
    names = ["out", "grad x"] + [n for n, q in zip(nanoblock.ops.BLOCK_PARAM_NAMES,
                                                   ours.block_params()) if q is not None]
    for name, (a, r, e) in zip(names, results):
        check_within_2x(name, a, r, e, 1e-4 * e.abs().max().item() + 1e-6)


@pytest.mark.parametrize("B,T,C,n_head", [(2, 9, 32, 2), (1, 35, 24, 2), (2, 4, 12, 1)])
def test_dropout_gradcheck_attention_small(B, T, C, n_head):
    torch.manual_seed(2)
    qkv = f64(B, T, 3 * C)
    rng = rng_of(77, 4, DEV)
    assert torch.autograd.gradcheck(lambda t: ops.causal_attention(t, n_head, 0.4, rng), (qkv,))


@pytest.mark.parametrize("bias,gelu", [(True, "exact"), (False, "tanh")])
def test_dropout_gradcheck_block_small(bias, gelu):
    torch.manual_seed(4)
    block = randomize(nanoblock.Block(make_config(32, 2, bias, gelu))).double().to(DEV)
    block_op, params = block_op_of(block, 0.3, rng_of(31337, 8, DEV))
    x = f64(2, 9, 32)
    assert torch.autograd.gradcheck(block_op, (x, *params), fast_mode=True)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics_small(p):
    """Kept fraction 1 - p within 5 sigma and kept elements scaled by
    1 / (1 - p): the attention probabilities of the tensor-core (bfloat16)
    and the generic (float64) forward, ~1M each; the Block's two residual
    dropouts."""
    rng = rng_of(1234, 8, DEV)
    check_attention_statistics(attention_mask(64, 128, 2, p, rng, torch.float64, hd=128), p)
    # bfloat16 rounds P_ij = 1 / (i + 1), so the read-off scale by up to 2^-8
    check_attention_statistics(attention_mask(64, 128, 2, p, rng, torch.bfloat16, hd=128), p,
                               rtol=1e-2, atol=0)
    check_residual_statistics(p, rng)


def test_dropout_masks_differ_between_calls_small():
    """Another seed or offset gives an independent mask, the same rng the
    same mask; fresh draws (ops without rng, a Block in training) differ."""
    for dtype in (torch.float64, torch.bfloat16):
        check_masks_differ(DEV, dtype)
    qkv = torch.randn(2, 65, 3 * 128, device=DEV, dtype=torch.bfloat16)
    assert not torch.equal(ops.causal_attention(qkv, 2, 0.3), ops.causal_attention(qkv, 2, 0.3))
    rng = rng_of(5, 0, DEV)
    assert torch.equal(ops.causal_attention(qkv, 2, 0.3, rng),
                       ops.causal_attention(qkv, 2, 0.3, rng))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_manual_seed_makes_training_reproducible(dtype):
    check_manual_seed_reproducible(DEV, dtype)


def test_dropout_training_reaches_the_reference_validation_loss():
    """test_dropout's training run on the GPU: nanoblock's GPT and the
    reference GPT with dropout 0.1 end at the same validation loss within
    0.05 (the tolerance's reasoning is in test_dropout), and well below
    where no training would leave them."""
    ref = validation_loss_after_training(ReferenceGPT, device=DEV)
    nb = validation_loss_after_training(nanoblock.GPT, device=DEV)
    assert abs(nb - ref) < 0.05, (nb, ref)
    assert nb < 1.0, nb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_eval_mode_and_p0_are_the_no_dropout_path(dtype):
    """Bit for bit the kernels without dropout, and nothing drawn from the
    CUDA generator."""
    check_eval_and_p0_bit_for_bit(DEV, dtype)


def test_dropout_rng_must_be_on_the_gpu():
    qkv = torch.randn(1, 4, 24, device=DEV)
    with pytest.raises(RuntimeError, match="rng must be on cuda"):
        _ops.causal_attention_forward(qkv, 2, 0.1, rng_of(1))
