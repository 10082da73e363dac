"""Times nanoblock's ops one by one against the PyTorch ops they replace, and
says how close each comes to the card's ceiling.

    python benchmarks/bench_ops.py                   # CPU, float32, small shapes
    python benchmarks/bench_ops.py --device cuda     # GPU, bf16, attention T sweep 512..4096
    python benchmarks/bench_ops.py --op attention --device cuda

Ops (nanoblock's against PyTorch's, same inputs):
  layer_norm      ops.layer_norm                  vs F.layer_norm
  add_layer_norm  ops.add_layer_norm (x + r, LN)  vs x + r then F.layer_norm
  attention       ops.causal_attention(qkv)       vs F.scaled_dot_product_attention (causal),
                  with the split of qkv into heads and the merge back that a Block needs
  bias_gelu       ops.bias_gelu(h, b)             vs F.gelu(h + b)
  mlp             nanoblock's MLP (GEMM, bias_gelu, GEMM) vs nn.Linear, nn.GELU, nn.Linear
  mlp_up          c_fc and its GELU, tanh form, as the Block runs them (a GEMM without
                  the bias, then ops.bias_gelu) vs F.linear then F.gelu, and vs impl
                  "epilogue": torch._addmm_activation(use_gelu=True), bias and GELU in
                  cuBLASLt's GEMM epilogue (the tanh form on CUDA; exact GELU on the
                  CPU). Forward only for "epilogue": the op has no autograd formula, and
                  the backward epilogue (dGELU with the bias gradient) is not reachable
                  through PyTorch's ops

Each is timed forward (under no_grad) and forward+backward (gradients of every
input), and on the GPU also forward+backward replayed from a CUDA graph
(mode forward_backward_graph): the kernels' time without the host's launch
and autograd work, which decides the plain timing of the small ops. Speed is
given as achieved throughput and as a fraction of a ceiling measured in the
same run (common.ceilings):
  GB/s     layer_norm, add_layer_norm, bias_gelu: the bytes an ideal kernel
           must move (each activation read or written once; parameters and
           per-row statistics left out) over the time; ceiling: copy bandwidth
           (of a 512 MiB copy). Beside them, impl "copy": one device copy
           moving the same bytes (half read, half written) in the same mode,
           without autograd: what a kernel of that size reaches, launch, ramp
           and tail included, which the big copy of the ceiling hides
  TFLOP/s  attention (causal: half of 4*B*H*T^2*D forward, backward 2.5x the
           forward, FlashAttention's convention), mlp (the two GEMMs) and
           mlp_up (its one GEMM);
           ceiling: a big matmul in the same dtype
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
import nanoblock  # noqa: E402
from nanoblock import ops  # noqa: E402
from nanoblock.block import MLP  # noqa: E402
from nanoblock.reference import MLP as ReferenceMLP  # noqa: E402

# Rows (tokens) and width for the elementwise ops and the MLP: gpt2-small's
# and gpt2-xl's B*T and C on GPU, small ones on the CPU.
GPU_ROWS = [(16 * 1024, 768), (4 * 1024, 1600)]
CPU_ROWS = [(2048, 384)]
# Attention sweep, FlashAttention's benchmark shape: B*T = 16k tokens,
# C = 2048 split into heads of D.
GPU_ATTN = dict(tokens=16384, C=2048, T=(512, 1024, 2048, 4096), D=(64, 128))
CPU_ATTN = dict(tokens=1024, C=256, T=(128, 256, 512), D=(32, 64))
OPS = ("layer_norm", "add_layer_norm", "attention", "bias_gelu", "mlp", "mlp_up")


def randn(*shape, device, dtype, grad=True):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def layer_norm_case(N, C, device, dtype):
    x = randn(N, C, device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(C, device=device, dtype=dtype)).requires_grad_()
    b = randn(C, device=device, dtype=dtype)
    impls = {"nanoblock": lambda: ops.layer_norm(x, w, b),
             "torch": lambda: F.layer_norm(x, (C,), w, b, 1e-5)}
    # forward reads x, writes out; backward reads grad and x, writes grad x
    return impls, [x, w, b], 1, dict(fwd=2 * N * C, fb=5 * N * C)


def add_layer_norm_case(N, C, device, dtype):
    x, r = randn(N, C, device=device, dtype=dtype), randn(N, C, device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(C, device=device, dtype=dtype)).requires_grad_()
    b = randn(C, device=device, dtype=dtype)

    def torch_add_ln():
        s = x + r
        return s, F.layer_norm(s, (C,), w, b, 1e-5)

    impls = {"nanoblock": lambda: ops.add_layer_norm(x, r, w, b), "torch": torch_add_ln}
    # forward reads x, r, writes the sum and out; backward reads both grads and
    # the sum, writes one grad (x's and r's are the same)
    return impls, [x, r, w, b], 2, dict(fwd=4 * N * C, fb=8 * N * C)


def attention_case(B, T, C, H, device, dtype):
    qkv = randn(B, T, 3 * C, device=device, dtype=dtype)

    def sdpa():
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(B, T, C)

    impls = {"nanoblock": lambda: ops.causal_attention(qkv, H), "sdpa": sdpa}
    fwd = 2 * B * H * T * T * (C // H)
    return impls, [qkv], 1, dict(fwd=fwd, fb=3.5 * fwd)


def bias_gelu_case(N, C, device, dtype):
    h = randn(N, 4 * C, device=device, dtype=dtype)
    b = randn(4 * C, device=device, dtype=dtype)
    impls = {"nanoblock": lambda: ops.bias_gelu(h, b), "torch": lambda: F.gelu(h + b)}
    # forward reads h, writes out; backward reads grad and h, writes grad h
    return impls, [h, b], 1, dict(fwd=2 * N * 4 * C, fb=5 * N * 4 * C)


def mlp_case(N, C, device, dtype):
    cfg = nanoblock.GPTConfig(n_embd=C, n_head=1, bias=True, dropout=0.0)
    torch.manual_seed(0)
    ref = ReferenceMLP(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    mine = MLP(cfg).to(device=device, dtype=dtype)
    mine.load_state_dict(ref.state_dict())
    x = randn(N, C, device=device, dtype=dtype)
    impls = {"nanoblock": lambda: mine(x), "torch": lambda: ref(x)}
    # each impl differentiates its own weights: x plus whichever parameters exist
    inputs = {"nanoblock": [x] + list(mine.parameters()), "torch": [x] + list(ref.parameters())}
    fwd = 2 * 2 * N * C * 4 * C
    return impls, inputs, 1, dict(fwd=fwd, fb=3 * fwd)


def mlp_up_case(N, C, device, dtype):
    x = randn(N, C, device=device, dtype=dtype)
    w = randn(4 * C, C, device=device, dtype=dtype)
    b = randn(4 * C, device=device, dtype=dtype)
    impls = {"nanoblock": lambda: ops.bias_gelu(x @ w.t(), b, approximate="tanh"),
             "epilogue": lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True),
             "torch": lambda: F.gelu(F.linear(x, w, b), approximate="tanh")}
    # "epilogue" has no backward: no inputs to differentiate, forward only
    inputs = {"nanoblock": [x, w, b], "torch": [x, w, b]}
    fwd = 2 * N * C * 4 * C
    return impls, inputs, 1, dict(fwd=fwd, fb=3 * fwd)


def time_case(op, shape, case, dtype, device, ceil, rep_ms):
    """Times every implementation of one case, forward and forward+backward;
    returns result rows."""
    impls, inputs, n_out, work = case
    if not isinstance(inputs, dict):
        inputs = {k: inputs for k in impls}
    bandwidth = op in ("layer_norm", "add_layer_norm", "bias_gelu")
    elt = torch.tensor([], dtype=dtype).element_size()
    with torch.no_grad():
        outs = impls["nanoblock"]()
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs[:n_out]]

    def forward_of(fn):
        def forward():
            with torch.no_grad():
                fn()
        return forward

    def forward_backward_of(fn, xs):
        def forward_backward():
            y = fn()
            torch.autograd.grad(y if isinstance(y, tuple) else (y,), xs, grads)
        return forward_backward

    forward = {k: forward_of(f) for k, f in impls.items()}
    forward_backward = {k: forward_backward_of(f, inputs[k]) for k, f in impls.items()
                        if k in inputs}  # an impl without inputs: forward only
    if bandwidth:  # the same bytes in one copy (see the header)
        def copy_of(elements):
            src = torch.randn(elements // 2, device=device).to(dtype)
            dst = torch.empty_like(src)
            return lambda: dst.copy_(src)
        forward["copy"] = copy_of(work["fwd"])
        forward_backward["copy"] = copy_of(work["fb"])
    timings = [("forward", common.time_ms(forward, device, rep_ms=rep_ms)),
               ("forward_backward", common.time_ms(forward_backward, device, rep_ms=rep_ms))]
    if device.type == "cuda":
        timings.append(("forward_backward_graph",
                        common.graph_replay_ms(forward_backward, rep_ms=rep_ms)))
    rows = []
    for mode, times in timings:
        work_units = work["fwd" if mode == "forward" else "fb"]
        for impl, ms in times.items():
            if ms is None:  # graph_replay_ms could not capture it (it said why)
                continue
            if bandwidth:
                achieved, unit = work_units * elt / ms / 1e6, "GB/s"
                fraction = achieved / ceil["copy_gbs"]
            else:
                achieved, unit = work_units / ms / 1e9, "TFLOP/s"
                fraction = achieved / ceil["matmul_tflops"]
            rows.append(dict(op=op, dtype=common.dtype_name(dtype), impl=impl, mode=mode, ms=ms,
                             achieved=achieved, unit=unit, fraction_of_ceiling=fraction, **shape))
            print(f"  {op:15s} {str(tuple(shape.values())):24s} {mode:22s} {impl:10s} "
                  f"{ms:9.3f} ms {achieved:9.4g} {unit:8s} {100 * fraction:5.1f}% of ceiling",
                  flush=True)
    return rows


def run(op_names, dtype, device, rep_ms):
    ceil = common.ceilings(device, dtype)
    print(f"ceilings ({ceil['dtype']}): copy {ceil['copy_gbs']:.0f} GB/s, "
          f"matmul {ceil['matmul_tflops']:.3g} TFLOP/s", flush=True)
    gpu = device.type == "cuda"
    rows = []
    for op in op_names:
        if op == "attention":
            sweep = GPU_ATTN if gpu else CPU_ATTN
            for D in sweep["D"]:
                for T in sweep["T"]:
                    B, H = sweep["tokens"] // T, sweep["C"] // D
                    case = attention_case(B, T, sweep["C"], H, device, dtype)
                    rows += time_case(op, dict(B=B, T=T, H=H, D=D), case, dtype, device, ceil,
                                      rep_ms)
        else:
            make = globals()[op + "_case"]
            for N, C in (GPU_ROWS if gpu else CPU_ROWS):
                rows += time_case(op, dict(N=N, C=C), make(N, C, device, dtype), dtype, device,
                                  ceil, rep_ms)
        if gpu:
            torch.cuda.empty_cache()
    return ceil, rows


def plot(results, path):
    """Attention TFLOP/s against T, nanoblock and SDPA, one line per head dim;
    forward and forward+backward side by side."""
    plt = common.pyplot()
    attn = [r for r in results["rows"] if r["op"] == "attention"]
    if plt is None or not attn:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode in zip(axes, ("forward", "forward_backward")):
        for (impl, dt, D), style in zip(sorted({(r["impl"], r["dtype"], r["D"]) for r in attn}),
                                        ("-o", "--o", "-s", "--s", "-^", "--^", "-v", "--v")):
            pts = sorted((r["T"], r["achieved"]) for r in attn
                         if (r["impl"], r["dtype"], r["D"], r["mode"]) == (impl, dt, D, mode))
            ax.plot([t for t, _ in pts], [a for _, a in pts], style,
                    label=f"{impl}, head dim {D}, {dt}")
        for c in results["ceilings"]:
            ax.axhline(c["matmul_tflops"], color="gray", lw=0.8, ls=":")
            ax.text(min(r["T"] for r in attn), c["matmul_tflops"],
                    f"{c['dtype']} matmul {c['matmul_tflops']:.3g}", fontsize=7, va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T (batch x T fixed)")
        ax.set_title(mode.replace("_", "+"), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("causal attention TFLOP/s")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Attention on {results['device_name']} (torch {results['torch']}, "
                 f"{results['git_commit']})", fontsize=10)
    common.save_figure(fig, path)


def main(argv=None):
    p = common.parser("bench_ops", "Time nanoblock's ops against PyTorch's.", ["bfloat16"])
    p.add_argument("--op", default=",".join(OPS), help=f"comma-separated from {OPS}")
    args = p.parse_args(argv)
    device, dtypes = common.parse_device_dtypes(args)
    op_names = common.split_choices(args.op, OPS, "op")
    results = common.provenance(device, ops=op_names, rep_ms=args.rep_ms,
                                dtypes=[common.dtype_name(d) for d in dtypes])
    print(f"Op benchmark on {results['device_name']}, torch {torch.__version__}")
    results.update(ceilings=[], rows=[])
    for dtype in dtypes:
        ceil, rows = run(op_names, dtype, device, args.rep_ms)
        results["ceilings"].append(ceil)
        results["rows"] += rows

    common.write_json(results, args.out, args.tag)
    plot(results, os.path.join(args.out, args.tag + ".png"))


if __name__ == "__main__":
    main()
