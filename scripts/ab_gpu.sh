#!/usr/bin/env bash
# A/B of the attention kernels on the GPU machine in one call: the working
# tree (built and installed editable) against a baseline source tree carried
# in .base/ (built in place, used through PYTHONPATH), both built at once.
# Then bench_attention on each, alternating (default kernels and the
# mma.sync ones), and the Block (eager fwd+bwd and CUDA-graph replay) on the
# working tree. Make .base here first (ignored through .git/info/exclude):
#   rm -rf .base && mkdir .base && git archive BASE csrc nanoblock setup.py pyproject.toml benchmarks scripts | tar -x -C .base
# and name .base in the device tool's carry:
#   OUT=$OUT/ab PACK=$OUT/ab.tgz bash scripts/ab_gpu.sh
# Environment: KERNELS (default "auto mma": NANOBLOCK_ATTENTION_KERNELS
# values to time; empty: no attention A/B), ROUNDS (default 2), TESTS=1
# (after the build, the CUDA tests on the working tree with racecheck and
# memcheck beside them, through scripts/gpu_check.sh; SANITIZER_TIMEOUT
# default 150 s, TESTS_TIMEOUT the whole step's, default 330; PYTEST_TARGETS,
# PYTEST_FLAGS and SKIP_SANITIZER=1 pass through), HOST=1 (HOST_ROUNDS,
# default 1, of benchmarks/host_time.py at tiny on each tree, alternating;
# each row of it is already a best of 20), PROFILE=1 (rounds of
# benchmarks/profile_block.py at gpt2-small and tiny on each tree,
# alternating: kernel time per kernel, host time, graph replay; .base needs
# benchmarks/ for it, so add benchmarks to the git archive above), BITS=1
# (scripts/bits_dump.py on each tree, from inside it, then the comparison:
# which results differ in any bit; .base needs scripts/), BLOCK=0 (leave the
# Block out).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/out_and_pack.sh /tmp/ab
[ -d .base/csrc ] || { echo "no .base/ (see the header)"; exit 2; }
# A second call on the still-warm machine keeps /tmp/base's build when
# .base is unchanged (the device tool replaces .base on every call).
hash=$(cd .base && find . -type f ! -name '*.so' -print0 | sort -z | xargs -0 cat | md5sum)
if [ "$(cat /tmp/base/.tree_hash 2>/dev/null)" != "$hash" ]; then
  rm -rf /tmp/base && cp -r .base /tmp/base && echo "$hash" >/tmp/base/.tree_hash
fi
echo "=== build, both trees at once ($(date +%T))"
(TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 python3 -m pip install --no-build-isolation --no-deps -e . \
  >"$out/build_new.log" 2>&1; echo "new: $?") &
(cd /tmp/base && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 python3 setup.py build_ext --inplace \
  >"$out/build_base.log" 2>&1; echo "base: $?") &
wait
echo "=== built ($(date +%T))"
if [ "${TESTS:-0}" = 1 ]; then
  OUT=$out/check PYTEST_TARGETS=${PYTEST_TARGETS:-tests/test_cuda.py} \
    PYTEST_FLAGS=${PYTEST_FLAGS:--q -m cuda} SANITIZERS="memcheck racecheck" SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-150} SKIP_LONG_RUN=1 SKIP_BENCH=1 SKIP_BUILD=1 \
    timeout "${TESTS_TIMEOUT:-330}" bash scripts/gpu_check.sh >"$out/gpu_check.txt" 2>&1
  grep -E "passed|failed|SUMMARY|FAILED" "$out/gpu_check.txt"
fi
if [ "${BITS:-0}" = 1 ]; then
  echo "=== bits: both trees on the same inputs ($(date +%T))"
  (cd /tmp/base && timeout 120 python3 scripts/bits_dump.py /tmp/bits_base.pt)
  timeout 120 python3 scripts/bits_dump.py /tmp/bits_new.pt
  python3 scripts/bits_dump.py --compare /tmp/bits_base.pt /tmp/bits_new.pt >"$out/bits.txt" 2>&1
  head -n 40 "$out/bits.txt"; tail -n 1 "$out/bits.txt"
fi
# Which nanoblock each tree's bench_attention run imports, asked as it asks
# (from outside a repository: python -c puts the current folder first).
(cd /tmp && python3 -c "import nanoblock, os; print('new from', os.path.dirname(nanoblock.__file__))")
(cd /tmp && PYTHONPATH=/tmp/base python3 -c "import nanoblock, os; print('base from', os.path.dirname(nanoblock.__file__))")
for round in $(seq "${ROUNDS:-2}"); do
  for kernels in ${KERNELS-auto mma}; do
    for tree in base new; do
      echo "=== round $round, $tree, kernels $kernels ($(date +%T))"
      if [ "$tree" = base ]; then pp=/tmp/base; else pp=; fi
      PYTHONPATH=$pp NANOBLOCK_ATTENTION_KERNELS=$kernels timeout 60 python3 \
        benchmarks/bench_attention.py 2>&1 | grep -v "^card"
    done
  done
done 2>&1 | tee "$out/attention_ab.txt"
# profile_block.py and host_time.py put their own repository first on
# sys.path, so each tree's copy runs from inside it (PYTHONPATH alone does
# not select the tree):
#   in_tree ROUND TREE LABEL SCRIPT [ARGS...]
in_tree() {
  local round=$1 tree=$2 label=$3 dir=$PWD
  shift 3
  [ "$tree" = base ] && dir=/tmp/base
  echo "=== round $round, $tree, $label ($(date +%T))"
  (cd "$dir" && timeout 90 python3 "$@" 2>&1 | grep -vE "Warn|run_backward|_warn_once")
}
if [ "${PROFILE:-0}" = 1 ]; then
  for round in $(seq "${ROUNDS:-2}"); do
    for tree in base new; do
      for config in 16,1024,768,12 64,256,384,6; do
        in_tree "$round" "$tree" "profile_block $config" benchmarks/profile_block.py \
          --config "$config" --steps 20
      done
    done
  done 2>&1 | tee "$out/profile_ab.txt"
fi
if [ "${HOST:-0}" = 1 ]; then
  for round in $(seq "${HOST_ROUNDS:-1}"); do
    for tree in base new; do
      in_tree "$round" "$tree" "host_time tiny" benchmarks/host_time.py --device cuda
    done
  done 2>&1 | tee "$out/host_ab.txt"
fi
[ "${BLOCK:-1}" = 0 ] && exit 0
echo "=== bench_block, new ($(date +%T))"
timeout 150 python3 benchmarks/bench_block.py --device cuda --config tiny --config gpt2-small \
  --config long --dtype bfloat16 --impl nanoblock,eager,floor \
  --mode forward_backward,forward_backward_graph \
  --out "$out" --tag block 2>&1 | grep -vE "^card|Warn|run_backward" | tee "$out/block.txt"
echo "=== done ($(date +%T))"
