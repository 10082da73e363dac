#!/usr/bin/env bash
# EXPERIMENT (branch next-gpu2): the first GPU call of the next session. The
# branch cuts the wgmma kernels' per-tile instructions (sm_90a SASS, counted
# here without a GPU): per-thread copy addresses worked out once
# (TileCopyWalk), descriptors by one add (descriptor_plus), the warpgroup
# index through a shuffle, the output's rescale skipped when no row's
# maximum moved, and the serial forward's mask fixed per call. All meant to
# leave every result bit-identical. This call: build, the CUDA tests with
# memcheck and racecheck beside them (scripts/gpu_check.sh), then the
# attention at head dims 64 and 128, bench_ops' mlp_up (issue 3's cuBLASLt
# GELU epilogue, first GPU run) and the Block with its peers. Compare
# with session 9's call 4 (benchmarks/results/nvidia-h200/session9/
# call4_final.txt: forward 0.109 / 0.326 ms at head dim 64, fwd+bwd 0.440 /
# 1.256; gpt2-small Block 1.962 ms).
#   OUT=/tmp/n PACK=$OUT/next.tgz bash scripts/next_gpu.sh
# Second call, the counters of the new kernels (with --sass: executed
# instructions per opcode, the first GPU run of that reading):
#   python3 scripts/ncu_attention.py --shape 4,4096,12,64 --sdpa --sass wgmma \
#       --out $OUT/ncu
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/next}
mkdir -p "$out"
if [ -n "${PACK:-}" ]; then
  trap 'tar czf "$PACK" -C "$out" . 2>/dev/null' EXIT
fi
OUT=$out PYTEST_TARGETS=tests/test_cuda.py PYTEST_FLAGS="-q -m cuda" \
  SANITIZERS="memcheck racecheck" \
  SANITIZER_TIMEOUT=200 SKIP_LONG_RUN=1 SKIP_BENCH=1 timeout 420 bash scripts/gpu_check.sh \
  >"$out/gpu_check.txt" 2>&1
grep -E "^===|passed|failed|SUMMARY|FAILED" "$out/gpu_check.txt"
for hd in 64 128; do
  echo "=== bench_attention --hd $hd ($(date +%T))"
  timeout 40 python3 benchmarks/bench_attention.py --hd "$hd" 2>&1 | tee -a "$out/attention.txt"
done
echo "=== bench_ops mlp_up: cuBLASLt's GELU epilogue vs the Block's GEMM + bias_gelu ($(date +%T))"
timeout 60 python3 benchmarks/bench_ops.py --device cuda --op mlp_up --out "$out" --tag ops_mlp_up \
  2>&1 | grep -vE "^card" | tee "$out/mlp_up.txt"
echo "=== bench_block ($(date +%T))"
timeout 80 python3 benchmarks/bench_block.py --device cuda --config tiny --config gpt2-small \
  --config long --dtype bfloat16 --impl nanoblock,eager,floor --mode forward_backward \
  --out "$out" --tag block 2>&1 | grep -vE "^card" | tee "$out/block.txt"
echo "=== done ($(date +%T))"
