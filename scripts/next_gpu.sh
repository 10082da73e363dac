#!/usr/bin/env bash
# EXPERIMENT (branch next-gpu): the first GPU calls of the next session, in
# steps that fit a call each (STEPS; results under OUT):
#   build   the extension (sm_90a)
#   tests   the CUDA tests these changes touch: GELU, the Block, the
#           environment-chosen wgmma shapes (the new 64,2,1 forward among them)
#   gelu    two loads in flight (NANOBLOCK_GELU_LOADS=2, the default) against
#           one: bench_ops bias_gelu and bench_block gpt2-small under each
#   shapes  the head-dim-64 wgmma forwards: the serial default against the new
#           64-key ones (pipelined at 2 blocks an SM; 4 warpgroups, 256
#           queries, serial and pipelined; bench_attention under each; 3
#           warpgroups do not divide a tile's copies)
#   ncu     scripts/ncu_attention.py at T = 4096 and gpt2-small, with SDPA
#   memcheck compute-sanitizer memcheck on the GELU tests (the loads moved)
#   gemm    the Block's bias-free GEMMs straight into at::cuda::blas::gemm
#           (default) against at::mm (NANOBLOCK_GEMM=aten): bits
#           (block_bits.py), host_time.py and bench_block tiny and gpt2-small
#   OUT=/tmp/n STEPS="build tests gelu gemm" bash scripts/next_gpu.sh
#   OUT=/tmp/n STEPS="shapes ncu memcheck" bash scripts/next_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/next}
mkdir -p "$out"
steps=" ${STEPS:-build tests gelu gemm shapes ncu memcheck} "
want() { [[ "$steps" == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
if want build; then
  echo "=== build ($(date +%T))"
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e . \
    >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
fi
if want tests; then
  for loads in 2 1; do
    echo "=== tests, NANOBLOCK_GELU_LOADS=$loads ($(date +%T))"
    NANOBLOCK_GELU_LOADS=$loads timeout 240 python3 -m pytest -q -m cuda tests/test_cuda.py \
      -p no:cacheprovider -k "gelu or block or wgmma_tile_shapes or deterministic" 2>&1 | tail -4
  done
fi
if want gelu; then
  for loads in 1 2; do
    echo "=== bench_ops bias_gelu, NANOBLOCK_GELU_LOADS=$loads ($(date +%T))"
    NANOBLOCK_GELU_LOADS=$loads timeout 90 python3 benchmarks/bench_ops.py --device cuda \
      --op layer_norm,add_layer_norm,bias_gelu --out "$out" --tag "ops_gelu_loads$loads" 2>&1 |
      grep -E "nanoblock|copy|ceilings"
    echo "=== bench_block, NANOBLOCK_GELU_LOADS=$loads ($(date +%T))"
    NANOBLOCK_GELU_LOADS=$loads timeout 90 python3 benchmarks/bench_block.py --device cuda \
      --config gpt2-small --dtype bfloat16 --impl nanoblock --mode forward_backward \
      --out "$out" --tag "block_gelu_loads$loads" 2>&1 | grep -E "nanoblock"
  done
fi
if want gemm; then
  echo "=== gemm: bits ($(date +%T))"
  NANOBLOCK_GEMM=aten timeout 120 python3 scripts/block_bits.py save /tmp/bits_aten.pt 2>&1 | tail -2
  timeout 120 python3 scripts/block_bits.py save /tmp/bits_direct.pt 2>&1 | tail -2
  python3 scripts/block_bits.py compare /tmp/bits_aten.pt /tmp/bits_direct.pt 2>&1 | tail -6
  for g in aten direct direct aten; do
    echo "=== gemm: host_time.py tiny, NANOBLOCK_GEMM=$g ($(date +%T))"
    NANOBLOCK_GEMM=$g timeout 120 python3 benchmarks/host_time.py --device cuda 2>&1 |
      grep -E "Block|block_forward|block_backward"
    echo "=== gemm: bench_block, NANOBLOCK_GEMM=$g ($(date +%T))"
    NANOBLOCK_GEMM=$g timeout 90 python3 benchmarks/bench_block.py --device cuda --config tiny \
      --config gpt2-small --dtype bfloat16 --impl nanoblock --mode forward_backward \
      --out "$out" --tag "block_gemm_$g" 2>&1 | grep -E "nanoblock"
  done
fi
if want shapes; then
  for shape in 64,2,0 64,2,1 64,4,0 64,4,1 64,2,0; do
    echo "=== bench_attention --hd 64, NANOBLOCK_WGMMA_FORWARD=$shape ($(date +%T))"
    NANOBLOCK_WGMMA_FORWARD=$shape timeout 90 python3 benchmarks/bench_attention.py --hd 64 2>&1 |
      grep -vE "^card"
  done
fi
if want ncu; then
  for shape in 4,4096,12,64 16,1024,12,64; do
    echo "=== ncu_attention $shape ($(date +%T))"
    timeout 240 python3 scripts/ncu_attention.py --shape "$shape" --sdpa --out "$out/ncu_$shape" 2>&1
  done
fi
if want memcheck; then
  echo "=== memcheck, GELU tests ($(date +%T))"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool memcheck --print-limit 20 \
    python3 -m pytest -x -q -p no:cacheprovider tests/test_cuda.py -k "gelu" 2>&1 | tail -8
fi
echo "=== done ($(date +%T))"
