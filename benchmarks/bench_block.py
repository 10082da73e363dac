"""Times one Block, forward and forward+backward: nanoblock against what a
user would run instead, in one run, on the same inputs and weights.

    python benchmarks/bench_block.py                      # CPU, float32
    python benchmarks/bench_block.py --device cuda        # GPU, bfloat16, ANCHORS.md configs
    python benchmarks/bench_block.py --config 8,256,384,6 --impl nanoblock,eager

Implementations:
  nanoblock  nanoblock.Block (one fused op forward, one backward)
  eager      the reference Block (nanoGPT's model.py, SDPA attention), eager
  compile    torch.compile of the reference Block
  floor      GPU only: just the four GEMMs and SDPA flash attention, forward
             and backward, nothing else; what a Block costs if every other
             op were free

Timing: median of many runs after warm-up (triton.testing.do_bench on GPU;
on CPU torch.utils.benchmark in interleaved rounds, see time_ms); random
inputs, never zeros. Memory: the
bytes autograd keeps for the backward (saved tensors, counted once per
storage, x and weights included), and on GPU the peak allocated during
forward+backward. Results go to JSON (with device, versions, git commit) and,
when matplotlib is there, a PNG.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nanoblock  # noqa: E402
from nanoblock.reference import ReferenceBlock  # noqa: E402

# (name, B, T, C, n_head)
GPU_CONFIGS = [("gpt2-small", 16, 1024, 768, 12), ("gpt2-medium", 8, 1024, 1024, 16),
               ("gpt2-xl", 4, 1024, 1600, 25), ("long", 4, 4096, 768, 12),
               ("tiny", 64, 256, 384, 6)]
CPU_CONFIGS = [("cpu-small", 4, 128, 128, 4), ("cpu-medium", 8, 256, 384, 6)]


class Floor(nn.Module):
    """The Block's four GEMMs and its attention (SDPA), nothing else."""

    def __init__(self, ref):
        super().__init__()
        self.ref = ref

    def forward(self, x):
        a = self.ref.attn
        B, T, C = x.shape
        H = a.n_head
        q, k, v = a.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = a.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return self.ref.mlp.c_proj(self.ref.mlp.c_fc(y))


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def time_ms(fns, device, rounds=5):
    """Median milliseconds of each function in fns (a dict name -> fn).

    GPU: triton's do_bench on each. CPU: the machine's speed drifts over
    seconds (other tenants, clocks), so the functions are timed in
    interleaved rounds (a, b, c, a, b, c, ...) and each gets the median of its
    rounds' medians; every implementation sees the same conditions."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return {k: do_bench(fn, warmup=25, rep=200, return_mode="median") for k, fn in fns.items()}
    from torch.utils import benchmark
    samples = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for k, fn in fns.items():
            t = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                num_threads=torch.get_num_threads())
            samples[k].append(t.blocked_autorange(min_run_time=0.5).median * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def saved_bytes(module, x):
    """Bytes autograd keeps for the backward of module(x): every saved tensor's
    storage, counted once."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    del y
    return sum(storages.values())


def peak_mib(step, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_config(name, B, T, C, H, impls, dtype, device):
    cfg = nanoblock.GPTConfig(n_embd=C, n_head=H, bias=True, dropout=0.0)
    torch.manual_seed(0)
    ref = ReferenceBlock(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    modules = {}
    for impl in impls:
        if impl == "nanoblock":
            m = nanoblock.Block(cfg).to(device=device, dtype=dtype)
            m.load_state_dict(ref.state_dict())
        elif impl == "eager":
            m = ref
        elif impl == "compile":
            m = torch.compile(ref)
        elif impl == "floor":
            if device.type != "cuda":
                continue
            m = Floor(ref)
        else:
            raise SystemExit(f"unknown implementation {impl!r}")
        modules[impl] = m
    x = torch.randn(B, T, C, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, T, C, device=device, dtype=dtype)
    rows = []
    def forward_of(m):
        def forward():
            with torch.no_grad():
                m(x)
        return forward

    def forward_backward_of(m):
        def forward_backward():
            m(x).backward(grad)
        return forward_backward

    for m in modules.values():
        forward_backward_of(m)()  # compile / warm-up
    fwd = time_ms({impl: forward_of(m) for impl, m in modules.items()}, device)
    fwd_bwd = time_ms({impl: forward_backward_of(m) for impl, m in modules.items()}, device)
    for impl, m in modules.items():
        row = dict(config=name, B=B, T=T, C=C, n_head=H, dtype=str(dtype).replace("torch.", ""),
                   impl=impl, forward_ms=fwd[impl], forward_backward_ms=fwd_bwd[impl],
                   saved_mib=saved_bytes(m, x) / 2**20 if impl != "compile" else None,
                   peak_mib=peak_mib(forward_backward_of(m), device))
        rows.append(row)
        print(f"  {name:12s} {row['dtype']:9s} {impl:10s} fwd {fwd[impl]:9.3f} ms   fwd+bwd "
              f"{fwd_bwd[impl]:9.3f} ms   saved "
              + (f"{row['saved_mib']:8.1f} MiB" if row['saved_mib'] is not None else "       - MiB")
              + (f"   peak {row['peak_mib']:8.1f} MiB" if row["peak_mib"] is not None else ""),
              flush=True)
    x.grad = None
    for p in ref.parameters():
        p.grad = None
    return rows


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    configs = list(dict.fromkeys(f"{r['config']} {r['dtype']}" for r in results["rows"]))
    impls = list(dict.fromkeys(r["impl"] for r in results["rows"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(configs)), 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = []
        for c in configs:
            match = [r for r in results["rows"] if f"{r['config']} {r['dtype']}" == c
                     and r["impl"] == impl]
            vals.append(match[0]["forward_backward_ms"] if match else 0)
        ax.bar([j + i * width for j in range(len(configs))], vals, width, label=impl)
    ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(configs))])
    ax.set_xticklabels(configs, fontsize=8)
    ax.set_ylabel("forward+backward (ms), lower is better")
    ax.set_title(f"One Block on {results['device_name']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Time nanoblock's Block against its peers.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--config", action="append", default=None,
                   help="B,T,C,n_head (repeatable); default: the device's standard configs")
    p.add_argument("--impl", default=None,
                   help="comma-separated; default nanoblock,eager,compile(,floor on cuda)")
    p.add_argument("--out", default=None, help="folder for the JSON and PNG")
    p.add_argument("--tag", default=None, help="file name stem (default: bench_block_<device>)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.config:
        configs = [("custom",) + tuple(int(v) for v in c.split(",")) for c in args.config]
        configs = [(f"{B},{T},{C},{H}", B, T, C, H) for _, B, T, C, H in configs]
    else:
        configs = GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS
    impls = args.impl.split(",") if args.impl else (
        ["nanoblock", "eager", "compile"] + (["floor"] if device.type == "cuda" else []))

    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{platform.processor() or platform.machine()} CPU, "
                        f"{torch.get_num_threads()} threads")
    print(f"Block benchmark on {device_name}, torch {torch.__version__}, {dtype}")
    results = dict(device=device.type, device_name=device_name, torch=torch.__version__,
                   cuda=torch.version.cuda, nanoblock=nanoblock.__version__,
                   git_commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M:%S"), rows=[])
    for name, B, T, C, H in configs:
        results["rows"] += run_config(name, B, T, C, H, impls, dtype, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("\nratios (forward+backward time of the peer / nanoblock's; > 1: nanoblock faster)")
    for name in dict.fromkeys(r["config"] for r in results["rows"]):
        rows = {r["impl"]: r for r in results["rows"] if r["config"] == name}
        if "nanoblock" not in rows:
            continue
        nb = rows["nanoblock"]["forward_backward_ms"]
        parts = [f"{impl} {r['forward_backward_ms'] / nb:5.2f}x" for impl, r in rows.items()
                 if impl != "nanoblock"]
        if "eager" in rows and rows["eager"]["saved_mib"]:
            parts.append(f"saved memory nanoblock/eager "
                         f"{rows['nanoblock']['saved_mib'] / rows['eager']['saved_mib']:.2f}")
        print(f"  {name:12s} " + "   ".join(parts))

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    stem = args.tag or f"bench_block_{device.type}"
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {os.path.join(out, stem + '.json')}")
    plot(results, os.path.join(out, stem + ".png"))


if __name__ == "__main__":
    main()
