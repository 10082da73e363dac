#!/usr/bin/env bash
# Everything the GPU machine is for, in one call: print the card, build the
# CUDA extension, run the whole test suite and, beside it, compute-sanitizer
# (memcheck, racecheck, initcheck) on a quick subset of the CUDA tests, train
# 5,000 steps against the reference (nanoblock.long_run), and run the benchmark suite
# (benchmarks/run_all.py: Block, ops, training; five files under $OUT/bench).
#
#   bash scripts/gpu_check.sh            # logs and results under ${OUT:-out}
#
# Environment:
#   OUT                    where logs go (default: out)
#   TORCH_CUDA_ARCH_LIST   default 9.0 (Hopper) to keep the build short
#   PYTEST_TARGETS         what pytest runs (default: tests/)
#   PYTEST_FLAGS           default: -x -q
#   SKIP_SANITIZER=1, SKIP_LONG_RUN=1, SKIP_BENCH=1   leave those steps out
#   SKIP_BUILD=1           the caller has built and installed this tree (its own
#                          pip install can rebuild it all: 3 minutes, session 13)
#   NCU=1                  also Nsight Compute's counters of every kernel of one
#                          Block step (scripts/ncu_block.py -> $OUT/ncu_block.txt)
#   SANITIZERS             which compute-sanitizer tools run (default:
#                          "memcheck racecheck initcheck")
#   MEMCHECK_K, RACECHECK_K, INITCHECK_K
#                          pytest -k of each tool's tests (defaults below)
#   INITCHECK_FLAGS        initcheck's compute-sanitizer flags (default:
#                          "--print-limit 0 --show-backtrace no": every report
#                          counted, fast; "--print-limit 10000" adds
#                          backtraces, slow where PyTorch's kernels draw many)
#   SANITIZER_TIMEOUT      seconds each sanitizer run may take (default: no limit;
#                          one cut off counts as failed)
#   PACK                   a .tgz path: on exit (also when stopped by a
#                          signal), everything under OUT is packed into it (the
#                          GPU machine hands back at most 8 files a call:
#                          OUT=/tmp/gc PACK=$OUT/gpu_check.tgz)
# Exit status: non-zero if the build, the tests or a sanitizer check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/out_and_pack.sh out
OUT=$out
export PYTHONUNBUFFERED=1
PY=python3
failed=()

step() { echo; echo "=== $* ($(date +%T))"; }

step "GPU"
nvidia-smi || echo "nvidia-smi failed"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

step "build"
if [ "${SKIP_BUILD:-0}" = "1" ]; then
  echo "skipped (SKIP_BUILD=1: the caller built and installed this tree)"
elif TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  grep -E "nanoblock: building" "$OUT/build.log" || true
  echo "build OK"
else
  tail -n 60 "$OUT/build.log"
  echo "BUILD FAILED (full log: $OUT/build.log)"
  exit 1
fi
if $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('nanoblock.info') is None)" 2>/dev/null; then
  $PY -m nanoblock.info
else
  cat nanoblock/_build_info.py
fi

# compute-sanitizer TOOL on the quick CUDA tests (no gradcheck: thousands of
# launches are slow under the sanitizer), caching allocator off: it hides
# out-of-bounds accesses inside its pools, and memory it hands out again looks
# initialized. The three tools run at once and beside pytest (each is bound by
# its own process's host work, the card has room, and nothing here is timed;
# the benchmarks run after all of them), each into its own log.
#   sanitize TOOL LOG PYTEST_K [compute-sanitizer flags]
sanitize() {
  local tool="$1" log="$2" k="$3"
  shift 3
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "${SANITIZER_TIMEOUT:-0}" \
      compute-sanitizer --tool "$tool" "$@" \
      $PY -m pytest -x -v -p no:cacheprovider tests/test_cuda.py -k "$k" >"$log" 2>&1
  echo $? >"$log.rc"  # 124 or 137: cut off by SANITIZER_TIMEOUT
}

sanitizers=()
if [ "${SKIP_SANITIZER:-0}" != "1" ]; then
  step "compute-sanitizer memcheck, racecheck, initcheck (in the background)"
  tools="${SANITIZERS:-memcheck racecheck initcheck}"
  wants() { [[ " $tools " == *" $1 "* ]]; }
  if wants memcheck; then
    sanitize memcheck "$OUT/memcheck.log" "${MEMCHECK_K:-small and not gradcheck}" --print-limit 20 &
    sanitizers+=($!)
  fi
  # racecheck (shared-memory hazards) on a test of every kernel's backward,
  # the float32 attention paths, each attention kernel with dropout, and the
  # wgmma kernels. The tests' reference attention runs on PyTorch's math
  # backend: cuDNN's Hopper kernels draw hazard reports of their own, which
  # used up the print limit in session 5 and hid whatever came after.
  if wants racecheck; then
    NANOBLOCK_SDPA_MATH=1 sanitize racecheck "$OUT/racecheck.log" \
        "${RACECHECK_K:-ops_backward_deterministic_small or attention_float32_vs_sdpa_small or dropout_masks_of_every_attention_kernel or dropout_attention_low_precision_small and 65-64 or attention_low_precision_small and wgmma-65-}" \
        --print-limit 200 &
    sanitizers+=($!)
  fi
  # initcheck: reads of memory nothing wrote. Every kernel is checked (with
  # --kernel-name the writes of unchecked kernels, torch.randn's say, go
  # unseen and every input read is reported: seen 2026-11-28). The tests'
  # reference attention runs on PyTorch's math backend (NANOBLOCK_SDPA_MATH,
  # tests/conftest.py): cuDNN's backward draws reports of its own.
  # initcheck_summary.py counts the reports per kernel and per test; only
  # nanoblock's fail (and reports it cannot place, and records the tool
  # dropped after one of ours). The bfloat16 Block tests are left out: their
  # kernels read what cuBLAS's bfloat16 GEMMs wrote, and initcheck does not
  # see those writes (the probe below shows it on PyTorch's own copy kernel;
  # H200, sessions 5 and 6). PyTorch's kernels in the T = 200 dropout tests'
  # reference draw thousands of reports for the same reason (its bmm).
  if wants initcheck; then
    NANOBLOCK_SDPA_MATH=1 sanitize initcheck "$OUT/initcheck.log" \
        "${INITCHECK_K:-small and not gradcheck and not nan_is_causal_in_the_block and not masks_differ}" \
        ${INITCHECK_FLAGS:---print-limit 0 --show-backtrace no} &
    sanitizers+=($!)
    { PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "${SANITIZER_TIMEOUT:-0}" \
          compute-sanitizer --tool initcheck --print-limit 100 \
          $PY scripts/initcheck_probe.py >"$OUT/initcheck_probe.log" 2>&1
      { $PY scripts/initcheck_summary.py "$OUT/initcheck_probe.log"
        echo "reports by the size of the memory copied (float32 result 4,718,592 bytes, bfloat16 2,359,296):"
        grep -o "of size [0-9,]* bytes" "$OUT/initcheck_probe.log" | sort | uniq -c
        grep -E "GEMM then copy done" "$OUT/initcheck_probe.log"; } >"$OUT/initcheck_probe.txt"; } &
    sanitizers+=($!)
  fi
fi

step "pytest ${PYTEST_TARGETS:-tests/}"
# The test of flat device memory reads the card's free memory, which the
# sanitizers' processes change: it runs after them.
flat_memory=tests/test_cuda.py::test_device_memory_stays_flat_over_1000_steps
deselect=()
[ ${#sanitizers[@]} -gt 0 ] && deselect=(--deselect "$flat_memory")
# shellcheck disable=SC2086
$PY -m pytest ${PYTEST_FLAGS:--x -q} ${deselect[@]+"${deselect[@]}"} ${PYTEST_TARGETS:-tests/} 2>&1 | tee "$OUT/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("pytest")

if [ ${#sanitizers[@]} -gt 0 ]; then
  step "waiting for the sanitizers"
  wait "${sanitizers[@]}"
  # A sanitizer cut off by its timeout can leave its pytest behind, which
  # would share the card with what comes next (the benchmarks).
  pkill -f -- "-p no:cacheprovider tests/test_cuda.py" 2>/dev/null
  for tool in $tools; do
    rc=$(cat "$OUT/$tool.log.rc" 2>/dev/null || echo "?")
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      # Cut off: say how far it got and whether it had reported anything.
      done_tests=$(grep -cE " (PASSED|FAILED|SKIPPED|ERROR) " "$OUT/$tool.log")
      errors=$(grep -cE "^========= (Invalid|Race|Uninitialized|Program hit|Error|Warning)" "$OUT/$tool.log")
      echo "-- $tool: cut off after ${SANITIZER_TIMEOUT}s, $done_tests tests done, $errors reports before it"
      [ "$errors" -eq 0 ] && failed+=("$tool (cut off after $done_tests tests, no report)") \
                           || failed+=("$tool ($errors reports)")
      continue
    fi
    echo "-- $tool: $(grep -E "passed|failed" "$OUT/$tool.log" | tail -n 1)"
    grep -E "(ERROR|RACECHECK) SUMMARY" "$OUT/$tool.log" | tail -n 2
    grep -qE "[0-9]+ passed" "$OUT/$tool.log" || failed+=("$tool (tests)")
    [ "$tool" = initcheck ] && continue
    tail -n 5 "$OUT/$tool.log" | grep -qE "SUMMARY: 0 (errors|hazards)" || failed+=("$tool")
  done
  if wants initcheck; then
    $PY scripts/initcheck_summary.py "$OUT/initcheck.log" | tee "$OUT/initcheck_summary.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("initcheck")
    echo "-- initcheck probe (cuBLAS GEMM, then a PyTorch copy of its output):"
    cat "$OUT/initcheck_probe.txt"
    # A full log can pass what the caller may fetch: keep its head and tail.
    if [ "$(stat -c %s "$OUT/initcheck.log")" -gt 8000000 ]; then
      { head -n 2000 "$OUT/initcheck.log"; echo "[... cut ...]"; tail -n 200 "$OUT/initcheck.log"; } \
          >"$OUT/initcheck.cut.log" && rm "$OUT/initcheck.log"
    fi
  fi
  step "pytest $flat_memory (after the sanitizers)"
  $PY -m pytest -q "$flat_memory" 2>&1 | tail -n 3 | tee -a "$OUT/pytest.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("pytest (flat memory)")
fi

if [ "${SKIP_LONG_RUN:-0}" != "1" ]; then
  # 5,000 steps of the demo GPT (its default size), nanoblock against the reference
  step "long run (python -m nanoblock.long_run, 5000 steps)"
  $PY -m nanoblock.long_run --steps 5000 --batch-size 64 --n-embd 96 --device cuda \
      --out "$OUT/long_run.json" 2>"$OUT/long_run_progress.log" | tee "$OUT/long_run.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("long run")
fi

if [ "${SKIP_BENCH:-0}" != "1" ]; then
  step "benchmark suite (python -m benchmarks.run_all --device cuda) -> $OUT/bench"
  $PY -m benchmarks.run_all --device cuda --out "$OUT/bench" || failed+=("benchmarks")
fi

if [ "${NCU:-0}" = "1" ]; then
  step "ncu counters per kernel (python scripts/ncu_block.py) -> $OUT/ncu_block.txt"
  $PY scripts/ncu_block.py >"$OUT/ncu_block.txt" 2>&1 || failed+=("ncu")
  tail -n 40 "$OUT/ncu_block.txt"
fi

step "summary"
if [ ${#failed[@]} -eq 0 ]; then
  echo "ALL OK"
else
  echo "FAILED: ${failed[*]}"
  exit 1
fi
