#!/usr/bin/env bash
# A GPU session's first call on main. Session 12's must come first: be55df7
# (the attention blocks in even groups of heads) ran only a benchmark in
# session 11, no test. Build; the CUDA tests with memcheck and
# racecheck beside them (scripts/gpu_check.sh); bench_attention at head dims
# 64 and 128 on the default kernels and on the mma.sync ones (the mma.sync
# kernels serve head dims 32/48/80/96 on Hopper and every head dim before
# it; NANOBLOCK_ATTENTION_KERNELS=mma forces them); the Block with its peers,
# forward+backward eagerly and replayed from a CUDA graph (the kernels' time
# without the host's).
#   OUT=$OUT/n PACK=$OUT/next.tgz bash scripts/next_gpu.sh
# ($OUT/... : the GPU tool returns only what lies under its $OUT, at most 8
# files, hence the one archive.)
# Second call: why the head-dim-80 mma.sync forward is 9-12% slower than
# before session 11 (0.131 -> 0.143-0.147 ms at (8, 1024, 16, 80); not the
# copy unroll, not the uneven groups). The baseline is main with every head
# in one group (the old rank-major order), so the A/B isolates the order:
#   rm -rf .base && mkdir .base && git archive HEAD csrc nanoblock setup.py pyproject.toml | tar -x -C .base
#   sed -i 's|return static_cast<int>((heads + fit - 1) / fit);|return 1;|' .base/csrc/cuda/tensor_core.cuh
#   OUT=$OUT/ab PACK=$OUT/ab.tgz BLOCK=0 bash scripts/ab_gpu.sh     (carry: .base)
# Later: every built wgmma tile shape against the defaults (~4 minutes):
#   bash scripts/sweep_wgmma_shapes.sh > $OUT/sweep.txt 2>&1
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/out_and_pack.sh /tmp/next
OUT=$out PYTEST_TARGETS=tests/test_cuda.py PYTEST_FLAGS="-q -m cuda" \
  SANITIZERS="memcheck racecheck" \
  SANITIZER_TIMEOUT=200 SKIP_LONG_RUN=1 SKIP_BENCH=1 timeout 420 bash scripts/gpu_check.sh \
  >"$out/gpu_check.txt" 2>&1
grep -E "^===|passed|failed|SUMMARY|FAILED" "$out/gpu_check.txt"
for kernels in auto mma; do
  for hd in 64 128; do
    echo "=== bench_attention --hd $hd, kernels $kernels ($(date +%T))"
    NANOBLOCK_ATTENTION_KERNELS=$kernels timeout 40 python3 benchmarks/bench_attention.py \
      --hd "$hd" 2>&1 | tee -a "$out/attention.txt"
  done
done
echo "=== bench_block ($(date +%T))"
timeout 120 python3 benchmarks/bench_block.py --device cuda --config tiny --config gpt2-small \
  --config long --dtype bfloat16 --impl nanoblock,eager,floor --mode forward_backward,forward_backward_graph \
  --out "$out" --tag block 2>&1 | grep -vE "^card|Warn|run_backward" | tee "$out/block.txt"
echo "=== done ($(date +%T))"
