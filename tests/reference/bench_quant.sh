#!/usr/bin/env bash
# Quantised base and 8-bit AdamW (issue 19): memory / speed of one LoRA DPO and ReprPO step on this CPU, ours
# (`xtask bench train --quantize ... --optim ...`) against PyTorch + bitsandbytes + PEFT
# (tests/reference/bench_quant.py in the venv of requirements-quant.txt), THREADS threads each (default 2).
#
# Rows (the anchor's `small` Llama, PAIRS x SEQ = 2 x 128, median of 5 steps after 2 warm-ups, one process per
# side and configuration):
#   - {dpo, reprpo} x {none (f32 dense), nf4, nf4 + double quant, int8}, AdamW;
#   - dpo, nf4 + double quant, AdamW8bit (the AdamW row of the same base is the one above);
#   - PyTorch only, bitsandbytes' default path (modules left in eval mode by from_pretrained: on an
#     AVX-512-BF16 CPU Linear4bit repacks and runs gemv_4bit, which has no autograd; Linear8bitLt runs
#     LLM.int8's int8 matmul): {dpo, reprpo} x {nf4, int8}. See bench_quant.py's docstring.
#   - 8B: ours, Llama-3-8B shape, nf4 + double quant built tensor by tensor, 1 pair x 64 tokens, one ReprPO step,
#     --dtype bf16 and f32 (timeout T8B s each, `ulimit -v` VLIMIT_KIB); PyTorch's 8B (bench_quant.py
#     --tensorwise: a meta-device model whose projections are drawn and quantised one at a time, since
#     transformers cannot load an 8B checkpoint without first having one, 16 GB (bf16) or 32 GB (f32) on disk,
#     and `LlamaForCausalLM(cfg)` would materialise 32 GB of f32) only when MemAvailable > 14 GiB, under the
#     same ulimit and timeout.
#
#   bash tests/reference/bench_quant.sh                       # everything (about an hour on 2 cores)
#   PARTS="small 8b" bash tests/reference/bench_quant.sh      # PARTS: any of "small default 8b torch8b
#                                                             #   8bckpt torch8bckpt" (the last two: the 8B step
#                                                             #   with gradient checkpointing, not in the default)
#   OUT=dir bash ...                                          # the JSON lines and logs (default: target/bench-quant)
#
# Before each measurement the script waits until no rustc and no `cargo build|test|clippy|bench` has run for
# 30 s (as bench_methods.sh; WAIT_IDLE=0 turns that off; gives up after 40 minutes, saying so), records the
# load averages before and after, and measures again (3 tries in all; the 8B runs: 1) when one ran meanwhile.
# Prints markdown tables at the end (ratios: time theirs / ours, > 1 means we are faster; memory ours / theirs,
# < 1 means we use less).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-/work/venvs/bnb/bin/python}
THREADS=${THREADS:-2}
PARTS=${PARTS:-small default 8b torch8b}
PAIRS=${PAIRS:-2}; SEQ=${SEQ:-128}; STEPS=${STEPS:-5}; WARMUP=${WARMUP:-2}
T8B=${T8B:-1200}; VLIMIT_KIB=${VLIMIT_KIB:-23068672}  # 22 GiB of address space
WAIT_IDLE=${WAIT_IDLE:-1}
[ -x "$PY" ] || { echo "missing $PY: see tests/reference/requirements-quant.txt" >&2; exit 1; }
TMP=$(mktemp -d)
OUT=${OUT:-target/bench-quant}
mkdir -p "$OUT"
export RAYON_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# A watcher notes the last time a compiler or cargo was seen; wait_idle waits until that is 30 s ago.
busy() { pgrep -x rustc > /dev/null || pgrep -f "cargo (build|test|clippy|bench)" > /dev/null; }
date +%s > "$TMP/last_busy"
( while :; do busy && date +%s > "$TMP/last_busy.tmp" && mv "$TMP/last_busy.tmp" "$TMP/last_busy"; sleep 2; done ) &
WATCHER=$!
trap 'kill $WATCHER 2> /dev/null; rm -rf "$TMP"' EXIT

load() { echo "$1: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/load.txt"; }

wait_idle() {
  [ "$WAIT_IDLE" = 1 ] || return 0
  local start=$SECONDS
  while [ $(( $(date +%s) - $(cat "$TMP/last_busy") )) -lt 30 ]; do
    if [ $((SECONDS - start)) -gt 2400 ]; then
      echo "warning: the machine was not idle for 30 s within 40 minutes; measuring anyway" |
        tee -a "$OUT/load.txt" >&2
      return 0
    fi
    sleep 2
  done
}

# Build first, so that no measurement waits on (or competes with) a compiler.
cargo build --release -q -p xtask

# measure <label> <command...>: wait for quiet, run, and run again (TRIES times in all, default 3) when a
# compiler or cargo was seen while it ran.
measure() {
  local label=$1; shift
  local try t0
  for try in $(seq "${TRIES:-3}"); do
    wait_idle
    load "$label, before"
    t0=$(date +%s)
    "$@" || echo "$label failed (rc $?)" | tee -a "$OUT/load.txt" >&2
    load "$label, after"
    if [ "$WAIT_IDLE" = 1 ] && [ "$(cat "$TMP/last_busy")" -ge "$t0" ]; then
      echo "$label: a compiler / cargo ran during the measurement (try $try of ${TRIES:-3})" |
        tee -a "$OUT/load.txt" >&2
      continue
    fi
    return 0
  done
}
run_ours() { local name=$1; shift
  target/release/xtask bench train "$@" > "$OUT/rs_$name.json" 2> "$OUT/rs_$name.log"; }
run_theirs() { local name=$1; shift
  "$PY" tests/reference/bench_quant.py --threads "$THREADS" --json "$OUT/py_$name.json" "$@" > "$OUT/py_$name.log" 2>&1; }
ours() { measure "ours $1" run_ours "$@"; }
theirs() { measure "pytorch $1" run_theirs "$@"; }
# run_ours_8b NAME ARGS...: one 8B step, JSON in rs_8b_NAME.json.
run_ours_8b() { local name=$1; shift
  ( ulimit -v "$VLIMIT_KIB"; timeout "$T8B" target/release/xtask bench train --shape 8b --pairs 1 --seq 64 \
      --loss reprpo --quantize nf4 --double-quant --steps 1 --warmup 0 "$@" ) \
    > "$OUT/rs_8b_$name.json" 2> "$OUT/rs_8b_$name.log"; }
# run_theirs_8b NAME ARGS...: PyTorch's 8B step, JSON in py_8b_NAME.json (py_8b.json without NAME).
run_theirs_8b() { local f=py_8b${1:+_$1}; shift || true
  ( ulimit -v "$VLIMIT_KIB"; timeout "$T8B" "$PY" tests/reference/bench_quant.py --threads "$THREADS" \
      --preset 8b --pairs 1 --seq 64 --loss reprpo --quantize nf4 --double-quant --tensorwise --steps 1 \
      --warmup 0 --json "$OUT/$f.json" "$@" ) > "$OUT/$f.log" 2>&1; }

COMMON=(--pairs "$PAIRS" --seq "$SEQ" --steps "$STEPS" --warmup "$WARMUP")
if [[ " $PARTS " == *" small "* ]]; then
  for loss in dpo reprpo; do
    for q in none nf4 nf4dq int8; do
      case $q in
        none) qa=(--quantize none) ;;
        nf4) qa=(--quantize nf4) ;;
        nf4dq) qa=(--quantize nf4 --double-quant) ;;
        int8) qa=(--quantize int8) ;;
      esac
      ours "${loss}_${q}_adamw" --shape small --loss "$loss" "${COMMON[@]}" "${qa[@]}" --optim adamw
      theirs "${loss}_${q}_adamw" --preset small --loss "$loss" "${COMMON[@]}" "${qa[@]}" --optim adamw
    done
  done
  ours dpo_nf4dq_adamw_8bit --shape small --loss dpo "${COMMON[@]}" --quantize nf4 --double-quant --optim adamw_8bit
  theirs dpo_nf4dq_adamw_8bit --preset small --loss dpo "${COMMON[@]}" --quantize nf4 --double-quant \
    --optim adamw_8bit
fi

if [[ " $PARTS " == *" 8b "* ]]; then
  for dt in bf16 f32; do
    TRIES=1 measure "ours 8b $dt" run_ours_8b "$dt" --dtype "$dt"
  done
fi

# With gradient checkpointing (what PEFT's prepare_model_for_kbit_training switches on by default).
if [[ " $PARTS " == *" 8bckpt "* ]]; then
  TRIES=1 measure "ours 8b bf16 ckpt" run_ours_8b bf16_ckpt --dtype bf16 --grad-ckpt
  TRIES=1 measure "ours 8b bf16 ckpt adamw_8bit" run_ours_8b bf16_ckpt_8bit --dtype bf16 --grad-ckpt \
    --optim adamw_8bit
fi

if [[ " $PARTS " == *" default "* ]]; then
  for loss in dpo reprpo; do
    for q in nf4 int8; do
      theirs "${loss}_${q}_adamw_default" --preset small --loss "$loss" "${COMMON[@]}" --quantize "$q" \
        --optim adamw --bnb-mode default
    done
  done
fi

if [[ " $PARTS " == *" torch8b "* ]]; then
  avail=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo)
  if [ "$avail" -gt 14 ]; then
    TRIES=1 measure "pytorch 8b" run_theirs_8b ""
  else
    echo "pytorch 8b skipped: MemAvailable ${avail} GiB <= 14 GiB" | tee -a "$OUT/load.txt" >&2
  fi
fi
if [[ " $PARTS " == *" torch8bckpt "* ]]; then
  avail=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo)
  if [ "$avail" -gt 14 ]; then
    TRIES=1 measure "pytorch 8b ckpt" run_theirs_8b ckpt --grad-ckpt
  else
    echo "pytorch 8b ckpt skipped: MemAvailable ${avail} GiB <= 14 GiB" | tee -a "$OUT/load.txt" >&2
  fi
fi

"$PY" - "$OUT" <<'PY'
import glob, json, os, platform, sys
d = sys.argv[1]

def get(prefix, name):
    f = os.path.join(d, f"{prefix}_{name}.json")
    if not os.path.exists(f) or os.path.getsize(f) == 0:
        return None
    txt = open(f).read().strip()
    try:
        return json.loads(txt)
    except json.JSONDecodeError:  # ours prints one line (the last)
        return json.loads(txt.splitlines()[-1])

ms = lambda r: f"{r['step_s_median'] * 1000:.0f} ms" if r else "-"
mib = lambda r: f"{r['peak_rss_mib']:.0f} MiB" if r else "-"
kib = lambda r: f"{r['optimizer_state_bytes'] / 1024:.0f} KiB" if r else "-"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
anyp = next((get("py", n) for n in ("dpo_none_adamw", "dpo_nf4_adamw")), None)
if anyp:
    print(f"\n{cpu}, {anyp['threads']} threads; torch {anyp['torch']}, transformers {anyp['transformers']}, "
          f"PEFT {anyp['peft']}, bitsandbytes {anyp['bitsandbytes']}; small Llama, {anyp['pairs']} pairs x "
          f"{anyp['seq']} tokens, LoRA r 16, median of {anyp['steps']} steps")
print("| configuration | ours step | ours peak RSS | ours opt. state | PyTorch step | PyTorch peak RSS | "
      "PyTorch opt. state | time theirs/ours | memory ours/theirs |")
print("|---|---|---|---|---|---|---|---|---|")
names = [f"{l}_{q}_adamw" for l in ("dpo", "reprpo") for q in ("none", "nf4", "nf4dq", "int8")]
names.append("dpo_nf4dq_adamw_8bit")
label = {"none": "f32 dense", "nf4": "nf4", "nf4dq": "nf4 + double quant", "int8": "int8"}
for n in names:
    r, p = get("rs", n), get("py", n)
    if not r and not p:
        continue
    loss, q, *opt = n.split("_", 2)
    t = f"{p['step_s_median'] / r['step_s_median']:.2f}x" if r and p else "-"
    m = f"{r['peak_rss_mib'] / p['peak_rss_mib']:.2f}" if r and p else "-"
    print(f"| {loss}, {label[q]}, {opt[0]} | {ms(r)} | {mib(r)} | {kib(r)} | {ms(p)} | {mib(p)} | {kib(p)} | "
          f"{t} | {m} |")
rows = [(n, get("py", f"{n}_adamw_default")) for n in ("dpo_nf4", "dpo_int8", "reprpo_nf4", "reprpo_int8")]
if any(p for _, p in rows):
    print("\nPyTorch, bitsandbytes' default path (modules in eval mode as from_pretrained leaves them):")
    print("| configuration | PyTorch step | PyTorch peak RSS | path | vs ours (time theirs/ours) |")
    print("|---|---|---|---|---|")
    for n, p in rows:
        if p:
            r = get("rs", f"{n}_adamw")
            t = f"{p['step_s_median'] / r['step_s_median']:.2f}x" if r else "-"
            print(f"| {n.replace('_', ', ')} | {ms(p)} | {mib(p)} | {'; '.join(p['path'])} | {t} |")
print("\n8B (Llama-3-8B shape, nf4 + double quant, 1 pair x 64 tokens, one ReprPO step):")
print("| run | build | step | peak RSS after build | peak RSS |")
print("|---|---|---|---|---|")
for n, lab in (("rs_8b_bf16", "ours, bf16"), ("rs_8b_f32", "ours, f32"), ("py_8b", "PyTorch (tensorwise), f32"),
               ("rs_8b_bf16_ckpt", "ours, bf16, gradient checkpointing"),
               ("rs_8b_bf16_ckpt_8bit", "ours, bf16, gradient checkpointing, adamw_8bit"),
               ("py_8b_ckpt", "PyTorch (tensorwise), f32, gradient checkpointing")):
    r = get(*n.split("_", 1))
    if r:
        print(f"| {lab} | {r['model_build_s']:.0f} s | {r['step_s_median']:.1f} s | "
              f"{r['peak_rss_after_build_mib'] / 1024:.2f} GiB | {r['peak_rss_mib'] / 1024:.2f} GiB |")
    else:
        print(f"| {lab} | - | - | - | - (see the logs) |")
PY
echo "results in $OUT" >&2
echo "load averages (1, 5, 15 min):" >&2
cat "$OUT/load.txt" >&2
