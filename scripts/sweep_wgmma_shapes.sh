#!/usr/bin/env bash
# Times the built wgmma attention tile shapes against each other and SDPA on
# the GPU: benchmarks/bench_attention.py once per shape, in its own process
# (the dispatch reads NANOBLOCK_WGMMA_* once), one kernel's shape varied, the
# other two on their defaults. The lists are the shapes built in
# csrc/cuda/attention_wgmma.cu (launch_built) and
# attention_wgmma_backward.cu (launch_built_grad_kv, launch_built_grad_q),
# as TILE,WARPGROUPS,SCHEDULE; keep them in step. Each list starts with
# the dispatch's default (default_forward_tiles and its backward peers).
#
#   bash scripts/sweep_wgmma_shapes.sh                    # all three kernels
#   bash scripts/sweep_wgmma_shapes.sh forward grad_q     # some of them
set -uo pipefail
cd "$(dirname "$0")/.."

declare -A SHAPES=(
  [forward-64]="64,2,1 64,2,0 128,2,2 64,2,2 64,3,2 128,2,0 128,2,1 128,1,0"
  [forward-128]="64,2,0 64,2,2 64,2,1 128,2,0 128,2,1"
  [grad_kv-64]="128,2,0 128,2,1 64,2,0 64,2,2 64,1,0"
  [grad_kv-128]="64,2,1 64,2,0 64,1,0"
  [grad_q-64]="64,1,0 64,1,2 128,2,0 128,2,2 128,1,0 64,2,0"
  [grad_q-128]="64,2,0 64,2,2 64,1,0"
)
declare -A VARIABLE=([forward]=NANOBLOCK_WGMMA_FORWARD [grad_kv]=NANOBLOCK_WGMMA_GRAD_KV
                     [grad_q]=NANOBLOCK_WGMMA_GRAD_Q)

kernels=("$@")
[ $# -eq 0 ] && kernels=(forward grad_kv grad_q)
for kernel in "${kernels[@]}"; do
  for hd in 64 128; do
    for shape in ${SHAPES[$kernel-$hd]}; do
      echo "=== $kernel, head dim $hd: ${VARIABLE[$kernel]}=$shape"
      env "${VARIABLE[$kernel]}=$shape" timeout 120 python3 benchmarks/bench_attention.py --hd "$hd" \
          2>&1 | grep -vE "^card|^shape"
    done
  done
done
