"""Each nanoblock op on its own: against PyTorch in float64, gradcheck, opcheck."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanoblock import ops

from conftest import torch_threads

nb = torch.ops.nanoblock
f64 = dict(dtype=torch.float64)


def reference_attention(qkv, n_head):
    """softmax(q k^T / sqrt(hd), causal) v, heads merged, and the row log-sum-exp."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // n_head)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return out, torch.logsumexp(scores, dim=-1)


# ---------------------------------------------------------------------------
# Against PyTorch, float64

@pytest.mark.parametrize("shape", [(5, 17), (2, 3, 96), (1, 1, 1), (4, 2, 1000)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_pytorch(shape, bias):
    x = torch.randn(shape, **f64) * 3 + 1
    w, b = torch.randn(shape[-1], **f64), torch.randn(shape[-1], **f64) if bias else None
    out, mean, rstd = nb.layer_norm_forward(x, w, b, 1e-5)
    torch.testing.assert_close(out, F.layer_norm(x, (shape[-1],), w, b, 1e-5), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(mean, x.mean(-1))
    torch.testing.assert_close(rstd, (x.var(-1, unbiased=False) + 1e-5).rsqrt())
    assert mean.dtype == rstd.dtype == torch.float64
    out32, mean32, _ = nb.layer_norm_forward(x.float(), w.float(), None, 1e-5)
    assert mean32.dtype == torch.float32 and mean32.shape == shape[:-1]


def test_add_layer_norm_matches_pytorch():
    x, r = torch.randn(3, 7, 40, **f64), torch.randn(3, 7, 40, **f64)
    w, b = torch.randn(40, **f64), torch.randn(40, **f64)
    total, out = ops.add_layer_norm(x, r, w, b)
    torch.testing.assert_close(total, x + r, rtol=0, atol=0)
    torch.testing.assert_close(out, F.layer_norm(x + r, (40,), w, b, 1e-5))


@pytest.mark.parametrize("B,T,C,n_head", [(2, 1, 64, 4), (2, 7, 48, 2), (1, 97, 96, 3),
                                          (3, 130, 120, 5), (1, 257, 128, 1), (2, 33, 64, 4)])
def test_attention_matches_pytorch(B, T, C, n_head):
    qkv = torch.randn(B, T, 3 * C, **f64, requires_grad=True)
    out, lse = nb.causal_attention_forward(qkv, n_head)
    ref_out, ref_lse = reference_attention(qkv, n_head)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(out)
    g_nb, = torch.autograd.grad(ops.causal_attention(qkv, n_head), qkv, grad)
    g_ref, = torch.autograd.grad(ref_out, qkv, grad)
    torch.testing.assert_close(g_nb, g_ref, rtol=1e-10, atol=1e-12)


def test_attention_is_causal():
    """Changing position t changes no output before t."""
    qkv = torch.randn(1, 50, 3 * 32, **f64)
    out1 = ops.causal_attention(qkv, 2)
    qkv[:, 30] += 1.0
    out2 = ops.causal_attention(qkv, 2)
    assert torch.equal(out1[:, :30], out2[:, :30])
    assert not torch.equal(out1[:, 30:], out2[:, 30:])


# The CPU attention's two paths (csrc/cpu/attention.cpp): short sequences run
# each head as one tile of register-blocked loops, longer ones the tiled
# loops with ATen's GEMMs. NANOBLOCK_CPU_ATTENTION_SHORT_MAX moves the
# crossover; these tests pick the path with it, whatever the default.

@pytest.fixture(params=["short", "tiled"])
def attention_path(request, monkeypatch):
    monkeypatch.setenv("NANOBLOCK_CPU_ATTENTION_SHORT_MAX",
                       str(2**40) if request.param == "short" else "0")
    return request.param


def attention_and_grad(qkv, n_head, grad, dropout_p=0.0, rng=None):
    """(out, lse, grad_qkv) of the attention ops on qkv."""
    out, lse = nb.causal_attention_forward(qkv, n_head, dropout_p, rng)
    return out, lse, nb.causal_attention_backward(grad, qkv, out, lse, n_head, dropout_p, rng)


# T around the short path's tiles of 4 rows and 16 (float32) or 8 (float64)
# keys and head columns, and the tiled path's blocks of 64.
@pytest.mark.parametrize("T", [1, 3, 4, 5, 16, 17, 33, 64, 70])
@pytest.mark.parametrize("hd", [1, 7, 16, 24, 40])
def test_attention_paths_match_pytorch(attention_path, T, hd):
    torch.manual_seed(T * 100 + hd)
    qkv = torch.randn(2, T, 3 * 2 * hd, **f64, requires_grad=True)
    grad = torch.randn(2, T, 2 * hd, **f64)
    out, lse, g = attention_and_grad(qkv.detach(), 2, grad)
    ref_out, ref_lse = reference_attention(qkv, 2)
    g_ref, = torch.autograd.grad(ref_out, qkv, grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T,hd", [(5, 7), (24, 24), (33, 16), (64, 64)])
def test_attention_paths_agree(monkeypatch, T, hd):
    """The short path against the tiled one at the same lengths: float64 with
    dropout to rounding (the same mask elements, kernel_api.h), float32
    within float32 rounding, bit for bit on one and two threads."""
    torch.manual_seed(T)
    qkv = torch.randn(3, T, 3 * 2 * hd, **f64)
    grad = torch.randn(3, T, 2 * hd, **f64)
    rng = torch.tensor([99, 3])
    results = {}
    for path, short_max in [("short", str(T)), ("tiled", "0")]:
        monkeypatch.setenv("NANOBLOCK_CPU_ATTENTION_SHORT_MAX", short_max)
        results[path] = (attention_and_grad(qkv, 2, grad, 0.25, rng),
                         attention_and_grad(qkv.float(), 2, grad.float()))
        with torch_threads(1):
            one = attention_and_grad(qkv.float(), 2, grad.float())
        assert all(torch.equal(a, b) for a, b in zip(one, results[path][1])), path
    (short64, short32), (tiled64, tiled32) = results["short"], results["tiled"]
    for a, b in zip(short64, tiled64):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(short32, tiled32):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 24])
def test_attention_single_key_query_gets_zero_gradient(attention_path, T):
    """Query 0 sees key 0 only: its softmax is constant, so dq_0 is exactly 0
    in float32 too (dP - D cancels: D is summed as dP is), and at T = 1
    dk_0 as well."""
    torch.manual_seed(T)
    C = 2 * 29
    qkv, grad = torch.randn(2, T, 3 * C), torch.randn(2, T, C)
    _, _, g = attention_and_grad(qkv, 2, grad)
    assert torch.equal(g[:, 0, :C], torch.zeros_like(g[:, 0, :C]))
    if T == 1:
        assert torch.equal(g[..., :2 * C], torch.zeros_like(g[..., :2 * C]))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_bias_gelu_matches_pytorch(approximate, bias):
    x = torch.randn(6, 5, 64, **f64) * 4
    b = torch.randn(64, **f64) if bias else None
    expected = F.gelu(x + b if bias else x, approximate=approximate)
    torch.testing.assert_close(ops.bias_gelu(x, b, approximate), expected, rtol=1e-13,
                               atol=1e-14)
    x32 = x.float()
    torch.testing.assert_close(ops.bias_gelu(x32, None, approximate), F.gelu(x32, approximate=approximate))


# ---------------------------------------------------------------------------
# gradcheck, float64

def test_gradcheck_layer_norm():
    x = torch.randn(3, 4, 10, **f64, requires_grad=True)
    w = torch.randn(10, **f64, requires_grad=True)
    b = torch.randn(10, **f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: ops.layer_norm(x, w, None), (x, w))


def test_gradcheck_add_layer_norm():
    x = torch.randn(2, 5, 12, **f64, requires_grad=True)
    r = torch.randn(2, 5, 12, **f64, requires_grad=True)
    w = torch.randn(12, **f64, requires_grad=True)
    b = torch.randn(12, **f64, requires_grad=True)
    # both outputs are used, so the residual's own gradient is checked too
    assert torch.autograd.gradcheck(lambda *a: ops.add_layer_norm(*a), (x, r, w, b))


@pytest.mark.parametrize("T,C,n_head", [(1, 8, 2), (9, 16, 2), (70, 6, 3)])
def test_gradcheck_attention(attention_path, T, C, n_head):
    qkv = torch.randn(2, T, 3 * C, **f64, requires_grad=True)
    # T = 70 crosses the tiled path's 64-row blocks; fast mode keeps it to seconds.
    assert torch.autograd.gradcheck(lambda q: ops.causal_attention(q, n_head), (qkv,),
                                    fast_mode=T > 64)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck_bias_gelu(approximate):
    x = torch.randn(4, 3, 8, **f64, requires_grad=True)
    b = torch.randn(8, **f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: ops.bias_gelu(x, b, approximate), (x, b))
    assert torch.autograd.gradcheck(lambda x: ops.bias_gelu(x, None, approximate), (x,))


# ---------------------------------------------------------------------------
# opcheck: schema, fake kernel, autograd registration agree with the real op

def _block_args(bias=True, dtype=torch.float32, requires_grad=True):
    C, n_head = 16, 2
    shapes = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,),
              (C, 4 * C), (C,)]
    params = [torch.randn(s, dtype=dtype, requires_grad=requires_grad) * 0.3 for s in shapes]
    if not bias:
        params = [p if i % 2 == 0 else None for i, p in enumerate(params)]
    x = torch.randn(2, 5, C, dtype=dtype, requires_grad=requires_grad)
    return x, params, n_head


def _opcheck_cases():
    x = torch.randn(3, 6, 20, requires_grad=True)
    r = torch.randn(3, 6, 20, requires_grad=True)
    w = torch.randn(20, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    out, mean, rstd = nb.layer_norm_forward(x, w, b, 1e-5)
    qkv = torch.randn(2, 9, 48, requires_grad=True)
    att, lse = nb.causal_attention_forward(qkv, 2)
    rng = torch.tensor([11, 4])  # dropout's (seed, offset)
    att_dropped = nb.causal_attention_forward(qkv, 2, 0.3, rng)[0]
    cases = [
        ("layer_norm_forward", (x, w, b, 1e-5)),
        ("layer_norm_forward", (x, w, None, 1e-5)),
        ("add_layer_norm_forward", (x, r, w, b, 1e-5)),
        ("layer_norm_backward", (torch.randn_like(x), x.detach(), w.detach(), mean, rstd, None)),
        ("layer_norm_backward", (torch.randn_like(x), x.detach(), w.detach(), mean, rstd,
                                 torch.randn_like(x))),
        ("causal_attention_forward", (qkv, 2)),
        ("causal_attention_backward", (torch.randn_like(att), qkv.detach(), att.detach(), lse, 2)),
        ("causal_attention_forward", (qkv, 2, 0.3, rng)),
        ("causal_attention_backward", (torch.randn_like(att), qkv.detach(), att_dropped.detach(),
                                       lse, 2, 0.3, rng)),
        ("gelu_forward", (x, b, "none")),
        ("gelu_forward", (x, None, "tanh")),
        ("gelu_backward", (torch.randn_like(x), x.detach(), b.detach(), "tanh")),
    ]
    for bias in (True, False):
        xb, params, n_head = _block_args(bias)
        cases.append(("block_forward", (xb, *params, n_head, "none")))
        saved = nb.block_forward(xb, *params, n_head, "tanh")[1:]
        cases.append(("block_backward", (torch.randn_like(xb), xb.detach(),
                                          *[p.detach() if p is not None else None for p in params],
                                          *saved, n_head, "tanh")))
    xb, params, n_head = _block_args()
    cases.append(("block_forward", (xb, *params, n_head, "none", 0.2, rng)))
    saved = nb.block_forward(xb, *params, n_head, "none", 0.2, rng)[1:]
    cases.append(("block_backward", (torch.randn_like(xb), xb.detach(),
                                      *[p.detach() for p in params], *saved, n_head, "none", 0.2,
                                      rng)))
    return cases


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(nb, name).default, args)
