#!/usr/bin/env bash
# Builds the CPU extension with AddressSanitizer and UndefinedBehaviorSanitizer
# in a temporary copy of the repository (the normal build is left alone) and
# runs the CPU tests against it. Any report fails the run: ASan stops at the
# first error, UBSan too (-fno-sanitize-recover), and the exit status is
# non-zero.
#
#   bash scripts/sanitize_cpu.sh              # the CPU tests (see TESTS below)
#   bash scripts/sanitize_cpu.sh tests/test_ops.py -k attention
#
# Environment:
#   SANITIZE_DIR   build here (default: a fresh temporary folder, removed after)
#   MAX_JOBS       parallel compile jobs (default 2)
#
# Python itself is not built with ASan, so libasan is preloaded (it must come
# first), and leak detection is off: the interpreter keeps its objects alive
# at exit by design, which LeakSanitizer would report.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

# What runs: the CPU tests of the kernels, ops, Block, GPT, errors, properties
# and reliability, less what gives ASan nothing new at a high cost: float64
# gradcheck of the whole Block and GPT (thousands of forward passes of the
# kernels that the ops' own gradchecks already cover), torch.compile (it
# compiles and runs Inductor's C++, not nanoblock's), the 1000-step training
# runs (resident memory and a long run: ASan's quarantine holds freed memory
# by design) and DDP (two processes over gloo). The GPU tests skip here.
# Arguments replace this selection.
TESTS=(tests/test_ops.py tests/test_block.py tests/test_model.py tests/test_errors.py
       tests/test_properties.py tests/test_reliability.py tests/test_interop.py
       -k "not block_gradcheck and not gpt_gradcheck and not compile and not 1000_steps")
[ "$#" -gt 0 ] && TESTS=("$@")

WORK="${SANITIZE_DIR:-}"
if [ -z "$WORK" ]; then
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
# -a keeps timestamps, so a kept SANITIZE_DIR rebuilds only what changed
cp -a "$ROOT"/csrc "$ROOT"/nanoblock "$ROOT"/tests "$ROOT"/setup.py "$ROOT"/pyproject.toml \
      "$ROOT"/README.md "$WORK"/
rm -f "$WORK"/nanoblock/_C*.so

SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
echo "sanitize_cpu: building the CPU extension with $SAN in $WORK"
start=$SECONDS
(cd "$WORK" && NANOBLOCK_EXTRA_FLAGS="$SAN" NANOBLOCK_CPU_ONLY=1 MAX_JOBS="${MAX_JOBS:-2}" \
   python setup.py build_ext --inplace >"$WORK/build.log" 2>&1) || {
  tail -n 40 "$WORK/build.log"; echo "sanitize_cpu: BUILD FAILED"; exit 1; }
echo "sanitize_cpu: built in $((SECONDS - start)) s"
# (nm's output is read whole first: `nm | grep -q` fails under pipefail when
# grep stops early and nm gets SIGPIPE.)
symbols="$(nm -D "$WORK"/nanoblock/_C*.so)"
for check in __asan_report __ubsan_handle; do
  grep -q "$check" <<<"$symbols" || {
    echo "sanitize_cpu: the extension has no $check calls (flags ignored?)"; exit 1; }
done

export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
(cd "$WORK" && python -c "import nanoblock, sys; sys.exit(not nanoblock.__file__.startswith('$WORK'))") || {
  echo "sanitize_cpu: python imports a nanoblock other than the sanitized build"; exit 1; }
echo "sanitize_cpu: pytest ${TESTS[*]}"
start=$SECONDS
# --capture=sys: a sanitizer's report goes to file descriptor 2 as the
# process aborts, which pytest's default capture would swallow.
(cd "$WORK" && python -m pytest -q --capture=sys -p no:cacheprovider -x "${TESTS[@]}")
echo "sanitize_cpu: clean ($((SECONDS - start)) s of tests)"
