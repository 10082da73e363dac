# Sourced by the GPU-machine scripts after they cd to the repository root:
# out = $OUT, or the default given as $1, created. With PACK set (a .tgz
# path), everything under out is packed into it on exit, also when the
# device tool's time limit stops the script (TERM): the tool hands back at
# most 8 files a call.
out=${OUT:-$1}
mkdir -p "$out"
if [ -n "${PACK:-}" ]; then
  trap 'tar czf "$PACK" -C "$out" . 2>/dev/null' EXIT
  trap 'exit 143' TERM INT
fi
