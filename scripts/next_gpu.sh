#!/usr/bin/env bash
# A GPU session's first call on main: build; the CUDA tests with memcheck
# and racecheck beside them (scripts/gpu_check.sh); bench_attention at head
# dims 64 and 128 on the default kernels and on the mma.sync ones (the
# mma.sync kernels serve head dims 32/48/80/96 on Hopper and every head dim
# before it; NANOBLOCK_ATTENTION_KERNELS=mma forces them); the Block with
# its peers, forward+backward launched and replayed from a CUDA graph (the
# kernels' time without the host's). Session 15's should come first: main's
# LayerNorm backward row loop and acc_element (ad3180c) ran only through
# bits_dump.py (1020 of 1020 tensors equal to the tree before) and
# profile_block, not the CUDA tests or the sanitizers (session 14's device
# time ran out).
#   OUT=$OUT/n PACK=$OUT/next.tgz bash scripts/next_gpu.sh
# ($OUT/... : the GPU tool returns only what lies under its $OUT, at most 8
# files, hence the one archive.) memcheck's subset needs about 240 s beside
# pytest (84% of it in 200 s, session 12), hence its 270.
# Then the changes waiting in pending/ (compiled, never run on a GPU): each
# an A/B against main with tests, a bitwise comparison and profiles
# (pending/README.md). A/B of a change against a baseline tree, both built
# in one call: scripts/ab_gpu.sh (its header). Benchmarks and profiles of
# the baseline must run from inside it (cd /tmp/base): bench_block.py and
# profile_block.py put their own repository first on sys.path, so
# PYTHONPATH alone does not select the tree (session 12).
# Later: every built wgmma tile shape against the defaults (~4 minutes):
#   bash scripts/sweep_wgmma_shapes.sh > $OUT/sweep.txt 2>&1
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/out_and_pack.sh /tmp/next
OUT=$out PYTEST_TARGETS=tests/test_cuda.py PYTEST_FLAGS="-q -m cuda" \
  SANITIZERS="memcheck racecheck" \
  SANITIZER_TIMEOUT=270 SKIP_LONG_RUN=1 SKIP_BENCH=1 timeout 480 bash scripts/gpu_check.sh \
  >"$out/gpu_check.txt" 2>&1
grep -E "^===|passed|failed|SUMMARY|FAILED" "$out/gpu_check.txt"
# The benchmarks in the order of what the targets need most, each only if
# the call's 600 s leave it room (the tests and sanitizers take ~7 minutes
# with the build; session 12's call 1 took 6 with memcheck at 200 s).
room() { [ $((SECONDS + $1)) -lt "${CALL_SECONDS:-585}" ] || { echo "=== skipped: $2 (no room)"; false; }; }
if room 110 bench_block; then
  echo "=== bench_block ($(date +%T))"
  timeout 110 python3 benchmarks/bench_block.py --device cuda --config tiny --config gpt2-small \
    --dtype bfloat16 --impl nanoblock,eager,floor --mode forward_backward,forward_backward_graph \
    --out "$out" --tag block 2>&1 | grep -vE "^card|Warn|run_backward" | tee "$out/block.txt"
fi
# Issue 3's LayerNorm target: (16384, 768) forward+backward against the copy
# ceiling (not rerun since session 10's 57%; the forward is faster since).
if room 60 "bench_ops layer_norm"; then
  echo "=== bench_ops layer_norm ($(date +%T))"
  timeout 60 python3 benchmarks/bench_ops.py --op layer_norm --device cuda --out "$out" 2>&1 \
    | grep -vE "Warn|run_backward" | tee "$out/layer_norm.txt"
fi
for kernels in auto mma; do
  for hd in 64 128; do
    room 40 "bench_attention --hd $hd, kernels $kernels" || continue
    echo "=== bench_attention --hd $hd, kernels $kernels ($(date +%T))"
    NANOBLOCK_ATTENTION_KERNELS=$kernels timeout 40 python3 benchmarks/bench_attention.py \
      --hd "$hd" 2>&1 | tee -a "$out/attention.txt"
  done
done
echo "=== done ($(date +%T))"
