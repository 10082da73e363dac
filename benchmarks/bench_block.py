"""Times one Block, forward, backward and forward+backward: nanoblock against
what a user would run instead, in one run, on the same inputs and weights.

    python benchmarks/bench_block.py                      # CPU, float32, small shapes
    python benchmarks/bench_block.py --device cuda        # GPU, ANCHORS.md configs, bf16 + float32
    python benchmarks/bench_block.py --config 8,256,384,6 --impl nanoblock,eager --mode forward_backward

Implementations:
  nanoblock  nanoblock.Block (one fused op forward, one backward)
  eager      the reference Block (nanoGPT's model.py, SDPA attention), eager
  compile    torch.compile of the reference Block
  floor      GPU only: just the four GEMMs and SDPA attention, forward and
             backward, nothing else; what a Block costs if every other op
             were free

Modes:
  forward           the forward under torch.no_grad (inference)
  backward          the backward alone (after a fresh forward, not timed, each time)
  forward_backward  a training step's share: forward with autograd, then backward
  forward_backward_graph
                    the same step captured once as a CUDA graph and replayed
                    (GPU only; not in the default list): the kernels' time
                    alone, with the host's launch and autograd work gone, as
                    a user of CUDA graphs gets it. torch.compile is left out
                    (its users get graphs from mode="reduce-overhead")

The backward computes the gradients of x and of every parameter with
torch.autograd.grad (no accumulation into .grad, the same work for everyone).
Timing: medians of the implementations timed in interleaved rounds, after
warm-up (benchmarks/common.py: time_ms); random inputs and weights, never
zeros. Memory: the bytes autograd keeps for the backward (saved tensors,
counted once per storage, x and weights included), and on GPU the peak
allocated during forward+backward above what was allocated before. Results
go to JSON (with device, versions, git commit) and a PNG (time and speed-up
per config).
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
import nanoblock  # noqa: E402
from nanoblock.reference import ReferenceBlock  # noqa: E402

# (name, B, T, C, n_head)
GPU_CONFIGS = [("gpt2-small", 16, 1024, 768, 12), ("gpt2-medium", 8, 1024, 1024, 16),
               ("gpt2-xl", 4, 1024, 1600, 25), ("long", 4, 4096, 768, 12),
               ("tiny", 64, 256, 384, 6)]
CPU_CONFIGS = [("cpu-small", 4, 128, 128, 4), ("cpu-medium", 8, 256, 384, 6)]
MODES = ("forward", "backward", "forward_backward", "forward_backward_graph")
DEFAULT_MODES = MODES[:3]
IMPLS = ("nanoblock", "eager", "compile", "floor")


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


def build(impls, cfg, dtype, device):
    """name -> (module, the tensors it has gradients for besides x)."""
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
            # A fresh compile per config: dynamo's recompile limit (8) would
            # otherwise send later configs back to eager without a word.
            torch._dynamo.reset()
            m = torch.compile(ref)
        else:  # floor
            if device.type != "cuda":
                continue
            m = Floor(ref)
        params = list(m.parameters())
        modules[impl] = (m, params)
    return modules


def run_config(name, B, T, C, H, impls, modes, dtype, device, rep_ms):
    cfg = nanoblock.GPTConfig(n_embd=C, n_head=H, bias=True, dropout=0.0)
    modules = build(impls, cfg, dtype, device)
    x = torch.randn(B, T, C, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, T, C, device=device, dtype=dtype)

    def forward_of(m):
        def forward():
            with torch.no_grad():
                m(x)
        return forward

    def backward_of(params):
        return lambda y: torch.autograd.grad(y, [x] + params, grad, allow_unused=True)

    def forward_backward_of(m, params):
        return lambda: torch.autograd.grad(m(x), [x] + params, grad, allow_unused=True)

    rows = {}
    graph_ms = {}
    if "forward_backward_graph" in modes and device.type == "cuda":
        # First, before anything else runs these modules: in session 11 every
        # capture after the other measurements failed on the H200 (an
        # implicit dependency on the legacy stream).
        graph_ms = common.graph_replay_ms({i: forward_backward_of(m, params)
                                           for i, (m, params) in modules.items()
                                           if i != "compile"}, rep_ms=rep_ms)
    for impl, (m, params) in modules.items():
        forward_backward_of(m, params)()  # compile / warm-up
        rows[impl] = dict(config=name, B=B, T=T, C=C, n_head=H, dtype=common.dtype_name(dtype),
                          impl=impl, **{mode + "_ms": None for mode in MODES},
                          # torch.compile's saved tensors live inside its graph, out of the hooks' sight
                          saved_mib=saved_bytes(m, x) / 2**20 if impl != "compile" else None,
                          peak_mib=common.peak_mib(forward_backward_of(m, params), device))
    if "forward" in modes:
        for impl, ms in common.time_ms({i: forward_of(m) for i, (m, _) in modules.items()},
                                       device, rep_ms=rep_ms).items():
            rows[impl]["forward_ms"] = ms
    if "backward" in modes:
        fns = {i: (lambda m=m: m(x), backward_of(params)) for i, (m, params) in modules.items()}
        for impl, ms in common.time_part_ms(fns, device, rep_ms=rep_ms).items():
            rows[impl]["backward_ms"] = ms
    if "forward_backward" in modes:
        fns = {i: forward_backward_of(m, params) for i, (m, params) in modules.items()}
        for impl, ms in common.time_ms(fns, device, rep_ms=rep_ms).items():
            rows[impl]["forward_backward_ms"] = ms
    for impl, ms in graph_ms.items():
        rows[impl]["forward_backward_graph_ms"] = ms
    for r in rows.values():
        print(f"  {name:12s} {r['dtype']:9s} {r['impl']:10s}"
              + "".join(f" {m.replace('forward', 'fwd').replace('backward', 'bwd').replace('_graph', '(graph)').replace('_', '+')}"
                        f" {r[m + '_ms']:8.3f} ms" for m in MODES if r[m + "_ms"] is not None)
              + (f"   saved {r['saved_mib']:7.1f} MiB" if r["saved_mib"] is not None else "")
              + (f"   peak {r['peak_mib']:7.1f} MiB" if r["peak_mib"] is not None else ""),
              flush=True)
    return list(rows.values())


def speedups(rows, mode="forward_backward"):
    """(config, dtype) -> {peer: peer's time / nanoblock's} for one mode."""
    out = {}
    for r in rows:
        key = (r["config"], r["dtype"])
        nb = next((x for x in rows if (x["config"], x["dtype"]) == key
                   and x["impl"] == "nanoblock"), None)
        if r["impl"] != "nanoblock" and nb and r[mode + "_ms"] and nb[mode + "_ms"]:
            out.setdefault(key, {})[r["impl"]] = r[mode + "_ms"] / nb[mode + "_ms"]
    return out


def plot(results, path):
    """Left: forward+backward ms per config and implementation. Right: the
    peers' time over nanoblock's (above 1: nanoblock faster)."""
    plt = common.pyplot()
    if plt is None:
        return
    rows = results["rows"]
    mode = "forward_backward" if any(r["forward_backward_ms"] for r in rows) else next(
        m for m in MODES if any(r[m + "_ms"] for r in rows))
    keys = list(dict.fromkeys((r["config"], r["dtype"]) for r in rows))
    labels = [f"{c}\n{d}" for c, d in keys]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(max(10, 1.5 * len(keys) * 2), 4.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        by = {(r["config"], r["dtype"]): r[mode + "_ms"] for r in rows if r["impl"] == impl}
        ax_t.bar([j + i * width for j in range(len(keys))], [by.get(k) or 0 for k in keys],
                 width, label=impl)
    ax_t.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(keys))])
    ax_t.set_xticklabels(labels, fontsize=7)
    ax_t.set_ylabel(f"{mode.replace('_', '+')} ms (lower is better)")
    ax_t.set_yscale("log")
    ax_t.legend(fontsize=8)
    ratios = speedups(rows, mode)
    peers = [i for i in impls if i != "nanoblock"]
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        ax_s.bar([j + i * width for j in range(len(keys))],
                 [ratios.get(k, {}).get(peer, 0) for k in keys], width, label=f"vs {peer}",
                 color=f"C{impls.index(peer)}")
    ax_s.axhline(1.0, color="black", lw=0.8)
    ax_s.set_xticks([j + width * (len(peers) - 1) / 2 for j in range(len(keys))])
    ax_s.set_xticklabels(labels, fontsize=7)
    ax_s.set_ylabel("peer's time / nanoblock's (> 1: nanoblock faster)")
    ax_s.legend(fontsize=8)
    fig.suptitle(f"One Block, {mode.replace('_', '+')}, on {results['device_name']} "
                 f"(torch {results['torch']}, {results['git_commit']})", fontsize=10)
    common.save_figure(fig, path)


def parse_configs(specs, device):
    """--config values: a name from the config lists or B,T,C,n_head."""
    if not specs:
        return GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS
    named = {c[0]: c for c in GPU_CONFIGS + CPU_CONFIGS}
    out = []
    for s in specs:
        if s in named:
            out.append(named[s])
        else:
            B, T, C, H = (int(v) for v in s.split(","))
            out.append((s, B, T, C, H))
    return out


def main(argv=None):
    p = common.parser("bench_block", "Time nanoblock's Block against its peers.",
                      ["bfloat16", "float32"])
    p.add_argument("--config", action="append", default=None,
                   help="a config name (gpt2-small, ..., cpu-small) or B,T,C,n_head; repeatable; "
                        "default: the device's standard configs")
    p.add_argument("--impl", default=None,
                   help="comma-separated; default nanoblock,eager,compile(,floor on cuda)")
    p.add_argument("--mode", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated from {MODES}; default {','.join(DEFAULT_MODES)}")
    args = p.parse_args(argv)
    device, dtypes = common.parse_device_dtypes(args)
    configs = parse_configs(args.config, device)
    impls = common.split_choices(args.impl, IMPLS, "implementation") if args.impl else (
        ["nanoblock", "eager", "compile"] + (["floor"] if device.type == "cuda" else []))
    modes = common.split_choices(args.mode, MODES, "mode")

    results = common.provenance(device, impls=impls, modes=modes, rep_ms=args.rep_ms,
                                dtypes=[common.dtype_name(d) for d in dtypes])
    print(f"Block benchmark on {results['device_name']}, torch {torch.__version__}")
    results["rows"] = []
    for dtype in dtypes:
        for name, B, T, C, H in configs:
            results["rows"] += run_config(name, B, T, C, H, impls, modes, dtype, device,
                                          args.rep_ms)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for mode in modes:
        print(f"\n{mode}: the peer's time / nanoblock's (> 1: nanoblock faster)")
        for (name, dt), ratios in speedups(results["rows"], mode).items():
            print(f"  {name:12s} {dt:9s} " + "   ".join(f"{k} {v:5.2f}x" for k, v in ratios.items()))

    common.write_json(results, args.out, args.tag)
    plot(results, os.path.join(args.out, args.tag + ".png"))


if __name__ == "__main__":
    main()
