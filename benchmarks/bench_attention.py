"""Times nanoblock's causal attention op against PyTorch's SDPA (flash),
forward and forward+backward, bf16, head dims 64, 80, 96 and 128, T = 1024..4096.

    python benchmarks/bench_attention.py              # needs a CUDA GPU and triton
    python benchmarks/bench_attention.py --hd 64      # the head-dim-64 shapes only
    NANOBLOCK_WGMMA_FORWARD=128,2,2 python benchmarks/bench_attention.py --hd 64

Both run in the same process on the same inputs; the ratio is nanoblock's
time over SDPA's (below 1: nanoblock faster). The NANOBLOCK_WGMMA_*
variables (csrc/cuda/attention_wgmma.cuh) put other built wgmma tile shapes
in the dispatch, to time them against each other; a shape is built for
some head dims only, hence --hd.
"""
import argparse
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from nanoblock import ops

SHAPES = [(16, 1024, 12, 64), (8, 1024, 16, 64), (4, 4096, 12, 64), (4, 1024, 25, 64),
          (4, 1024, 16, 128),
          (8, 1024, 16, 80), (8, 1024, 16, 96)]  # 80 and 96: the mma.sync kernels, on every GPU


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hd", type=int, action="append", help="head dims to time (default: all)")
    args = p.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    shapes = {k: v for k, v in os.environ.items() if k.startswith("NANOBLOCK_WGMMA_")}
    print("card:", torch.cuda.get_device_name(0), "| wgmma shapes:", shapes or "default")
    print(f"{'shape (B,T,nh,hd)':<22}{'what':<14}{'nanoblock ms':>13}{'SDPA ms':>10}{'ratio':>8}"
          f"{'max |diff|':>12}")
    for B, T, nh, hd in SHAPES:
        if args.hd and hd not in args.hd:
            continue
        C = nh * hd
        qkv = torch.randn(B, T, 3 * C, device=dev, dtype=dt, requires_grad=True)
        gy = torch.randn(B, T, C, device=dev, dtype=dt)

        def sdpa(qkv):
            q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in qkv.split(C, dim=2))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return out.transpose(1, 2).reshape(B, T, C)

        ours = lambda: ops.causal_attention(qkv, nh)
        ref = lambda: sdpa(qkv)
        # The outputs' largest difference: a wrong kernel shows here, not
        # only in the tests (bf16 rounding alone gives about 1e-2 at most).
        diff = (ours() - ref()).abs().max().item()
        f_ours = do_bench(ours, return_mode="median")
        f_ref = do_bench(ref, return_mode="median")
        fb_ours = do_bench(lambda: torch.autograd.grad(ours(), qkv, gy), return_mode="median")
        fb_ref = do_bench(lambda: torch.autograd.grad(ref(), qkv, gy), return_mode="median")
        shape = f"{B},{T},{nh},{hd}"
        print(f"{shape:<22}{'fwd':<14}{f_ours:>13.3f}{f_ref:>10.3f}{f_ours / f_ref:>8.2f}"
              f"{diff:>12.2e}")
        print(f"{shape:<22}{'fwd+bwd':<14}{fb_ours:>13.3f}{fb_ref:>10.3f}{fb_ours / fb_ref:>8.2f}")


if __name__ == "__main__":
    main()
