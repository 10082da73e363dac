"""Why the attention kernels run at the speed they do: Nsight Compute's full
set on one forward+backward of nanoblock's causal attention (and, with
--sdpa, of PyTorch's SDPA at the same shape), reduced to what says where a
tensor-core kernel loses time: issue-slot use, the busiest pipelines
(tensor, FMA, ALU, XU = the special-function unit that runs exp2), and the
warp stall reasons, largest first.

    python scripts/ncu_attention.py                    # 4,4096,12,64, bf16
    python scripts/ncu_attention.py --shape 16,1024,12,64 --sdpa --out /tmp/ncu

Metric names differ between ncu versions, so the script takes whatever the
full set's raw page holds: columns with "stalled" in their name (per issued
instruction) for the stalls, "pipe_" with "pct_of_peak" for the pipelines.
--out also keeps ncu's own text report of every section (--print-details
all), to read what the reduction leaves out. ncu runs with --clock-control
none (the clocks a benchmark sees, METHOD.md). Needs ncu on PATH and a GPU.

--sass NAME adds, for nanoblock's kernels whose name contains NAME, the
executed instructions per SASS opcode (ncu's source page, SASS view:
"Instructions Executed" per instruction, summed by opcode), largest first:
which instructions fill the pipe that binds a kernel. One table a kernel,
in launch order (for wgmma: forward, grad_kv, grad_q; ncu names none of
them); with --out, ncu's page itself is kept as ncu_attention_sass.csv.
"""
import argparse
import csv
import io
import os
import subprocess
import sys


def worker(args):
    import torch
    import torch.nn.functional as F
    from nanoblock import ops
    B, T, H, hd = (int(v) for v in args.shape.split(","))
    C = H * hd
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16)

    def sdpa(qkv):
        q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in qkv.split(C, dim=2))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(B, T, C)

    fn = sdpa if args.impl == "sdpa" else (lambda t: ops.causal_attention(t, H))
    for _ in range(3):
        torch.autograd.grad(fn(qkv), qkv, gy)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    torch.autograd.grad(fn(qkv), qkv, gy)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def report(raw_csv, top):
    """Per kernel of ncu's --csv --page raw output: time, issue use,
    pipelines and stalls."""
    lines = [l for l in raw_csv.splitlines() if l.startswith('"')]
    reader = csv.reader(io.StringIO("\n".join(lines)))
    header = next(reader)
    units = dict(zip(header, next(reader)))
    for values in reader:
        row = dict(zip(header, values))
        name = row.get("Kernel Name", "?").split("(")[0][-90:]
        if row.get("gpu__time_duration.sum") is None:
            continue
        t = number(row["gpu__time_duration.sum"])
        unit = units.get("gpu__time_duration.sum", "")
        us = t / 1e3 if unit in ("ns", "nsecond") else t * 1e3 if unit in ("ms", "msecond") else t
        print(f"\n{name}\n  time {us:.1f} us, grid {row.get('launch__grid_size')}, "
              f"block {row.get('launch__block_size')}, "
              f"registers {row.get('launch__registers_per_thread')}")
        for key in ("sm__inst_issued.avg.pct_of_peak_sustained_active",
                    "sm__warps_active.avg.pct_of_peak_sustained_active",
                    "smsp__issue_active.avg.pct_of_peak_sustained_active"):
            if key in row:
                print(f"  {key:<70} {row[key]:>8}")
        # One figure a pipeline (its average over the SMs while active):
        # the .max/.min/.sum and "elapsed" variants of the busiest one would
        # fill the list (session 9's report showed only the ALU that way).
        pipes = sorted(((number(v) or 0.0, k) for k, v in row.items()
                        if "pipe_" in k and k.endswith(".avg.pct_of_peak_sustained_active")),
                       reverse=True)
        print("  pipelines (% of peak, average over SMs while active):")
        for value, key in pipes[:top]:
            print(f"    {key:<76} {value:7.1f}")
        stalls = sorted(((number(v) or 0.0, k) for k, v in row.items()
                         if "stalled" in k and "per_issue_active" in k and "not_issued" not in k),
                        reverse=True)
        print("  warp stalls (cycles per issued instruction):")
        for value, key in stalls[:top]:
            print(f"    {key:<76} {value:7.2f}")


def opcode_counts(source_csv, top):
    """Executed warp instructions per SASS opcode from ncu's --page source
    --print-source sass --csv output (one table a profiled kernel)."""
    lines = [l for l in source_csv.splitlines() if l.startswith('"')]
    if not lines:
        print(source_csv[:3000])
        return
    reader = csv.reader(io.StringIO("\n".join(lines)))
    tables, counts, source, executed = [], {}, None, None
    for row in reader:
        if "Source" in row:  # a header: a kernel's table starts
            counts = {}
            tables.append(counts)
            source = row.index("Source")
            names = [i for i, n in enumerate(row)
                     if "Instructions Executed" in n and "Thread" not in n]
            executed = names[0] if names else None
            if executed is None:
                print("no 'Instructions Executed' column in:", row)
            continue
        if source is None or executed is None or len(row) <= max(source, executed):
            continue
        words = row[source].split()
        if words and words[0].startswith("@"):  # a predicate guard
            words = words[1:]
        value = number(row[executed])
        if words and value:
            op = words[0].split(".")[0]
            counts[op] = counts.get(op, 0) + value
    # ncu printed the backward kernels' tables twice each (H200, session 10);
    # a table equal to one already shown is left out.
    shown = []
    for counts in tables:
        if counts and counts not in shown:
            shown.append(counts)
            print_opcodes(counts, top)


def print_opcodes(counts, top):
    total = sum(counts.values())
    print(f"  executed warp instructions by opcode ({total:.4g} in all):")
    for op, value in sorted(counts.items(), key=lambda kv: -kv[1])[:2 * top]:
        print(f"    {op:12s} {value:14,.0f}  {100 * value / total:5.1f}%")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4,4096,12,64", help="B,T,n_head,head_dim")
    p.add_argument("--sdpa", action="store_true", help="also profile SDPA at the same shape")
    p.add_argument("--top", type=int, default=12, help="rows of pipelines and stalls shown")
    p.add_argument("--out", help="folder for ncu's full text report of each run")
    p.add_argument("--sass", metavar="NAME",
                   help="also executed instructions per opcode of nanoblock's kernels "
                        "whose name contains NAME (e.g. wgmma_forward)")
    p.add_argument("--impl", default="nanoblock", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    for impl in ["nanoblock"] + (["sdpa"] if args.sdpa else []):
        base = ["ncu", "--set", "full", "--profile-from-start", "off", "--clock-control", "none"]
        work = [sys.executable, os.path.abspath(__file__), "--worker", "--shape", args.shape,
                "--impl", impl]
        done = subprocess.run(base + ["--csv", "--page", "raw"] + work, capture_output=True,
                              text=True)
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:])
            raise SystemExit(f"ncu failed ({done.returncode})")
        print(f"\n=== {impl}, shape {args.shape} (B,T,n_head,head_dim), bf16, fwd+bwd")
        report(done.stdout, args.top)
        if args.sass and impl == "nanoblock":
            source = subprocess.run(
                base[:1] + ["--section", "SourceCounters", "--profile-from-start", "off",
                            "--clock-control", "none", "-k", f"regex:{args.sass}",
                            "--page", "source", "--print-source", "sass", "--csv"] + work,
                capture_output=True, text=True)
            print(f"\n=== SASS opcodes of the kernels matching {args.sass!r}")
            if source.returncode != 0:
                print(source.stdout[-2000:], source.stderr[-2000:])
            else:
                opcode_counts(source.stdout, args.top)
                if args.out:  # ncu's own table, to tell the kernels apart by hand
                    with open(os.path.join(args.out, "ncu_attention_sass.csv"), "w") as f:
                        f.write(source.stdout)
        if args.out:
            with open(os.path.join(args.out, f"ncu_attention_{impl}.txt"), "w") as f:
                subprocess.run(base + ["--print-details", "all"] + work, stdout=f,
                               stderr=subprocess.STDOUT, text=True)


if __name__ == "__main__":
    main()
