"""The whole benchmark suite for one device, into one folder.

    python -m benchmarks.run_all --device cpu  --out benchmarks/results/cpu-2core
    python -m benchmarks.run_all --device cuda --out "$OUT/bench"

Runs bench_block, bench_ops and bench_train with their defaults for the
device, each in its own process (a failure or a CUDA error in one leaves the
others their run), and writes into --out:

    bench_block_<device>.json  .png    one Block: nanoblock vs eager vs compile (vs floor)
    bench_ops_<device>.json    .png    LayerNorm, attention (T sweep), GELU, MLP vs PyTorch
    bench_train_<device>.json          GPT training tokens/s

Five files, so that the GPU machine (which returns at most 8 files per call)
can send them back beside the build and test logs. Each bench's own options
(python benchmarks/bench_block.py --help, ...) run one part on other shapes.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = ("bench_block", "bench_ops", "bench_train")


def main(argv=None):
    p = argparse.ArgumentParser(description="Run the whole benchmark suite for one device.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="folder for every result file")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated from {BENCHES}")
    args = p.parse_args(argv)

    args.out = os.path.abspath(args.out)  # the benches run from the repository root
    os.makedirs(args.out, exist_ok=True)
    failed, took = [], {}
    start = time.time()
    for bench in args.only.split(","):
        if bench not in BENCHES:
            raise SystemExit(f"unknown benchmark {bench!r}; choose from {BENCHES}")
        print(f"\n=== {bench} --device {args.device} ({time.strftime('%H:%M:%S')})", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{bench}",
                              "--device", args.device, "--out", args.out], cwd=ROOT)
        took[bench] = time.time() - t0
        if rc != 0:
            failed.append(bench)
    print("\n=== suite: " + ", ".join(f"{b} {s:.0f} s" for b, s in took.items())
          + f"; total {time.time() - start:.0f} s; results in {args.out}")
    if failed:
        print(f"FAILED: {' '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
