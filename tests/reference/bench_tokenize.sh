#!/usr/bin/env bash
# Side by side on this machine, in one run: tokenising + collating the 2,312 HH harmless test pairs
# with reprpo (release build) and with TRL's own DPO dataset processing, same pairs, same tokenizer.
# Usage: bash tests/reference/bench_tokenize.sh   (creates the two pinned venvs under $VENVS if missing)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENVS=${VENVS:-/work/venvs}
HH=../shared/data/hh_rlhf/harmless-base-test.jsonl.gz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -x "$VENVS/trl09/bin/python" ] || { python3 -m venv "$VENVS/trl09" && "$VENVS/trl09/bin/pip" install -q -r tests/reference/requirements-trl09.txt; }
[ -x "$VENVS/cur/bin/python" ] || { python3 -m venv "$VENVS/cur" && "$VENVS/cur/bin/pip" install -q -r tests/reference/requirements-trl-current.txt; }
cargo build --release -q -p xtask
X=target/release/xtask
$X data prepare --input "$HH" --converter hh-rlhf --out "$work/hh.jsonl" >&2
"$VENVS/cur/bin/python" tests/reference/bench_tokenize.py train-tokenizer "$work/hh.jsonl" "$work/tok"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for mode in classic current; do
  if [ $mode = classic ]; then py="$VENVS/trl09/bin/python"; over=""; else py="$VENVS/cur/bin/python"; over="tokenization=trl-current max_length=1024 truncation_mode=keep_start"; fi
  rust=$($X bench tokenize --input "$work/hh.jsonl" --tokenizer "$work/tok" --repeat 5 $over)
  trl=$("$py" tests/reference/bench_tokenize.py $mode "$work/hh.jsonl" "$work/tok" 2>/dev/null | tail -1)
  echo "$mode rust: $rust"
  echo "$mode trl:  $trl"
  python3 - "$mode" "$rust" "$trl" <<'PY'
import json, sys
mode, r, t = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
same = "identical" if r["checksum"] == t["checksum"] else "DIFFERENT"
print(f"| {mode} | {r['pairs']} | {t['seconds']*1000:.0f} ms | {r['seconds']*1000:.1f} ms | {t['seconds']/r['seconds']:.1f}x | {same} |")
PY
done
