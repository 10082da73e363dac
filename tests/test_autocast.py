"""torch.autocast: a float32 model of nanoblock Blocks runs nanoblock's
low-precision kernels with autocast's casts, and its output and gradients are
within twice the reference Block's error under autocast, both measured
against float64. bfloat16 on the CPU; bfloat16 and float16 on CUDA (marked
`cuda`, skipped without a GPU)."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nanoblock
from nanoblock import ops
from nanoblock.reference import ReferenceBlock, ReferenceGPT

from conftest import block_pair, forward_backward, make_config, randomize_, rel_err

bf16, f64 = torch.bfloat16, torch.float64


needs_cuda = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# (device, autocast dtype)
SETTINGS = [pytest.param("cpu", bf16, id="cpu-bf16"),
            pytest.param("cuda", bf16, id="cuda-bf16", marks=needs_cuda),
            pytest.param("cuda", torch.float16, id="cuda-fp16", marks=needs_cuda)]


def autocast(device, dtype):
    return torch.autocast(device, dtype=dtype)


@pytest.mark.parametrize("device,dtype", SETTINGS)
@pytest.mark.parametrize("B,T,C,n_head,bias,gelu", [
    (2, 97, 96, 3, True, "exact"),
    (3, 7, 120, 5, False, "tanh"),
    (1, 1, 64, 4, True, "exact"),
])
def test_block_within_2x_of_reference_under_autocast(device, dtype, B, T, C, n_head, bias, gelu):
    # Weights of a trained GPT's scale (0.04): the branches are then small next
    # to the residual stream, whose precision autocast must keep (float32).
    cfg = make_config(C, n_head, bias=bias, gelu=gelu)
    ref64 = randomize_(ReferenceBlock(cfg).double(), torch.Generator().manual_seed(0), scale=0.04)
    ref64 = ref64.to(device)
    nb64 = nanoblock.Block(cfg).to(device=device, dtype=f64)
    nb64.load_state_dict(ref64.state_dict())
    x = torch.randn(B, T, C, dtype=f64).to(device)
    grad = torch.randn(B, T, C, dtype=f64).to(device)
    exact = forward_backward(ref64, x, grad)
    nb, ref = nb64.float(), copy.deepcopy(ref64).float()
    with autocast(device, dtype):
        ours = forward_backward(nb, x.float(), grad.float())
        theirs = forward_backward(ref, x.float(), grad.float())
    names = ["out", "x"] + [n for n, _ in nb.named_parameters()]
    for name, a, b, e in zip(names, [ours[0], *ours[1]], [theirs[0], *theirs[1]],
                             [exact[0], *exact[1]]):
        assert a.dtype == b.dtype == torch.float32, name  # as the reference: float32 out
        err, ref_err = rel_err(a, e), rel_err(b, e)
        assert err <= 2 * ref_err + 1e-6, f"{name}: nanoblock {err:.2e}, reference {ref_err:.2e}"
    # and autocast did lower the precision: float32 alone is far more accurate
    fp32_out = forward_backward(nb, x.float(), grad.float())[0]
    assert rel_err(fp32_out, exact[0]) < rel_err(ours[0], exact[0]) / 10


class NanoblockCalls(TorchDispatchMode):
    """Records (op name, dtype of its first tensor argument) of nanoblock ops."""

    def __init__(self):
        super().__init__()
        self.calls = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "nanoblock":
            self.calls.add((func._opname, args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_block_runs_low_precision_kernels_under_autocast(device, dtype):
    nb, _ = block_pair(make_config(48, 2), dtype=torch.float32, device=device)
    x = torch.randn(2, 5, 48, device=device, requires_grad=True)
    with NanoblockCalls() as seen:
        with autocast(device, dtype):
            y = nb(x)
        y.sum().backward()
    assert seen.calls == {
        ("layer_norm_forward", torch.float32), ("add_layer_norm_forward", torch.float32),
        ("causal_attention_forward", dtype), ("gelu_forward", dtype),
        ("gelu_backward", dtype), ("causal_attention_backward", dtype),
        ("layer_norm_backward", torch.float32),
    }
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in nb.parameters())


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_each_op_under_autocast(device, dtype):
    """Low-precision ops run in the autocast dtype, LayerNorms in float32 (as
    autocast does for torch's layer_norm), float64 tensors are never cast."""
    C = 32
    x, qkv = torch.randn(2, 5, C, device=device), torch.randn(2, 5, 3 * C, device=device)
    w, b = torch.ones(C, device=device), torch.zeros(C, device=device)
    nb, _ = block_pair(make_config(C, 2), dtype=torch.float32, device=device)
    with autocast(device, dtype):
        assert ops.layer_norm(x.to(dtype), w, b).dtype == torch.float32
        assert ops.add_layer_norm(x, x.to(dtype), w, b)[1].dtype == torch.float32
        assert ops.causal_attention(qkv, 2).dtype == dtype
        assert ops.bias_gelu(x.to(dtype), b, "tanh").dtype == dtype  # mixed inputs are fine
        y = ops.block(x, nb.block_params(), 2)
        assert y.dtype == dtype
        assert ops.causal_attention(qkv.double(), 2).dtype == f64
    with torch.no_grad():
        expected = copy.deepcopy(nb).to(dtype)(x.to(dtype))
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def small_gpts(device):
    cfg = nanoblock.GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=64)
    torch.manual_seed(0)
    ref = ReferenceGPT(cfg).to(device=device, dtype=f64)
    return nanoblock.GPT.from_nanogpt(ref), ref


def tokens(*shape, device):
    return torch.randint(0, 50, shape).to(device), torch.randint(0, 50, shape).to(device)


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_gpt_loss_and_grads_under_autocast(device, dtype):
    nb, ref64 = small_gpts(device)
    idx, targets = tokens(4, 32, device=device)
    loss64 = ref64(idx, targets)[1]
    loss64.backward()
    nb, ref = nb.float(), copy.deepcopy(ref64).float()
    with autocast(device, dtype):
        loss, ref_loss = nb(idx, targets)[1], ref(idx, targets)[1]
    loss.backward()
    ref_loss.backward()
    assert abs(loss.item() - loss64.item()) <= 2 * abs(ref_loss.item() - loss64.item()) + 1e-4
    for (name, p), q, e in zip(nb.named_parameters(), ref.parameters(), ref64.parameters()):
        assert rel_err(p.grad, e.grad) <= 2 * rel_err(q.grad, e.grad) + 1e-6, name


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_compiled_gpt_under_autocast_matches_eager(device, dtype):
    nb, _ = small_gpts(device)
    nb = nb.float()
    idx, targets = tokens(2, 24, device=device)
    compiled = torch.compile(nb, fullgraph=True)

    def loss_and_grads(model):
        nb.zero_grad()
        with autocast(device, dtype):
            loss = model(idx, targets)[1]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in nb.parameters()]

    eager_loss, eager_grads = loss_and_grads(nb)
    compiled_loss, compiled_grads = loss_and_grads(compiled)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-3, atol=1e-3)
    for a, b in zip(compiled_grads, eager_grads):
        assert rel_err(a, b) < 2e-2
