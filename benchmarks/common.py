"""What every benchmark here shares: timing, the run's provenance, the card's
ceilings, JSON output and matplotlib.

Timing is `triton.testing.do_bench` medians on a GPU and `torch.utils.benchmark`
medians on the CPU, where the implementations are timed in interleaved rounds
(see time_ms). Ceilings (copy bandwidth, matmul TFLOP/s) are measured in the
same run as the figures they scale, never typed in.
"""
import argparse
import json
import os
import platform
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def provenance(device, **config):
    """The header of every result file: what ran, where, on which code."""
    import nanoblock
    return dict(device=device.type, device_name=device_name(device), torch=torch.__version__,
                cuda=torch.version.cuda, nanoblock=nanoblock.__version__,
                git_commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                host_cpus=os.cpu_count(), config=config)


def parser(name, description, cuda_dtypes, rep_ms=100):
    """An argument parser with the options every bench has: --device,
    --dtype, --rep-ms, --out and --tag; the file stem is name_<device>."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None,
                   help=f"comma-separated; default {','.join(cuda_dtypes)} on cuda, float32 on cpu")
    p.add_argument("--rep-ms", type=int, default=rep_ms,
                   help="GPU: milliseconds do_bench spends per measurement")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="folder for the result files")
    p.add_argument("--tag", default=None, help=f"file name stem (default: {name}_<device>)")
    p.set_defaults(bench_name=name, cuda_dtypes=cuda_dtypes)
    return p


def parse_device_dtypes(args):
    """(torch.device, [torch.dtype]) from a parser()'s arguments; also sets
    args.tag to its default."""
    device, dtypes = _device_dtypes(args.device, args.dtype, args.cuda_dtypes)
    args.tag = args.tag or f"{args.bench_name}_{device.type}"
    return device, dtypes


def split_choices(value, allowed, what):
    """A comma-separated option value as a list, each checked against allowed."""
    chosen = value.split(",")
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {tuple(allowed)}")
    return chosen


def _device_dtypes(device, dtypes, cuda_default):
    """--device and a comma-separated --dtype -> (torch.device, [torch.dtype]);
    without --dtype: cuda_default on a GPU, float32 on the CPU."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA GPU")
    names = dtypes.split(",") if dtypes else (cuda_default if device.type == "cuda"
                                              else ["float32"])
    return device, [getattr(torch, n) for n in names]


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def time_ms(fns, device, rounds=3, rep_ms=100, min_run_time=0.3):
    """Median milliseconds of each function in fns (a dict name -> fn).

    The functions are timed in interleaved rounds (a, b, c, a, b, c, ...) and
    each gets the median of its rounds' medians, so every implementation sees
    the same conditions: the machine's speed drifts over seconds (other
    tenants, clocks). That matters most where a step is bound by the host
    (the tiny Block on the GPU machine: in session 12 one process timed
    nanoblock at 0.71 ms and eager at 1.53, the next 1.06 and 1.95, each
    implementation timed once, one after the other). A round: on the GPU,
    triton's do_bench (its own warm-up; the L2 cache is flushed between
    calls); on the CPU, torch.utils.benchmark's blocked_autorange."""
    if device.type == "cuda":
        from triton.testing import do_bench

        def measure(fn):
            return do_bench(fn, warmup=max(10, rep_ms // 8), rep=rep_ms, return_mode="median")
    else:
        from torch.utils import benchmark

        def measure(fn):
            t = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                num_threads=torch.get_num_threads())
            return t.blocked_autorange(min_run_time=min_run_time).median * 1e3
        for fn in fns.values():
            fn()  # warm-up (do_bench has its own)
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(measure(fn))
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def best_round(run_round, device, rounds=20, sleep_cycles=100_000_000):
    """The least over rounds of run_round()'s result (a tuple, so its first
    element decides), each round timed with the GPU held busy by a sleep
    kernel of sleep_cycles (10^8: ~50 ms) so that no launch waits for it,
    and the GPU drained after it."""
    best = None
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda._sleep(sleep_cycles)
        result = run_round()
        best = result if best is None else min(best, result)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return best


def host_us(fn, device, calls=10, rounds=20, sleep_cycles=100_000_000):
    """Best over rounds of the mean host time per call of fn, in us: the
    host's time to issue it (best_round). Few calls a round: a stream holds
    about a thousand pending launches, and a host that fills it waits for the
    GPU (a first version with 200 calls a round measured 2.6 ms for a
    forward: the GPU's time, not the host's)."""
    for _ in range(3):
        fn()

    def run_round():
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return ((time.perf_counter() - t0) / calls,)

    return 1e6 * best_round(run_round, device, rounds, sleep_cycles)[0]


def capture_graph(fn):
    """fn captured as a CUDA graph: it runs three times on a side stream first
    (warm-up, as capture requires), then once under capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_replay_ms(fns, rep_ms=100):
    """Median milliseconds of a CUDA-graph replay (capture_graph) of each
    function in fns (a dict name -> fn), by do_bench as in time_ms: the time
    of the kernels alone, without the host's launch and autograd work (which
    time_ms includes, and which decides it for small ops)."""
    from triton.testing import do_bench
    out = {}
    for k, fn in fns.items():
        try:
            graph = capture_graph(fn)
        except RuntimeError as e:  # torch.AcceleratorError is one
            # Not every peer can be captured: say which and why, time the rest.
            print(f"  {k}: CUDA-graph capture failed: {str(e).splitlines()[0]}", flush=True)
            out[k] = None
            torch.cuda.synchronize()
            continue
        out[k] = do_bench(graph.replay, warmup=max(10, rep_ms // 8), rep=rep_ms,
                          return_mode="median")
        del graph
    return out


def time_part_ms(fns, device, rounds=3, rep_ms=100):
    """Median milliseconds of timed(prepare()) for each name -> (prepare,
    timed), counting timed alone: for a backward, which needs a fresh forward
    each time (torch.compile's backward frees its buffers, so one forward
    cannot serve many backwards). Each gets about rep_ms of timed runs per
    round (on GPU between CUDA events), in interleaved rounds as in time_ms."""
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, (prepare, timed) in fns.items():
            timed(prepare())  # warm-up
            spent = 0.0
            while spent < rep_ms or len(samples[k]) < 5:
                arg = prepare()
                if device.type == "cuda":
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    timed(arg)
                    end.record()
                    end.synchronize()
                    ms = start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    timed(arg)
                    ms = (time.perf_counter() - t0) * 1e3
                del arg
                samples[k].append(ms)
                spent += ms
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def peak_mib(step, device):
    """Peak memory allocated while step() runs, above what was allocated
    before (GPU only: the CPU allocator keeps no such count)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def ceilings(device, dtype):
    """The card's measured ceilings: copy bandwidth in GB/s (bytes read plus
    bytes written, one big device-to-device copy) and matmul TFLOP/s of a big
    square matmul in dtype. These are what the per-op figures are fractions of."""
    if device.type == "cuda":
        n_copy, n_mm = 2**28, 8192          # 512 MiB of bf16 copied; 8192^3 matmul
    else:
        n_copy, n_mm = 2**24, 1024          # 64 MiB float32 (beyond the caches); 1024^3
    src = torch.randn(n_copy, device=device, dtype=torch.float32).to(dtype)
    dst = torch.empty_like(src)
    a = torch.randn(n_mm, n_mm, device=device, dtype=dtype)
    b = torch.randn(n_mm, n_mm, device=device, dtype=dtype)
    ms = time_ms({"copy": lambda: dst.copy_(src), "matmul": lambda: a @ b}, device)
    copy_bytes = 2 * src.numel() * src.element_size()
    return dict(dtype=dtype_name(dtype), copy_gbs=copy_bytes / ms["copy"] / 1e6,
                matmul_tflops=2 * n_mm**3 / ms["matmul"] / 1e9, matmul_n=n_mm,
                copy_mib=src.numel() * src.element_size() / 2**20)


def write_json(results, out, stem):
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, stem + ".json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None without matplotlib
    (it is in the [bench] extra, not a dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    return plt


def save_figure(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
