"""Are two builds or settings of the Block bit-identical? Saves the output and
every gradient of one bf16 forward+backward per config (dropout on and off),
or compares saved runs with torch.equal. For same-build A/Bs whose switch is
read once a process (e.g. NANOBLOCK_GEMM):

    NANOBLOCK_GEMM=aten python3 scripts/block_bits.py save /tmp/a.pt
    python3 scripts/block_bits.py save /tmp/b.pt
    python3 scripts/block_bits.py compare /tmp/a.pt /tmp/b.pt
"""
import sys

import torch

import nanoblock

CONFIGS = [(8, 256, 384, 6), (4, 1024, 768, 12)]  # B, T, C, n_head


def run():
    out = {}
    for B, T, C, H in CONFIGS:
        for dropout in (0.0, 0.1):
            torch.manual_seed(5)
            cfg = nanoblock.GPTConfig(n_embd=C, n_head=H, bias=True, dropout=dropout)
            block = nanoblock.Block(cfg).cuda().to(torch.bfloat16).train()
            x = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            y = block(x)
            grads = torch.autograd.grad(y, [x, *block.parameters()], torch.randn_like(y))
            out[f"{B},{T},{C},{H} dropout {dropout}"] = [t.detach().cpu() for t in (y, *grads)]
    return out


if __name__ == "__main__":
    if sys.argv[1] == "save":
        torch.save(run(), sys.argv[2])
    else:
        first, *others = (torch.load(p) for p in sys.argv[2:])
        bad = 0
        for key, tensors in first.items():
            for path, other in zip(sys.argv[3:], others):
                if not all(torch.equal(a, b) for a, b in zip(tensors, other[key])):
                    bad += 1
                    print(f"DIFFERENT: {key}: {sys.argv[2]} vs {path}")
        print(f"{len(first)} cases, {bad} different")
