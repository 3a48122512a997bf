#!/usr/bin/env bash
# Side by side on this machine, in one run: one preference-training step (reference forward,
# policy forward, loss, backward, AdamW) with LoRA r=16 on a random Llama, reprpo (release,
# `cargo xtask bench train-step`) vs PyTorch + PEFT (../shared/anchors/pytorch_anchor.py, pinned in
# requirements-models.txt), DPO and the anchor's ReprPO-style hidden-state loss. Prints a table.
# PyTorch's peak RSS is that of the whole anchor process (it runs every variant in one process).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENVS=${VENVS:-/work/venvs}
ANCHOR=${ANCHOR:-../shared/anchors/pytorch_anchor.py}
PRESET=${PRESET:-small}; PAIRS=${PAIRS:-2}; SEQ=${SEQ:-128}
[ -x "$VENVS/models/bin/python" ] || { python3 -m venv "$VENVS/models" && "$VENVS/models/bin/pip" install -q -r tests/reference/requirements-models.txt; }
cargo build --release -q -p xtask
tmp=$(mktemp -d)
/usr/bin/time -f "%M" -o "$tmp/py_rss" "$VENVS/models/bin/python" "$ANCHOR" --preset "$PRESET" --device cpu \
  --pairs "$PAIRS" --seq "$SEQ" --steps 5 --warmup 2 --json "$tmp/py.json" > "$tmp/py.log" 2>&1
for loss in dpo reprpo; do
  target/release/xtask bench train-step --preset "$PRESET" --pairs "$PAIRS" --seq "$SEQ" --loss "$loss" --steps 5 > "$tmp/rs_$loss.json"
done
python3 - "$tmp" <<'PY'
import json, sys, os
d = sys.argv[1]
py = json.load(open(os.path.join(d, "py.json")))
py_rss = int(open(os.path.join(d, "py_rss")).read().split()[-1]) / 1024
print(f"PyTorch {py.get('torch')}, transformers {py.get('transformers')}, PEFT {py.get('peft')}; "
      f"{py['preset']} shape, {py['pairs']} pairs x {py['seq']} tokens, f32, CPU")
print("| loss | PyTorch+PEFT step | reprpo step | speed ratio | PyTorch peak RSS (whole run) | reprpo peak RSS |")
print("|---|---|---|---|---|---|")
for loss in ("dpo", "reprpo"):
    r = json.load(open(os.path.join(d, f"rs_{loss}.json")))
    p = py[loss]
    print(f"| {loss} | {p['step_s_median']*1000:.0f} ms | {r['median_s']*1000:.0f} ms | "
          f"{p['step_s_median']/r['median_s']:.2f}x | {py_rss:.0f} MiB | {r['peak_rss_mib']:.0f} MiB |")
print(f"(PyTorch with gradient checkpointing: dpo {py['dpo_gc']['step_s_median']*1000:.0f} ms, "
      f"reprpo {py['reprpo_gc']['step_s_median']*1000:.0f} ms)")
PY
rm -rf "$tmp"
