"""The CPU attention at small and large shapes, and the demo's training step:
the lab script behind the crossover between csrc/cpu/attention.cpp's short
path (a head as one tile of register-blocked loops) and its tiled path (ATen
GEMMs).

    python benchmarks/bench_attention_cpu.py                 # 2 threads, then 1
    python benchmarks/bench_attention_cpu.py --threads 1 --paths --no-train \\
        --shapes "8,64,384,6;8,128,384,6"                   # the crossover

Attention: nanoblock's causal_attention(qkv) against
F.scaled_dot_product_attention(is_causal=True) on the same qkv [B, T, 3C]
(with the split into heads and the merge back a Block needs), float32,
forward (no_grad) and forward+backward (the gradient of qkv). --paths times
the short and the tiled path too, each forced for every length with
NANOBLOCK_CPU_ATTENTION_SHORT_MAX. Train: one step of the demo's GPT
(nanoblock.demo: 2 Blocks, n_embd 96, 4 heads, B=64, T=24, AdamW, clipped
gradients) against the same GPT of reference Blocks. Medians in ms from
common.time_ms (interleaved rounds); ratio = SDPA's (the reference's) time
over nanoblock's, above 1: nanoblock faster.
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from nanoblock import ops  # noqa: E402
from nanoblock.demo import DIGITS, N_DIGITS, sorting_batch  # noqa: E402
from nanoblock.model import GPT, GPTConfig  # noqa: E402
from nanoblock.reference import ReferenceGPT  # noqa: E402

# (B, T, C, n_head); the first is the demo's (head dim 24).
SHAPES = [(64, 24, 96, 4), (16, 24, 128, 4), (8, 64, 128, 4), (4, 128, 128, 4),
          (8, 256, 384, 6), (2, 1024, 768, 12)]
CPU = torch.device("cpu")
SHORT_MAX = "NANOBLOCK_CPU_ATTENTION_SHORT_MAX"
PATHS = {"short": str(2**40), "tiled": "0"}  # the crossover that forces each path


def sdpa(qkv, B, T, C, nh):
    q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in qkv.split(C, dim=2))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)


def on_path(short_max, fn):
    """fn run with the crossover set to short_max (None: the built-in one)."""
    def run():
        if short_max is None:
            os.environ.pop(SHORT_MAX, None)
        else:
            os.environ[SHORT_MAX] = short_max
        return fn()
    return run


def attention_times(B, T, C, nh, paths):
    """{fwd, fwd+bwd} -> {implementation: median ms}."""
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * C, requires_grad=True)
    gy = torch.randn(B, T, C)
    impls = {"nanoblock": (None, lambda: ops.causal_attention(qkv, nh))}
    if paths:
        impls.update({path: (short_max, impls["nanoblock"][1])
                      for path, short_max in PATHS.items()})
    impls["sdpa"] = (None, lambda: sdpa(qkv, B, T, C, nh))

    def forward(f):
        def run():
            with torch.no_grad():
                f()
        return run
    fwd = common.time_ms({k: on_path(m, forward(f)) for k, (m, f) in impls.items()}, CPU)
    fwd_bwd = common.time_ms({k: on_path(m, lambda f=f: torch.autograd.grad(f(), qkv, gy))
                              for k, (m, f) in impls.items()}, CPU)
    os.environ.pop(SHORT_MAX, None)
    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def train_times(batch_size=64):
    config = GPTConfig(block_size=2 * N_DIGITS, vocab_size=DIGITS + 1, n_layer=2, n_head=4,
                       n_embd=96, dropout=0.0, bias=True)
    torch.manual_seed(0)
    nb = GPT(config)
    ref = ReferenceGPT(config)
    ref.load_state_dict(copy.deepcopy(nb.state_dict()))
    idx, targets = sorting_batch(batch_size, torch.Generator().manual_seed(0), CPU)

    def step_of(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99))

        def step():
            _, loss = model(idx, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return step
    return common.time_ms({"nanoblock": step_of(nb), "reference": step_of(ref)}, CPU)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    p.add_argument("--shapes", default=None, help="B,T,C,n_head;B,T,C,n_head;...")
    p.add_argument("--paths", action="store_true", help="time the short and tiled paths too")
    p.add_argument("--no-train", action="store_true", help="attention only")
    args = p.parse_args(argv)
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
              if args.shapes else SHAPES)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s), float32, median ms; ratio = SDPA's time / nanoblock's")
        for B, T, C, nh in shapes:
            times = attention_times(B, T, C, nh, args.paths)
            for mode, t in times.items():
                print(f"  B,T,C,n_head {B},{T},{C},{nh} (hd {C // nh})  {mode:<8}"
                      + "".join(f"  {k} {v:8.3f}" for k, v in t.items())
                      + f"  ratio {t['sdpa'] / t['nanoblock']:.2f}", flush=True)
        if not args.no_train:
            t = train_times()
            print(f"  demo training step  nanoblock {t['nanoblock']:.2f}  reference "
                  f"{t['reference']:.2f}  ratio {t['reference'] / t['nanoblock']:.2f}")


if __name__ == "__main__":
    main()
