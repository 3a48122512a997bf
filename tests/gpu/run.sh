#!/usr/bin/env bash
# One GPU window, one call: `xtask doctor`, then reprpo's training-step bench against the PyTorch +
# PEFT anchor at the same shapes, then a Markdown table of both sides. See tests/gpu/README.md.
#
#   tests/gpu/run.sh BINARY[.gz] OUT_DIR          # CUDA: doctor --device cuda:0, 1B and 8B cases
#   tests/gpu/run.sh BINARY[.gz] OUT_DIR --cpu    # dry run on the CPU at tiny shapes (CI)
#
# BINARY: the xtask binary (built with --features cuda for the GPU run), or its gzip.
# The anchor: $REPRPO_ANCHOR, else tests/gpu/anchor/pytorch_anchor.py (tests/gpu/prepare.sh copies
# it there), else ../shared/anchors/pytorch_anchor.py next to the checkout.
# OUT_DIR gets five files: table.md, results.json (every raw JSON), doctor.json, logs.txt,
# raw.tar.gz (the per-command files). Exit status: 0 when the doctor passed and every command ran
# (PyTorch "not run: torch not installed" is fine in --cpu mode), 1 otherwise, 2 on bad usage.
# Every command has its own timeout; the sum stays under 8 minutes (GPU mode).
set -uo pipefail

usage() {
  echo "usage: tests/gpu/run.sh BINARY[.gz] OUT_DIR [--cpu]" >&2
  exit 2
}
die() {
  echo "run.sh: error: $*" >&2
  exit 2
}
[ $# -eq 2 ] || [ $# -eq 3 ] || usage
BIN_ARG=$1
OUT=$2
MODE=gpu
if [ $# -eq 3 ]; then
  [ "$3" = "--cpu" ] || usage
  MODE=cpu
fi
HERE=$(cd "$(dirname "$0")" && pwd)
START=$(date +%s)

command -v python3 >/dev/null || die "python3 is needed (stdlib only) to write the table"
[ -e "$BIN_ARG" ] || die "BINARY '$BIN_ARG': no such file (build xtask, then tests/gpu/prepare.sh; see tests/gpu/README.md)"
[ -f "$BIN_ARG" ] || die "BINARY '$BIN_ARG' is not a file"
mkdir -p "$OUT" || die "cannot create OUT_DIR '$OUT'"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/raw"

case "$BIN_ARG" in
  *.gz)
    gzip -dc "$BIN_ARG" > "$WORK/xtask" 2> "$WORK/gunzip.err" ||
      die "BINARY '$BIN_ARG': cannot gunzip: $(head -c 300 "$WORK/gunzip.err")"
    chmod +x "$WORK/xtask"
    BIN=$WORK/xtask
    ;;
  *) BIN=$(cd "$(dirname "$BIN_ARG")" && pwd)/$(basename "$BIN_ARG") ;;
esac

if [ "$MODE" = gpu ]; then
  # The binary links the CUDA libraries dynamically: the system toolkit's, else PyTorch's wheels'.
  extra=$(python3 - <<'PY' 2>/dev/null
import glob, os, sys
dirs = []
for p in sys.path:
    dirs += glob.glob(os.path.join(p, "nvidia", "*", "lib")) + glob.glob(os.path.join(p, "nvidia", "*", "*", "lib"))
print(":".join(d for d in dict.fromkeys(dirs) if os.path.isdir(d)))
PY
  )
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [ -d "$d" ] && extra="$d${extra:+:$extra}"
  done
  export LD_LIBRARY_PATH="/usr/local/cuda/lib64${extra:+:$extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "run.sh: LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
fi

if ! "$BIN" --help > /dev/null 2> "$WORK/help.err"; then
  missing=$(ldd "$BIN" 2>/dev/null | grep "not found" | tr -s ' \t' ' ' | head -5)
  die "BINARY '$BIN_ARG' does not run: $(head -c 400 "$WORK/help.err")${missing:+ (libraries not found:$missing)}"
fi

# ---- the cases --------------------------------------------------------------------------------
# block: preset pairs seq steps warmup anchor-timeout ours-timeout cases...
if [ "$MODE" = gpu ]; then
  DEVICE=cuda:0
  ANCHOR_DEVICE=cuda
  DOCTOR_TIMEOUT=35
  BLOCKS=(
    "1b 1b 4 512 8 3 75 35 dpo reprpo dpo_gc reprpo_gc"
    "8b 8b 2 512 8 3 90 50 dpo reprpo"
  )
else
  DEVICE=cpu
  ANCHOR_DEVICE=cpu
  DOCTOR_TIMEOUT=${DOCTOR_TIMEOUT:-300}
  BLOCKS=(
    "tiny tiny 2 64 2 1 300 120 dpo reprpo dpo_gc reprpo_gc"
    "tiny-1x32 tiny 1 32 2 1 300 120 dpo reprpo"
  )
fi

ANCHOR=${REPRPO_ANCHOR:-}
if [ -z "$ANCHOR" ]; then
  for a in "$HERE/anchor/pytorch_anchor.py" "$HERE/../../../shared/anchors/pytorch_anchor.py"; do
    if [ -f "$a" ]; then ANCHOR=$a; break; fi
  done
fi
TORCH_REASON=""
if ! python3 -c 'import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ("torch", "transformers", "peft")) else 1)' 2>/dev/null; then
  TORCH_REASON="torch not installed"
  python3 -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("torch") else 1)' 2>/dev/null &&
    TORCH_REASON="transformers or peft not installed"
elif [ -z "$ANCHOR" ] || [ ! -f "$ANCHOR" ]; then
  TORCH_REASON="anchor script not found (tests/gpu/prepare.sh, or REPRPO_ANCHOR)"
fi

LOG=$OUT/logs.txt
{
  echo "===== run.sh $MODE: $BIN_ARG -> $OUT ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  echo "anchor: ${ANCHOR:-none}${TORCH_REASON:+ (PyTorch side not run: $TORCH_REASON)}"
  if [ "$MODE" = gpu ]; then
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi 2>&1 | head -15
    ldd "$BIN" 2>&1 | grep -i 'cu\|nvrtc\|not found'
  fi
} > "$LOG"
# run NAME TIMEOUT CMD...: runs with a timeout, output appended to logs.txt under a header;
# writes raw/NAME.status = "rc seconds timeout".
run() {
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  {
    echo "===== $name (timeout ${limit}s): $*"
  } >> "$LOG"
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "$rc $(($(date +%s) - t0)) $limit" > "$WORK/raw/$name.status"
  echo "----- $name: exit $rc after $(($(date +%s) - t0)) s" >> "$LOG"
  echo "run.sh: $name: exit $rc after $(($(date +%s) - t0)) s" >&2
  return 0
}

# ---- doctor -----------------------------------------------------------------------------------
run doctor "$DOCTOR_TIMEOUT" "$BIN" doctor --device "$DEVICE" --json "$WORK/raw/doctor.json"

# ---- benchmarks -------------------------------------------------------------------------------
: > "$WORK/cases.tsv"
for spec in "${BLOCKS[@]}"; do
  read -r block preset pairs seq steps warmup t_anchor t_ours cases <<< "$spec"
  if [ -z "$TORCH_REASON" ]; then
    run "anchor-$block" "$t_anchor" env PYTHONUNBUFFERED=1 python3 "$ANCHOR" --preset "$preset" \
      --device "$ANCHOR_DEVICE" --pairs "$pairs" --seq "$seq" --steps "$steps" --warmup "$warmup" \
      --json "$WORK/raw/anchor-$block.json"
  fi
  for c in $cases; do
    loss=${c%_gc}
    gc=()
    [ "$c" != "$loss" ] && gc=(--grad-ckpt)
    run "ours-$block-$c" "$t_ours" "$BIN" bench train --device "$DEVICE" --shape "$preset" \
      --pairs "$pairs" --seq "$seq" --loss "$loss" "${gc[@]}" --steps "$steps" --warmup "$warmup" \
      --json "$WORK/raw/ours-$block-$c.json"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$block" "$c" "$preset" "$pairs" "$seq" "$steps" "$warmup" >> "$WORK/cases.tsv"
  done
done

# ---- table ------------------------------------------------------------------------------------
CARD=""
if [ "$MODE" = gpu ] && command -v nvidia-smi > /dev/null; then
  CARD=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
fi
BUILD_INFO=""
for f in "$(dirname "$BIN_ARG")/build-info.txt" "$HERE/anchor/build-info.txt"; do
  if [ -f "$f" ]; then BUILD_INFO=$f; break; fi
done
if [ -z "$BUILD_INFO" ] && git -C "$HERE" rev-parse HEAD > /dev/null 2>&1; then
  # No prepare.sh record: the checkout's commit (the binary may be older).
  BUILD_INFO=$WORK/build-info.txt
  {
    echo "commit=$(git -C "$HERE" rev-parse --short=12 HEAD) (checkout; no build-info.txt)"
    echo "dirty=$(git -C "$HERE" status --porcelain --untracked-files=no | wc -l | tr -d ' ')"
  } > "$BUILD_INFO"
fi
python3 "$HERE/table.py" --work "$WORK" --out "$OUT" --mode "$MODE" --device "$DEVICE" \
  --torch-reason "$TORCH_REASON" --card "$CARD" --build-info "$BUILD_INFO" \
  --binary "$BIN_ARG" --seconds "$(($(date +%s) - START))"
rc=$?
[ -f "$WORK/raw/doctor.json" ] && cp "$WORK/raw/doctor.json" "$OUT/doctor.json"
tar -czf "$OUT/raw.tar.gz" -C "$WORK" raw cases.tsv 2>/dev/null
cat "$OUT/table.md" 2>/dev/null
echo "run.sh: $(($(date +%s) - START)) s in all; results in $OUT (exit $rc)" >&2
exit "$rc"
