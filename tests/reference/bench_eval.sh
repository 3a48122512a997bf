#!/usr/bin/env bash
# TruthfulQA MC1 scoring on CPU, ours (the three scorer modes) against a Python transformers scorer, in the same
# run on the same model; prints items/s and the max abs difference of the per-choice log-probabilities.
# Usage: tests/reference/bench_eval.sh [ITEMS] [ROUNDS]   (needs ../shared/data and /work/venvs/models; see
# bench_eval.py). The timings run ROUNDS times (default 5), the sides interleaved so that a slow spell of a shared
# machine hits all of them; the median items/s of each side is printed at the end. FORMAT=qa-primer puts
# TruthfulQA's six-shot primer (~620 tokens) before every question, on both sides.
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${1:-100}"
ROUNDS="${2:-5}"
FORMAT="${FORMAT:-plain}"
PYFMT=(); [ "$FORMAT" = qa-primer ] && PYFMT=(--qa-primer)
PY="${PYTHON:-/work/venvs/models/bin/python}"
DIR="${BENCH_DIR:-target/bench-eval}"
mkdir -p "$DIR/model"
"$PY" tests/reference/bench_eval.py --model-dir "$DIR/model" --make-model
cargo build --release -p reprpo-eval --example bench_mc
BIN=target/release/examples/bench_mc
# bench_mc uses mimalloc like the xtask binary; this is the purge delay xtask sets at start-up.
export MIMALLOC_PURGE_DELAY=-1
LOG="$DIR/timings.jsonl"
: > "$LOG"
for _ in $(seq "$ROUNDS"); do
  for mode in full prefix-cache auto; do
    "$BIN" "$DIR/model" "$N" "$mode" "$DIR/rust-$mode.json" "$FORMAT" | tee -a "$LOG"
  done
  "$PY" tests/reference/bench_eval.py --model-dir "$DIR/model" --items "$N" "${PYFMT[@]}" --time-only 2>/dev/null | tee -a "$LOG"
done
"$PY" - "$LOG" <<'PYEOF'
import json, statistics, sys
by = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    by.setdefault(r.get("mode", r.get("side")), []).append(r["items_per_s"])
py = statistics.median(by.pop("python-transformers"))
print(json.dumps({"python-transformers median items/s": round(py, 2)}))
for k, v in by.items():
    m = statistics.median(v)
    print(json.dumps({"mode": k, "median items/s": round(m, 2), "ratio vs python": round(m / py, 3), "runs": [round(x, 1) for x in v]}))
PYEOF
"$PY" tests/reference/bench_eval.py --model-dir "$DIR/model" --items "$N" "${PYFMT[@]}" \
  --rust-json "$DIR/rust-full.json" "$DIR/rust-prefix-cache.json" "$DIR/rust-auto.json"
