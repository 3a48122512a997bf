#!/usr/bin/env bash
# TruthfulQA MC1 scoring on CPU, ours (both scorer paths) against a Python transformers scorer, in the same run
# on the same model; prints items/s and the max abs difference of the per-choice log-probabilities.
# Usage: tests/reference/bench_eval.sh [ITEMS]   (needs ../shared/data and /work/venvs/models; see bench_eval.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${1:-100}"
PY="${PYTHON:-/work/venvs/models/bin/python}"
DIR="${BENCH_DIR:-target/bench-eval}"
mkdir -p "$DIR/model"
"$PY" tests/reference/bench_eval.py --model-dir "$DIR/model" --make-model
cargo build --release -p reprpo-eval --example bench_mc
BIN=target/release/examples/bench_mc
for mode in full prefix-cache; do
  "$BIN" "$DIR/model" "$N" "$mode" "$DIR/rust-$mode.json"
done
"$PY" tests/reference/bench_eval.py --model-dir "$DIR/model" --items "$N" \
  --rust-json "$DIR/rust-full.json" "$DIR/rust-prefix-cache.json"
