"""Hardware counters of every kernel in one Block forward+backward on the
GPU, from Nsight Compute (ncu): time, DRAM bytes and bandwidth, the share
of the DRAM and SM peaks, achieved occupancy, registers and launch shape.
It says which of our memory-bound kernels fall short of the copy bandwidth
and why (few blocks, low occupancy, registers), which the timings of
benchmarks/ do not.

    python scripts/ncu_block.py                      # tiny and gpt2-small, bf16
    python scripts/ncu_block.py --config 16,1024,768,12 --impl eager

It runs itself under ncu (--worker): a few warm-up steps, then one
forward+backward between cudaProfilerStart/Stop, so only that step's
kernels are replayed (each several times, to read all counters; the
times are ncu's, of each kernel alone with a flushed cache, not of the
stream). "write MB" is what reached DRAM while the kernel ran: a kernel's
output that stays in the 50 MB L2 shows far less than it wrote, so GB/s
undercounts writers of small outputs. Needs ncu on PATH and a CUDA GPU.
"""
import argparse
import csv
import io
import os
import subprocess
import sys

METRICS = {
    "gpu__time_duration.sum": "us",
    "dram__bytes_read.sum": "read MB",
    "dram__bytes_write.sum": "write MB",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram %",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm %",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occ %",
    "launch__registers_per_thread": "regs",
    "launch__grid_size": "grid",
    "launch__block_size": "block",
}
# Units ncu may report each metric in, to the unit of the table.
# ncu 2025+ writes "ns"/"MB"; older ones "nsecond"/"Mbyte". An unknown unit
# raises rather than passing through unscaled (session 7's first run printed
# nanoseconds under "us" that way).
SCALE = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
         "byte": 1e-6, "B": 1e-6, "Kbyte": 1e-3, "KB": 1e-3, "Mbyte": 1.0, "MB": 1.0,
         "Gbyte": 1e3, "GB": 1e3, "%": 1.0, "register/thread": 1.0, "": 1.0}


def worker(args):
    import torch
    import nanoblock
    from nanoblock import reference
    B, T, C, n_head = (int(v) for v in args.config.split(","))
    torch.manual_seed(0)
    cfg = nanoblock.GPTConfig(block_size=T, n_embd=C, n_head=n_head, dropout=0.0, bias=True)
    make = nanoblock.Block if args.impl == "nanoblock" else reference.ReferenceBlock
    dtype = getattr(torch, args.dtype)
    block = make(cfg).to("cuda", dtype)
    x = torch.randn(B, T, C, device="cuda", dtype=dtype, requires_grad=True)
    gy = torch.randn(B, T, C, device="cuda", dtype=dtype)
    params = list(block.parameters())

    def step():
        torch.autograd.grad(block(x), [x] + params, gy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def short(name, width=60):
    name = name.replace("(anonymous namespace)::", "").replace("nanoblock::cuda::", "")
    name = name.split("(")[0] if not name.startswith("void ") else name[5:].split("(")[0]
    return name if len(name) <= width else name[:width - 3] + "..."


def table(raw_csv):
    """The ncu --csv --page raw output as rows of (kernel, {column: value})."""
    lines = [l for l in raw_csv.splitlines() if l.startswith('"')]
    reader = csv.reader(io.StringIO("\n".join(lines)))
    header = next(reader)
    units = next(reader)
    rows = []
    for values in reader:
        row = dict(zip(header, values))
        out = {}
        for metric, column in METRICS.items():
            if metric not in row:
                continue
            unit = units[header.index(metric)]
            if unit not in SCALE:
                raise SystemExit(f"ncu reported {metric} in unit {unit!r}, which SCALE lacks")
            try:
                out[column] = float(row[metric].replace(",", "")) * SCALE[unit]
            except ValueError:
                out[column] = float("nan")
        rows.append((row.get("Kernel Name", "?"), out))
    return rows


def profile(config, impl, dtype):
    # --clock-control none: the clocks as a benchmark sees them (METHOD.md).
    cmd = ["ncu", "--csv", "--page", "raw", "--profile-from-start", "off", "--clock-control", "none",
           "--metrics", ",".join(METRICS), sys.executable, os.path.abspath(__file__),
           "--worker", "--config", config, "--impl", impl, "--dtype", dtype]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:])
        raise SystemExit(f"ncu failed ({done.returncode})")
    rows = table(done.stdout)
    total = sum(r.get("us", 0.0) for _, r in rows)
    print(f"\n{impl} Block, config {config} (B,T,C,n_head), {dtype}: {len(rows)} kernels, "
          f"{total:.1f} us summed (each kernel alone, ncu)")
    print(f"  {'kernel':<60} {'us':>7} {'read MB':>8} {'write MB':>8} {'GB/s':>6} "
          f"{'dram %':>6} {'sm %':>5} {'occ %':>5} {'regs':>4} {'grid':>7} {'block':>5}")
    for name, r in rows:
        us = r.get("us", float("nan"))
        gbs = (r.get("read MB", 0.0) + r.get("write MB", 0.0)) / us * 1e3 if us else float("nan")
        print(f"  {short(name):<60} {us:7.1f} {r.get('read MB', 0):8.1f} {r.get('write MB', 0):8.1f} "
              f"{gbs:6.0f} {r.get('dram %', 0):6.1f} {r.get('sm %', 0):5.1f} {r.get('occ %', 0):5.1f} "
              f"{r.get('regs', 0):4.0f} {r.get('grid', 0):7.0f} {r.get('block', 0):5.0f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append",
                   help="B,T,C,n_head (default: tiny 64,256,384,6 and gpt2-small 16,1024,768,12)")
    p.add_argument("--impl", default="nanoblock", choices=["nanoblock", "eager"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.config = args.config[0]
        return worker(args)
    for config in args.config or ["64,256,384,6", "16,1024,768,12"]:
        profile(config, args.impl, args.dtype)


if __name__ == "__main__":
    main()
