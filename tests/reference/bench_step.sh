#!/usr/bin/env bash
# Side by side on this machine, in one run: forward + backward (LoRA gradients) of a random Llama,
# reprpo (release) vs PyTorch + PEFT (pinned in requirements-models.txt). Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENVS=${VENVS:-/work/venvs}
[ -x "$VENVS/models/bin/python" ] || { python3 -m venv "$VENVS/models" && "$VENVS/models/bin/pip" install -q -r tests/reference/requirements-models.txt; }
cargo build --release -q -p xtask
echo "| shape | batch x seq | PyTorch+PEFT step | reprpo step | speed ratio | PyTorch peak RSS | reprpo peak RSS |"
echo "|---|---|---|---|---|---|---|"
for cfg in "tiny 4 64" "tiny 8 128" "small 4 128"; do
  set -- $cfg
  r=$(target/release/xtask bench step --preset "$1" --batch "$2" --seq "$3" --steps 10)
  p=$("$VENVS/models/bin/python" tests/reference/bench_step.py --preset "$1" --batch "$2" --seq "$3" --steps 10 2>/dev/null | tail -1)
  python3 - "$r" "$p" <<'PY'
import json, sys
r, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"| {r['preset']} | {r['batch']} x {r['seq']} | {p['median_s']*1000:.1f} ms | {r['median_s']*1000:.1f} ms | {p['median_s']/r['median_s']:.2f}x | {p['peak_rss_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB |")
PY
done
