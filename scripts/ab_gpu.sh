#!/usr/bin/env bash
# A/B of the attention kernels on the GPU machine in one call: the working
# tree (built and installed editable) against a baseline source tree carried
# in .base/ (built in place, used through PYTHONPATH), both built at once.
# Then bench_attention on each, alternating (default kernels and the
# mma.sync ones), and the Block (eager fwd+bwd and CUDA-graph replay) on the
# working tree. Make .base here first (ignored through .git/info/exclude):
#   rm -rf .base && mkdir .base && git archive BASE csrc nanoblock setup.py pyproject.toml | tar -x -C .base
# and name .base in the device tool's carry:
#   OUT=$OUT/ab PACK=$OUT/ab.tgz bash scripts/ab_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/ab}
mkdir -p "$out"
if [ -n "${PACK:-}" ]; then
  trap 'tar czf "$PACK" -C "$out" . 2>/dev/null' EXIT
fi
[ -d .base/csrc ] || { echo "no .base/ (see the header)"; exit 2; }
rm -rf /tmp/base && cp -r .base /tmp/base
echo "=== build, both trees at once ($(date +%T))"
(TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 python3 -m pip install --no-build-isolation --no-deps -e . \
  >"$out/build_new.log" 2>&1; echo "new: $?") &
(cd /tmp/base && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 python3 setup.py build_ext --inplace \
  >"$out/build_base.log" 2>&1; echo "base: $?") &
wait
echo "=== built ($(date +%T))"
python3 -c "import nanoblock, os; print('new from', os.path.dirname(nanoblock.__file__))"
PYTHONPATH=/tmp/base python3 -c "import nanoblock, os; print('base from', os.path.dirname(nanoblock.__file__))"
for round in 1 2; do
  for kernels in auto mma; do
    for tree in base new; do
      echo "=== round $round, $tree, kernels $kernels ($(date +%T))"
      if [ "$tree" = base ]; then pp=/tmp/base; else pp=; fi
      PYTHONPATH=$pp NANOBLOCK_ATTENTION_KERNELS=$kernels timeout 60 python3 \
        benchmarks/bench_attention.py 2>&1 | grep -v "^card"
    done
  done
done 2>&1 | tee "$out/attention_ab.txt"
echo "=== bench_block, new ($(date +%T))"
timeout 150 python3 benchmarks/bench_block.py --device cuda --config tiny --config gpt2-small \
  --config long --dtype bfloat16 --impl nanoblock,eager,floor \
  --mode forward_backward,forward_backward_graph \
  --out "$out" --tag block 2>&1 | grep -vE "^card|Warn|run_backward" | tee "$out/block.txt"
echo "=== done ($(date +%T))"
