"""Picks the tensor-core attention's tile shapes: times each kernel (forward,
grad_kv, grad_q) of nanoblock's causal attention at head dim 64 under the
tile shapes NANOBLOCK_ATTENTION_TILES can select (see attention_mma.cu), one
process per choice, next to SDPA's kernels on the same shapes.

    python benchmarks/tune_attention.py          # needs a CUDA GPU, bf16

Prints microseconds per call of each kernel (torch.profiler CUDA times).
"""
import os
import subprocess
import sys

SHAPES = [(16, 1024, 12, 64), (4, 4096, 12, 64)]
CHOICES = ["2,1x32,1x64", "2,1x16,1x32", "2,1x64,1x64"]


def child():
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import nanoblock
    from profile_block import kernel_table

    for B, T, H, hd in SHAPES:
        C = H * hd
        qkv = torch.randn(B, T, 3 * C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16)
        table = kernel_table(
            lambda: torch.autograd.grad(nanoblock.ops.causal_attention(qkv, H), qkv, gy), 10)
        parts = {"fwd": 0.0, "grad_kv": 0.0, "grad_q": 0.0, "row_dot": 0.0}
        for name, us in table.items():
            for part, key in [("fwd", "forward_kernel"), ("grad_kv", "grad_kv_kernel"),
                              ("grad_q", "grad_q_kernel"), ("row_dot", "row_dot")]:
                if key in name:
                    parts[part] += us
        line = "  ".join(f"{k} {v:7.1f}" for k, v in parts.items())
        print(f"  {B},{T},{H},{hd}: {line}  total {sum(parts.values()):7.1f} us", flush=True)
        if os.environ.get("TUNE_SDPA") == "1":
            q, k, v = (t.detach().view(B, T, H, hd).transpose(1, 2).contiguous().requires_grad_()
                       for t in qkv.split(C, dim=2))
            gq = torch.randn_like(q)
            sdpa = kernel_table(lambda: torch.autograd.grad(
                F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), gq), 10)
            print(f"  {B},{T},{H},{hd}: SDPA kernels total {sum(sdpa.values()):7.1f} us", flush=True)


def main():
    if "--child" in sys.argv:
        child()
        return
    for i, choice in enumerate(CHOICES):
        print(f"NANOBLOCK_ATTENTION_TILES={choice}", flush=True)
        env = dict(os.environ, NANOBLOCK_ATTENTION_TILES=choice, TUNE_SDPA="1" if i == 0 else "0")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env, check=True)


if __name__ == "__main__":
    main()
