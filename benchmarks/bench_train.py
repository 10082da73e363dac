"""Training throughput of a whole GPT: nanoblock's Blocks against the same
model built of reference Blocks, eager and under torch.compile.

    python benchmarks/bench_train.py                  # CPU, float32, a small GPT
    python benchmarks/bench_train.py --device cuda    # GPU, GPT-2 small (124M), bf16, B=8, T=1024

One timed step is what a training loop does: forward with the loss,
backward, AdamW step, gradients set to None. All models start from the same
weights (nanoGPT's initialization) and train on the same random batch of
tokens. Implementations:
  nanoblock          nanoblock.GPT (nanoblock Blocks and LayerNorms), eager
  eager              nanoblock.reference.ReferenceGPT (nanoGPT's model.py), eager
  compile            torch.compile of ReferenceGPT (what nanoGPT's train.py does)
  nanoblock-compile  torch.compile of nanoblock.GPT (not run by default)

On GPU the whole model is in the chosen dtype (bf16 by default: weights,
gradients and AdamW's state; fused AdamW) rather than under autocast, so
every implementation does the same arithmetic. Reported: median step time,
tokens/s (B*T per step), the peak memory of one step on GPU, and the loss
of the first step (the same model gives the same loss, to rounding).
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
import nanoblock  # noqa: E402
from nanoblock.reference import ReferenceGPT  # noqa: E402

# (n_layer, n_head, n_embd, vocab_size, B, T)
GPU_MODEL = (12, 12, 768, 50304, 8, 1024)      # GPT-2 small, nanoGPT's padded vocabulary
CPU_MODEL = (4, 4, 128, 512, 8, 128)
IMPLS = ("nanoblock", "eager", "compile", "nanoblock-compile")


def build(impls, cfg, device, dtype):
    """name -> model; every model starts from the same weights."""
    torch.manual_seed(0)
    ref = ReferenceGPT(cfg).to(device=device, dtype=dtype)
    models = {}
    for impl in impls:
        if impl in ("eager", "compile"):
            m = copy.deepcopy(ref)  # its own weights: each model takes its own optimizer steps
        else:  # nanoblock, nanoblock-compile
            m = nanoblock.GPT.from_nanogpt(ref)
        models[impl] = torch.compile(m) if impl.endswith("compile") else m
    return models


def train_step_of(model, idx, targets, device):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1,
                            fused=device.type == "cuda")

    def step():
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def main(argv=None):
    p = common.parser("bench_train", "Training tokens/s: nanoblock GPT vs reference GPT.",
                      ["bfloat16"], rep_ms=400)
    p.add_argument("--model", default=None,
                   help="n_layer,n_head,n_embd,vocab_size,B,T "
                        f"(default {GPU_MODEL} on cuda, {CPU_MODEL} on cpu)")
    p.add_argument("--impl", default="nanoblock,eager,compile",
                   help=f"comma-separated from {IMPLS}")
    args = p.parse_args(argv)
    device, dtypes = common.parse_device_dtypes(args)
    if len(dtypes) != 1:
        raise SystemExit("bench_train runs one dtype at a time")
    dtype = dtypes[0]
    n_layer, n_head, n_embd, vocab, B, T = (
        tuple(int(v) for v in args.model.split(",")) if args.model
        else GPU_MODEL if device.type == "cuda" else CPU_MODEL)
    cfg = nanoblock.GPTConfig(block_size=T, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                              n_embd=n_embd, dropout=0.0, bias=True)
    impls = common.split_choices(args.impl, IMPLS, "implementation")
    results = common.provenance(device, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                vocab_size=vocab, B=B, T=T, dtype=common.dtype_name(dtype),
                                impls=impls, rep_ms=args.rep_ms, optimizer="AdamW")
    print(f"Training benchmark on {results['device_name']}, torch {torch.__version__}: "
          f"GPT {n_layer} layers, {n_head} heads, n_embd {n_embd}, vocab {vocab}, "
          f"B={B}, T={T}, {common.dtype_name(dtype)}", flush=True)

    models = build(impls, cfg, device, dtype)
    results["params_millions"] = sum(p.numel() for p in next(iter(models.values())).parameters()) / 1e6
    torch.manual_seed(1)
    idx = torch.randint(vocab, (B, T), device=device)
    targets = torch.randint(vocab, (B, T), device=device)
    steps, first_loss, peak = {}, {}, {}
    for impl, m in models.items():
        steps[impl] = train_step_of(m, idx, targets, device)
        first_loss[impl] = steps[impl]().item()  # compiles where it must; warms up the rest
        steps[impl]()
        peak[impl] = common.peak_mib(steps[impl], device)
        print(f"  {impl:18s} ready (first loss {first_loss[impl]:.4f})", flush=True)
    ms = common.time_ms(steps, device, rep_ms=args.rep_ms, min_run_time=1.0)

    results["rows"] = [dict(impl=impl, step_ms=ms[impl], tokens_per_s=B * T / ms[impl] * 1e3,
                            peak_mib=peak[impl], first_loss=first_loss[impl]) for impl in impls]
    nb = ms.get("nanoblock")
    for r in results["rows"]:
        print(f"  {r['impl']:18s} {r['step_ms']:9.2f} ms/step {r['tokens_per_s']:10.0f} tokens/s"
              + (f"   peak {r['peak_mib']:8.0f} MiB" if r["peak_mib"] is not None else "")
              + (f"   nanoblock's tokens/s over this: {r['step_ms'] / nb:.2f}x"
                 if nb and r["impl"] != "nanoblock" else ""))
    common.write_json(results, args.out, args.tag)


if __name__ == "__main__":
    main()
