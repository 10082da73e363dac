"""The bits of nanoblock's CUDA results on fixed random inputs, to compare
two builds: a change that claims the same bits (loads reordered, code paths
split, a different grid) must compare equal everywhere; one that does not (a
different GEMM algorithm) shows where, and by how much.

    python scripts/bits_dump.py OUT.pt           # run from inside the tree to dump
    python scripts/bits_dump.py --compare A.pt B.pt
    python scripts/bits_dump.py --device cpu OUT.pt   # a check of the script itself

Cases (outputs, saved statistics and every input gradient):
  - causal attention on both kernel families (default and forced mma.sync),
    float16 and bfloat16, head dims 32-128, T from 1 to 1025 (tiles cut by T),
    with and without dropout, and with a NaN in k past the causal diagonal;
  - LayerNorm and the residual add + LayerNorm, C odd, 768, 1600 and one row
    too long for the registers (the long-row kernel), bfloat16 and float32;
  - GELU with bias, exact and tanh, forward and backward;
  - the whole Block, bfloat16 and float16, with and without biases and
    dropout.
Bits are compared as integers, so NaNs in the same places compare equal.
scripts/ab_gpu.sh runs it on both trees with BITS=1.
"""
import argparse
import os
import sys

import torch

# This tree's nanoblock, not whichever is installed: the A/B runs each tree's
# copy of this script from inside that tree.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nanoblock  # noqa: E402
from nanoblock import ops  # noqa: E402

DEVICE = "cuda"
HALF = (torch.bfloat16, torch.float16)


def short(dtype):
    return str(dtype).replace("torch.", "")


def with_grads(fn, inputs, seed):
    """fn(*inputs) -> tensor or tuple; returns its outputs and the gradients
    of every input under a fixed random output gradient."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    grads = [torch.randn(o.shape, device=DEVICE, dtype=o.dtype, generator=gen) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def attention_cases():
    kernels = torch.ops.nanoblock.attention_kernels
    for family in ("auto", "mma"):
        kernels(family)
        for dtype in HALF:
            for hd in (32, 48, 64, 80, 96, 128):
                for T in (1, 17, 65, 129, 1025):
                    for p, nan in ((0.0, False), (0.1, False), (0.0, True)):
                        seed = hd * 100_000 + T * 100 + int(p * 10) * 10 + int(nan)
                        torch.manual_seed(seed)
                        qkv = torch.randn(2, T, 3 * 2 * hd, device=DEVICE, dtype=dtype)
                        if nan and T > 1:  # a key after query 0's row: masked for it
                            qkv[0, T - 1, 2 * hd + 3] = float("nan")
                        rng = torch.tensor([seed, 7], device=DEVICE, dtype=torch.int64)
                        name = f"attention {family} {short(dtype)} hd{hd} T{T} p{p} nan{int(nan)}"
                        yield name, with_grads(
                            lambda q: ops.causal_attention(q, 2, p, rng if p > 0 else None),
                            [qkv], seed)
    kernels("auto")


def layer_norm_cases():
    for dtype in (torch.bfloat16, torch.float32):
        for N, C in ((1, 17), (33, 768), (4096, 768), (257, 1600), (9, 20000)):
            torch.manual_seed(N * C)
            x, res = (torch.randn(N, C, device=DEVICE, dtype=dtype) for _ in range(2))
            w = 1 + 0.1 * torch.randn(C, device=DEVICE, dtype=dtype)
            b = 0.1 * torch.randn(C, device=DEVICE, dtype=dtype)
            yield f"layer_norm {short(dtype)} {N}x{C}", with_grads(ops.layer_norm, [x, w, b], N)
            yield f"add_layer_norm {short(dtype)} {N}x{C}", with_grads(
                ops.add_layer_norm, [x, res, w, b], N)


def gelu_cases():
    for dtype in HALF:
        for N, F in ((4096, 3072), (37, 77)):
            for approximate in ("none", "tanh"):
                torch.manual_seed(F)
                x = torch.randn(N, F, device=DEVICE, dtype=dtype)
                b = torch.randn(F, device=DEVICE, dtype=dtype)
                yield f"gelu {short(dtype)} {N}x{F} {approximate}", with_grads(
                    lambda x, b: ops.bias_gelu(x, b, approximate), [x, b], N)


def block_cases():
    for dtype in HALF:
        for (B, T, C, H) in ((2, 129, 192, 3), (4, 256, 384, 6)):
            for bias in (True, False):
                for dropout in (0.0, 0.1):
                    torch.manual_seed(B * T + C)
                    cfg = nanoblock.GPTConfig(block_size=T, n_embd=C, n_head=H, bias=bias,
                                              dropout=dropout)
                    block = nanoblock.Block(cfg).to(DEVICE, dtype)
                    x = torch.randn(B, T, C, device=DEVICE, dtype=dtype)
                    names = [n for n, _ in block.named_parameters()]
                    params = [p for _, p in block.named_parameters()]
                    torch.manual_seed(1)  # the dropout masks' draw
                    results = with_grads(
                        lambda x, *ps: torch.func.functional_call(block, dict(zip(names, ps)), (x,)),
                        [x] + params, T)
                    yield f"block {short(dtype)} {B},{T},{C},{H} bias{int(bias)} p{dropout}", results


def dump(path):
    results = {}
    for cases in (attention_cases, layer_norm_cases, gelu_cases, block_cases):
        for name, tensors in cases():
            for i, t in enumerate(tensors):
                results[f"{name} [{i}]"] = t.cpu()
    torch.save({"nanoblock": os.path.dirname(nanoblock.__file__), "results": results}, path)
    print(f"{len(results)} tensors from {os.path.dirname(nanoblock.__file__)} -> {path}")


def as_bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def compare(path_a, path_b):
    a, b = torch.load(path_a), torch.load(path_b)
    print(f"A: {a['nanoblock']}\nB: {b['nanoblock']}")
    differ = 0
    for name, ta in a["results"].items():
        tb = b["results"].get(name)
        if tb is None or ta.shape != tb.shape or ta.dtype != tb.dtype:
            print(f"  {name}: missing or another shape/dtype in B")
            differ += 1
            continue
        if torch.equal(as_bits(ta), as_bits(tb)):
            continue
        differ += 1
        both = torch.isfinite(ta) & torch.isfinite(tb)
        diff = (ta[both].double() - tb[both].double()).abs()
        print(f"  {name}: {(as_bits(ta) != as_bits(tb)).sum().item()} of {ta.numel()} elements "
              f"differ, max |diff| {diff.max().item() if diff.numel() else float('nan'):.3g}, "
              f"non-finite in other places: {not torch.equal(both, torch.isfinite(ta))}")
    print(f"{len(a['results']) - differ} of {len(a['results'])} tensors bitwise equal")
    return differ == 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="OUT.pt, or with --compare A.pt B.pt")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    if args.compare:
        sys.exit(0 if compare(*args.paths) else 1)
    global DEVICE, HALF
    DEVICE = args.device
    if DEVICE == "cpu":
        HALF = (torch.bfloat16,)  # the CPU kernels' only 16-bit type
    dump(args.paths[0])


if __name__ == "__main__":
    main()
