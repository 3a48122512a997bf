#!/usr/bin/env bash
# The reference ReprPO project's methods (issue 17) side by side on this machine, in one run: ours against the
# reference's own PyTorch code (tests/reference/bench_methods.py, in the pinned venv of
# requirements-methods.txt: torch 2.7.0, the reference at bd9ae63), both with THREADS threads (default 2).
#
# - losses: forward + backward of the method losses mse / prefvec / rank (transform none), the metrics the
#   reference logs around them, and the transforms ether / hra under prefvec; ours from the criterion benches
#   crates/reprpo-losses/benches/methods.rs and crates/reprpo-models/benches/transforms.rs (release, medians
#   of the criterion samples), the reference's `Losses.<name>.value().c(...)` (medians of 30 / 7 steps, 5 for
#   the transforms at the realistic shape).
# - step: one training step (reference forwards, policy forwards, transform, loss, backward, AdamW) of the
#   presets hs-ether-prefvec, side-none-prefvec and projgrad on the anchor's `small` Llama with LoRA r 16 on the
#   seven projections, PAIRS x SEQ (2 x 128, as bench_train.sh): `xtask bench train --loss <preset>` against the
#   reference's PL_REPRPO_MODEL / PL_ProjGrad_MODEL `_loss_fn` + backward (+ projgrad's on_after_backward
#   rewrite of the LoRA gradients) + torch AdamW; median of STEPS (5) after 2 warm-ups, one process per side and
#   preset (peak RSS from /usr/bin/time).
#
# Prints markdown tables of medians and ratios (reference time / ours; > 1 means we are faster).
#
#   bash tests/reference/bench_methods.sh              # everything (about 30 minutes on 2 cores)
#   bash tests/reference/bench_methods.sh x2x64x       # only loss ids containing the filter (and the steps)
#   PARTS=step bash tests/reference/bench_methods.sh   # PARTS: any of "losses step" (default both)
#   REPRPO_BENCH_WRITTEN_OUT=1 bash ...               # also our written-out chain of candle ops
#                                                     # (`method_<loss>_written_out` rows)
#
# Before each measurement the script waits until no rustc and no `cargo build|test|clippy` has run for 30 s
# (WAIT_IDLE=0 turns that off; it gives up after 40 minutes and measures anyway, saying so).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-/work/venvs/reprpo-ref/bin/python}
THREADS=${THREADS:-2}
PARTS=${PARTS:-losses step}
PRESET=${PRESET:-small}; PAIRS=${PAIRS:-2}; SEQ=${SEQ:-128}; STEPS=${STEPS:-5}
WAIT_IDLE=${WAIT_IDLE:-1}
FILTER=${1:-}
[ -x "$PY" ] || { echo "missing $PY: see tests/reference/requirements-methods.txt" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export RAYON_NUM_THREADS=$THREADS

# Load averages before and after each measurement, printed at the end (stderr).
load() { echo "$1: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$TMP/load.txt"; }

wait_idle() {
  [ "$WAIT_IDLE" = 1 ] || return 0
  local quiet=0 start=$SECONDS
  while [ "$quiet" -lt 30 ]; do
    if pgrep -x rustc > /dev/null || pgrep -f "cargo (build|test|clippy)" > /dev/null; then
      quiet=0
    else
      quiet=$((quiet + 2))
    fi
    if [ $((SECONDS - start)) -gt 2400 ]; then
      echo "warning: the machine was not idle for 30 s within 40 minutes; measuring anyway" |
        tee -a "$TMP/load.txt" >&2
      return 0
    fi
    sleep 2
  done
}

# Build everything first, so that no measurement waits on (or competes with) a compiler.
cargo build --release -q -p xtask
if [[ " $PARTS " == *" losses "* ]]; then
  cargo bench -q -p reprpo-losses --bench methods --no-run
  cargo bench -q -p reprpo-models --bench transforms --no-run
  for spec in "reprpo-losses methods" "reprpo-models transforms"; do
    set -- $spec
    wait_idle
    load "criterion $2, before"
    if [ -n "$FILTER" ]; then
      cargo bench -q -p "$1" --bench "$2" -- "$FILTER" > "$TMP/rust_$2.txt" 2>&1
    else
      cargo bench -q -p "$1" --bench "$2" > "$TMP/rust_$2.txt" 2>&1
    fi
    load "criterion $2, after"
  done
  cat "$TMP"/rust_*.txt > "$TMP/rust.txt"
  wait_idle
  load "reference losses, before"
  "$PY" tests/reference/bench_methods.py losses --threads "$THREADS" --filter "$FILTER" > "$TMP/torch.jsonl"
  load "reference losses, after"
  python3 - "$TMP/rust.txt" "$TMP/torch.jsonl" "$(git rev-parse --show-toplevel)/target/criterion" <<'PY'
import json, os, re, sys
rust_log, torch_log, crit = sys.argv[1:]
# The ids this run measured: criterion prints "<id>  time: [lo est hi]" (the id may sit on its own line).
ids, prev = [], None
for line in open(rust_log):
    m = re.match(r"^(\S+)\s+time:\s+\[", line)
    if m:
        ids.append(m.group(1))
    elif re.match(r"^\s+time:\s+\[", line) and prev:
        ids.append(prev)
    s = line.strip()
    prev = s if s and " " not in s else prev

def median_s(full_id):
    for root, _, files in os.walk(crit):
        if root.endswith(os.sep + "new") and "benchmark.json" in files:
            b = json.load(open(os.path.join(root, "benchmark.json")))
            if b.get("full_id") == full_id:
                e = json.load(open(os.path.join(root, "estimates.json")))
                return e["median"]["point_estimate"] / 1e9
    return None

torch = {json.loads(l)["id"]: json.loads(l)["median_s"] for l in open(torch_log) if l.strip()}

def fmt(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"

print("| kernel | shape | dtype | reference (PyTorch) | reprpo | ratio (reference / ours) |")
print("|---|---|---|---|---|---|")
for i in ids:
    kernel, rest = i.rsplit("/", 1)
    shape, dtype = rest.rsplit("_", 1)
    p, r = torch.get(i.replace("_written_out/", "/")), median_s(i)
    ratio = f"{p / r:.2f}x" if p and r else "-"
    print(f"| {kernel} | {shape} | {dtype} | {fmt(p)} | {fmt(r)} | {ratio} |")
PY
fi

if [[ " $PARTS " == *" step "* ]]; then
  for loss in hs-ether-prefvec side-none-prefvec projgrad; do
    wait_idle
    load "reprpo step $loss, before"
    /usr/bin/time -f "%M" -o "$TMP/rs_rss_$loss" target/release/xtask bench train --shape "$PRESET" \
      --pairs "$PAIRS" --seq "$SEQ" --loss "$loss" --steps "$STEPS" --warmup 2 > "$TMP/rs_$loss.json" 2> "$TMP/rs_$loss.log"
    load "reprpo step $loss, after"
    wait_idle
    load "reference step $loss, before"
    /usr/bin/time -f "%M" -o "$TMP/py_rss_$loss" "$PY" tests/reference/bench_methods.py step --threads "$THREADS" \
      --loss "$loss" --preset "$PRESET" --pairs "$PAIRS" --seq "$SEQ" --steps "$STEPS" --warmup 2 \
      --json "$TMP/py_$loss.json" > "$TMP/py_$loss.log" 2>&1
    load "reference step $loss, after"
  done
  python3 - "$TMP" <<'PY'
import json, os, sys
d = sys.argv[1]
rss = lambda f: int(open(os.path.join(d, f)).read().split()[-1]) / 1024
first = None
rows = []
for loss in ("hs-ether-prefvec", "side-none-prefvec", "projgrad"):
    p = json.load(open(os.path.join(d, f"py_{loss}.json")))
    r = json.loads(open(os.path.join(d, f"rs_{loss}.json")).read().strip().splitlines()[-1])
    first = first or p
    rows.append(f"| {loss} | {p['keys']} | {p['step_s_median'] * 1000:.0f} ms | {r['step_s_median'] * 1000:.0f} ms | "
                f"{p['step_s_median'] / r['step_s_median']:.2f}x | {rss(f'py_rss_{loss}'):.0f} MiB | "
                f"{rss(f'rs_rss_{loss}'):.0f} MiB |")
print(f"\nreference @ {first['reference'][:7]}, torch {first['torch']}, transformers {first['transformers']}, "
      f"PEFT {first['peft']}; {first['preset']} Llama, {first['pairs']} pairs x {first['seq']} tokens, f32, CPU, "
      f"{first['threads']} threads")
print("| preset | keys | reference step | reprpo step | ratio (reference / ours) | reference peak RSS | reprpo peak RSS |")
print("|---|---|---|---|---|---|---|")
print("\n".join(rows))
PY
fi
echo "load averages (1, 5, 15 min):" >&2
cat "$TMP/load.txt" >&2
