"""Where a Block's GPU time goes: per-kernel CUDA time of one forward+backward,
nanoblock's Block next to the eager reference Block, from torch.profiler.

    python benchmarks/profile_block.py                       # gpt2-small, bf16
    python benchmarks/profile_block.py --config 4,4096,768,12 --steps 5

Prints, per implementation, each kernel's CUDA time per step (summed over its
launches) and the total, the host's launch time against the wall time and a
CUDA graph replay (is a step host-bound?), and the attention kernels alone against SDPA flash
(called on ready [B, n_head, T, hd] tensors: the kernel's own time, no layout
copies). For finding what to speed up; the benchmark of record is
bench_block.py.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nanoblock  # noqa: E402
from benchmarks import common  # noqa: E402
from nanoblock.reference import ReferenceBlock  # noqa: E402


def profiled(step, steps, activity):
    """torch.profiler's per-name averages of `steps` runs of `step` (one
    activity: CUDA kernels or CPU ops), after a warm-up."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return prof.key_averages()


def kernel_table(step, steps):
    """{kernel name: CUDA microseconds per step} of `step`."""
    table = {}
    for e in profiled(step, steps, ProfilerActivity.CUDA):
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = e.cuda_time_total
        if us > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            table[e.key] = table.get(e.key, 0.0) + us / steps
    return table


def host_and_wall_ms(step, model, x, gy, reps=20):
    """(host ms, wall ms, graph ms) of one step of `model` (step: its
    forward+backward on x with gradient gy): the host's time to launch it
    (measured while the GPU is held busy by a sleep kernel, so launches
    never wait for it), the time per step of steps run back to back, and the
    time per replay of the step captured as a CUDA graph (no host work)."""
    host_ms = 1e-3 * common.host_us(step, x.device, calls=reps, rounds=1,
                                    sleep_cycles=200_000_000)  # ~0.1 s of GPU time
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps

    inputs = [x] + [p for p in model.parameters() if p.requires_grad]
    graph = common.capture_graph(lambda: torch.autograd.grad(model(x), inputs, gy))
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    replay = (time.perf_counter() - t0) / reps
    return host_ms, 1e3 * wall, 1e3 * replay


def host_table(step, steps):
    """{op: host microseconds per step, self time} of `step`."""
    return {e.key: e.self_cpu_time_total / steps
            for e in profiled(step, steps, ProfilerActivity.CPU) if e.self_cpu_time_total > 0}


def print_table(title, table, top=25, what="kernels"):
    total = sum(table.values())
    print(f"\n{title}: {total / 1000:.3f} ms of {what} per forward+backward")
    for name, us in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us:9.1f} us  {100 * us / total:5.1f}%  {name[:110]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="16,1024,768,12", help="B,T,C,n_head")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    B, T, C, H = (int(v) for v in args.config.split(","))
    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    torch.manual_seed(0)
    print("card:", torch.cuda.get_device_name(0), "| torch", torch.__version__,
          "| config", (B, T, C, H), args.dtype)

    cfg = nanoblock.GPTConfig(n_embd=C, n_head=H, bias=True, dropout=0.0)
    ref = ReferenceBlock(cfg).to(dev, dtype)
    ours = nanoblock.Block(cfg).to(dev, dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, T, C, device=dev, dtype=dtype, requires_grad=True)
    gy = torch.randn(B, T, C, device=dev, dtype=dtype)

    def step_of(m):
        def step():
            m.zero_grad(set_to_none=True)
            m(x).backward(gy)
        return step

    print_table("nanoblock Block", kernel_table(step_of(ours), args.steps))
    print_table("eager reference Block", kernel_table(step_of(ref), args.steps))

    # Host overhead: where the launch time exceeds the kernels' time, a
    # step is host-bound and the wall time is the host's.
    print("\nper forward+backward: host launch time, wall time back to back, CUDA graph replay")
    for name, m in (("nanoblock", ours), ("eager", ref)):
        host, wall, replay = host_and_wall_ms(step_of(m), m, x, gy)
        print(f"  {name:10s} host {host:7.3f} ms   wall {wall:7.3f} ms   graph replay {replay:7.3f} ms")
    print_table("nanoblock Block, host (self CPU time, profiler on)",
                host_table(step_of(ours), args.steps), top=15, what="host time")

    # Attention alone: nanoblock's op on qkv [B, T, 3C] vs SDPA flash on
    # ready-made [B, H, T, hd] tensors (no split/transpose copies counted).
    qkv = torch.randn(B, T, 3 * C, device=dev, dtype=dtype, requires_grad=True)
    q, k, v = (t.detach().view(B, T, H, C // H).transpose(1, 2).contiguous().requires_grad_()
               for t in qkv.split(C, dim=2))
    gq = torch.randn(B, H, T, C // H, device=dev, dtype=dtype)

    def ours_attn():
        torch.autograd.grad(nanoblock.ops.causal_attention(qkv, H), qkv, gy)

    def sdpa_attn():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), gq)

    print_table("nanoblock attention fwd+bwd", kernel_table(ours_attn, args.steps), top=8)
    print_table("SDPA attention fwd+bwd (kernels only)", kernel_table(sdpa_attn, args.steps), top=8)


if __name__ == "__main__":
    main()
