"""Where a small Block's host time goes: the host's time to issue each piece
of a forward+backward, nanoblock's ops and the PyTorch ops they sit beside.

    python benchmarks/host_time.py --device cuda                 # tiny config
    python benchmarks/host_time.py --device cuda --config 16,1024,768,12

At small sizes (the tiny config, 64 x 256 x 384) a Block's step is bound by
the host: profile_block.py shows the kernels of a forward+backward take
0.74 ms replayed from a CUDA graph but 1.2-1.7 ms run from Python. This
script times how long each piece takes the host to issue while the GPU is
held busy by a sleep kernel, so no launch waits for the GPU: the numbers are
host microseconds per call, not GPU time. On the CPU (no sleep kernel) they
include the computation, so use a tiny --config there.

On CUDA the last rows time the Block ops with their GEMMs by cuBLASLt's
cached plans (csrc/cuda/gemm.cu, the default for float16 / bfloat16) and by
ATen's mm / addmm (nanoblock::gemm_kernels("aten")): their difference over an
op's GEMMs (4 forward, 8 backward) is what one GEMM saves: 1.0-1.5 us on the
H200 (session 13), against the 17.5 and 16.6 us of the torch.mm and
torch.addmm rows, which go through the dispatcher as the Block's GEMMs do not.

The backward rows split autograd's share: torch.autograd.grad's Python
wrapper (autograd.grad minus "engine only", its engine.run_backward), the
engine around our one node (engine only minus the block_backward op, no
grad) and the engine's floor for a node with 13 inputs (the torch.cat rows).
On CUDA the engine runs a backward on its device thread, on the CPU on the
caller's: compare the floor on the device measured.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nanoblock  # noqa: E402
from benchmarks import common  # noqa: E402
from nanoblock import GPTConfig  # noqa: E402
from nanoblock.reference import ReferenceBlock  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", default="64,256,384,6", help="B,T,C,n_head")
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    B, T, C, H = map(int, args.config.split(","))
    torch.manual_seed(0)
    cfg = GPTConfig(n_embd=C, n_head=H, block_size=T, bias=True, dropout=0.0)
    ours = nanoblock.Block(cfg).to(device, dtype)
    ref = ReferenceBlock(cfg).to(device, dtype)
    x = torch.randn(B, T, C, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn_like(x)
    params = ours.block_params()
    w = [q for q in params if q is not None]
    wr = [q for q in ref.parameters()]
    xd = x.detach()
    rows = xd.view(-1, C)
    qkv = torch.randn(B, T, 3 * C, device=device, dtype=dtype)
    fc = torch.randn(B, T, 4 * C, device=device, dtype=dtype)
    W = torch.randn(3 * C, C, device=device, dtype=dtype)
    b = torch.randn(3 * C, device=device, dtype=dtype)
    lnw, lnb = params[0].detach(), params[1].detach()
    fc_bias = params[9].detach()
    nb = torch.ops.nanoblock
    with torch.no_grad():
        saved = nb.block_forward(xd, *[q.detach() for q in params], H, "none", 0.0, None)
    # The backward alone, kept for repeated calls (retain_graph), split into
    # torch.autograd.grad's Python wrapper and the engine under it; and the
    # engine's floor: one builtin node with the same 13 inputs (torch.cat's
    # backward slices its gradient: views, no kernel).
    y = ours(x)
    engine = torch.autograd.Variable._execution_engine
    leaves = [torch.randn(4, device=device, dtype=dtype, requires_grad=True) for _ in range(13)]
    cat = torch.cat(leaves)
    gcat = torch.randn_like(cat)

    def block_forward_op():
        return nb.block_forward(xd, *[q.detach() for q in params], H, "none", 0.0, None)

    def block_backward_op():
        return nb.block_backward(gy, xd, *[q.detach() for q in params], *saved[1:], H, "none",
                                 0.0, None)

    print(f"host time per call, us ({device}, {dtype}, config B={B} T={T} C={C} heads={H}; "
          f"torch {torch.__version__}{', ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''})")
    pieces = [
        ("nanoblock: Block forward+backward (autograd.grad)",
         lambda: torch.autograd.grad(ours(x), [x] + w, gy)),
        ("eager:     Block forward+backward (autograd.grad)",
         lambda: torch.autograd.grad(ref(x), [x] + wr, gy)),
        ("nanoblock: Block backward alone (autograd.grad)",
         lambda: torch.autograd.grad(y, [x] + w, gy, retain_graph=True)),
        ("nanoblock: Block backward alone (engine only)",
         lambda: engine.run_backward((y,), (gy,), True, False, tuple([x] + w), False, False)),
        ("torch:     13-input cat backward (autograd.grad)",
         lambda: torch.autograd.grad(cat, leaves, gcat, retain_graph=True)),
        ("torch:     13-input cat backward (engine only)",
         lambda: engine.run_backward((cat,), (gcat,), True, False, tuple(leaves), False, False)),
        ("nanoblock: Block forward, autograd on", lambda: ours(x)),
        ("eager:     Block forward, autograd on", lambda: ref(x)),
        ("nanoblock: block_params()", lambda: ours.block_params()),
        ("nanoblock: block_forward op, no grad", block_forward_op),
        ("nanoblock: block_backward op", block_backward_op),
        ("nanoblock: block_backward op, no grad (as in bwd)", block_backward_op),
        ("nanoblock: layer_norm_forward op", lambda: nb.layer_norm_forward(xd, lnw, lnb, 1e-5)),
        ("nanoblock: causal_attention_forward op",
         lambda: nb.causal_attention_forward(qkv, H, 0.0, None)),
        ("nanoblock: gelu_forward op (bias)", lambda: nb.gelu_forward(fc, fc_bias, "none")),
        ("torch:     F.layer_norm", lambda: F.layer_norm(xd, (C,), lnw, lnb)),
        ("torch:     torch.mm [N, C] x [C, 3C]", lambda: torch.mm(rows, W.t())),
        ("torch:     torch.addmm (bias) [N, C] x [C, 3C]", lambda: torch.addmm(b, rows, W.t())),
        ("torch:     F.gelu [B, T, 4C]", lambda: F.gelu(fc)),
        ("torch:     torch.empty_like [B, T, 4C]", lambda: torch.empty_like(fc)),
        ("torch:     x + y [B, T, C]", lambda: xd + xd),
    ]
    for name, fn in pieces:
        with torch.no_grad() if "no grad" in name else torch.enable_grad():
            print(f"  {name:52s} {common.host_us(fn, device):8.1f}")
    # Where forward+backward's excess over the two alone goes (session 12:
    # 989 us against 119 + 505 at tiny): each half of the step timed inside
    # the same loop.
    for name, model, inputs in (("nanoblock", ours, [x] + w), ("eager    ", ref, [x] + wr)):
        fwd, bwd = split_host_us(lambda: model(x),
                                 lambda y: torch.autograd.grad(y, inputs, gy), device)
        print(f"  {name + ': forward+backward, its forward':52s} {fwd:8.1f}")
        print(f"  {name + ': forward+backward, its backward':52s} {bwd:8.1f}")
    if device.type == "cuda":
        gemm_paths(nb, {"block_forward op": (block_forward_op, 4),
                        "block_backward op": (block_backward_op, 8)})


def split_host_us(forward, backward, device, calls=10, rounds=20):
    """common.host_us for y = forward(); backward(y), each half timed apart
    within the same calls: (forward us, backward us) per call, of the round
    best in their sum."""
    for _ in range(3):
        backward(forward())

    def run_round():
        fwd = bwd = 0.0
        for _ in range(calls):
            t0 = time.perf_counter()
            y = forward()
            t1 = time.perf_counter()
            backward(y)
            del y
            t2 = time.perf_counter()
            fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
        return fwd + bwd, fwd, bwd

    _, fwd, bwd = common.best_round(run_round, device, rounds)
    return 1e6 * fwd / calls, 1e6 * bwd / calls


def gemm_paths(nb, ops):
    """ops: name -> (fn, the GEMMs one call makes). Times each, no grad,
    with its GEMMs by cuBLASLt's cached plans (csrc/cuda/gemm.cu's default)
    and by ATen (nanoblock::gemm_kernels("aten")), in alternating rounds (the
    host's state drifts), best of each; the difference over the GEMMs is the
    host time that one GEMM saves, to set beside the torch.mm and torch.addmm
    rows."""
    best = {}
    for _ in range(3):
        for path in ("cublaslt", "aten"):
            before = nb.gemm_kernels(path)
            try:
                with torch.no_grad():
                    for name, (fn, _) in ops.items():
                        us = common.host_us(fn, torch.device("cuda"))
                        best[name, path] = min(best.get((name, path), us), us)
            finally:
                nb.gemm_kernels(before)
    for name, (_, gemms) in ops.items():
        for path in ("cublaslt", "aten"):
            print(f"  {'nanoblock: ' + name + ', GEMMs by ' + path:52s} {best[name, path]:8.1f}")
        saved = (best[name, "aten"] - best[name, "cublaslt"]) / gemms
        print(f"  {'  host time a GEMM saves by cuBLASLt plans':52s} {saved:8.1f}")


if __name__ == "__main__":
    main()
