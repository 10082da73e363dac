#!/usr/bin/env bash
# EXPERIMENT (branch gelu-fast): same-call A/B of
#   - the softmax's exp2 (tensor_core.cuh / common.cuh exp2_approx): B =
#     ex2.approx.ftz alone (this build), A = exp2f (the attention files
#     rebuilt with -DNANOBLOCK_EXP2_ACCURATE);
#   - the 16-bit GELU math: Gelu16Math (default) or GeluMath
#     (NANOBLOCK_GELU=accurate), same build.
#   OUT=/tmp/ab STEPS="build tests" bash scripts/ab_softmax_gelu.sh
#   OUT=/tmp/ab STEPS="bench rebuild_a bench_a" bash scripts/ab_softmax_gelu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/ab}
mkdir -p "$out"
steps=" ${STEPS:-build tests bench rebuild_a bench_a} "
want() { [[ "$steps" == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
block() {  # tag, env...
  local tag=$1; shift
  env "$@" timeout 100 python3 benchmarks/bench_block.py --device cuda --config tiny \
    --config gpt2-small --dtype bfloat16 --impl nanoblock --mode forward_backward \
    --out "$out" --tag "block_$tag" 2>&1 | grep -E "nanoblock"
}
if want build; then
  echo "=== build ($(date +%T))"
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e . \
    >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
fi
if want tests; then
  echo "=== pytest -m cuda tests/ ($(date +%T))"
  timeout 380 python3 -m pytest -q -m cuda tests/ -p no:cacheprovider 2>&1 | tail -25
fi
if want bench; then
  echo "=== B: bench_attention ($(date +%T))"
  timeout 100 python3 benchmarks/bench_attention.py 2>&1 | tail -12
  for g in fast accurate; do
    echo "=== B: bench_ops bias_gelu, GELU $g ($(date +%T))"
    NANOBLOCK_GELU=$g timeout 60 python3 benchmarks/bench_ops.py --device cuda --op bias_gelu \
      --out "$out" --tag "ops_gelu_$g" 2>&1 | grep -E "nanoblock|torch|ceilings" | grep -v Warn
    echo "=== B: bench_block, GELU $g ($(date +%T))"
    block "B_gelu_$g" NANOBLOCK_GELU=$g
  done
  echo "=== peers ($(date +%T))"
  timeout 120 python3 benchmarks/bench_block.py --device cuda --config tiny --config gpt2-small \
    --dtype bfloat16 --impl eager,floor --mode forward_backward --out "$out" --tag block_peers \
    2>&1 | grep -E "eager|floor"
fi
if want rebuild_a; then
  echo "=== A: attention files rebuilt with exp2f ($(date +%T))"
  touch csrc/cuda/attention_mma.cu csrc/cuda/attention_wgmma.cu csrc/cuda/attention_wgmma_backward.cu
  NVCC_APPEND_FLAGS=-DNANOBLOCK_EXP2_ACCURATE TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    python3 setup.py build_ext --inplace >"$out/build_a.log" 2>&1 || { tail -40 "$out/build_a.log"; exit 1; }
  grep -c "attention" "$out/build_a.log"
fi
if want bench_a; then
  echo "=== A: bench_attention ($(date +%T))"
  timeout 100 python3 benchmarks/bench_attention.py 2>&1 | tail -12
  echo "=== A: bench_block ($(date +%T))"
  block A_gelu_fast
  echo "=== B again: rebuilt with ex2.approx ($(date +%T))"
  touch csrc/cuda/attention_mma.cu csrc/cuda/attention_wgmma.cu csrc/cuda/attention_wgmma_backward.cu
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace >"$out/build_b2.log" 2>&1 &&
    timeout 100 python3 benchmarks/bench_attention.py 2>&1 | tail -12
fi
echo "=== done ($(date +%T))"
