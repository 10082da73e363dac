#!/usr/bin/env bash
# Compiles one CUDA file of csrc/cuda for one architecture on a machine
# without a GPU (CPU torch: its headers lack c10/cuda/impl/cuda_cmake_macros.h,
# so an empty one is made) and prints ptxas's registers and spills per kernel.
# A compile check, not a run: CUDA code is done only once it ran on the GPU.
#   bash scripts/ptx_check.sh csrc/cuda/attention_mma.cu [sm_90a|sm_80] [extra nvcc flags]
#   SASS=1 ...   also writes the cubin's SASS to /tmp/ptx_check/<file>.<arch>.sass
set -euo pipefail
cd "$(dirname "$0")/.."
file=$1; arch=${2:-sm_90a}; shift $(( $# < 2 ? $# : 2 ))
work=/tmp/ptx_check
mkdir -p "$work/inc/c10/cuda/impl"
: > "$work/inc/c10/cuda/impl/cuda_cmake_macros.h"
inc=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
name=$(basename "$file" .cu).$arch
nvcc -std=c++17 -O3 --expt-relaxed-constexpr -arch="$arch" -cubin -o "$work/$name.cubin" \
  -I"$work/inc" $inc -Icsrc -DNANOBLOCK_WITH_CUDA -DNANOBLOCK_SM90A -Xptxas -v "$@" "$file" 2> "$work/$name.ptxas"
python3 - "$work/$name.ptxas" <<'PY'
import re, sys, subprocess
kernel = None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\w+)'", line)
    if m:
        kernel = subprocess.run(["c++filt"], input=m.group(1), capture_output=True, text=True).stdout.strip()
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m: spill = f"spill {m.group(1)}/{m.group(2)} B"
    m = re.search(r"Used (\d+) registers", line)
    if m and kernel:
        print(f"{int(m.group(1)):4d} regs  {spill:18s} {kernel[:150]}")
PY
# SASS: cuobjdump, the CUDA install's or pip's nvidia-cuda-cuobjdump (this
# machine's CUDA 13.0 lacks it: pip install nvidia-cuda-cuobjdump). Looked
# for only when asked: without SASS a machine needs neither.
if [ -n "${SASS:-}" ]; then
  cuobjdump=$(command -v cuobjdump || python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13/bin/cuobjdump'))")
  "$cuobjdump" -sass "$work/$name.cubin" > "$work/$name.sass"
  echo "SASS: $work/$name.sass"
fi
