#!/usr/bin/env bash
# Loss kernels side by side on this machine, in one run: forward + backward of every loss kernel,
# reprpo-losses' criterion bench (release; crates/reprpo-losses/benches/losses.rs) vs plain eager
# PyTorch (tests/reference/bench_losses.py, pinned in requirements-reprpo.txt), both with THREADS
# threads (default 2). Prints a markdown table of medians and ratios (PyTorch time / ours; > 1 means
# we are faster).
#
#   bash tests/reference/bench_losses.sh            # everything (about 40 minutes on 2 cores)
#   bash tests/reference/bench_losses.sh 3x2x64     # only ids containing the filter
set -euo pipefail
cd "$(dirname "$0")/../.."
VENVS=${VENVS:-/work/venvs}
THREADS=${THREADS:-2}
FILTER=${1:-}
[ -x "$VENVS/models/bin/python" ] || { python3 -m venv "$VENVS/models" && "$VENVS/models/bin/pip" install -q -r tests/reference/requirements-reprpo.txt; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export RAYON_NUM_THREADS=$THREADS
# Every kernel at both shapes in both dtypes (the bench alone skips the slow unfused bf16 chains
# at the realistic shape); about 40 minutes on 2 cores.
export REPRPO_BENCH_FULL=${REPRPO_BENCH_FULL:-1}
# Ours first, then PyTorch, in the same run of this script.
if [ -n "$FILTER" ]; then
  cargo bench -q -p reprpo-losses --bench losses -- "$FILTER" > "$TMP/rust.txt" 2>&1
else
  cargo bench -q -p reprpo-losses --bench losses > "$TMP/rust.txt" 2>&1
fi
"$VENVS/models/bin/python" tests/reference/bench_losses.py --threads "$THREADS" --filter "$FILTER" > "$TMP/torch.jsonl"
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
    # criterion stores each benchmark under a directory named from its id; find it by benchmark.json.
    for root, _, files in os.walk(crit):
        if root.endswith(os.sep + "new") and "benchmark.json" in files:
            b = json.load(open(os.path.join(root, "benchmark.json")))
            if b.get("full_id") == full_id:
                e = json.load(open(os.path.join(root, "estimates.json")))
                return e["median"]["point_estimate"] / 1e9
    return None

torch = {}
for line in open(torch_log):
    r = json.loads(line)
    torch[r["id"]] = r["median_s"]

def fmt(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"

print(f"| kernel | shape | dtype | PyTorch | reprpo | ratio (PyTorch / ours) |")
print("|---|---|---|---|---|---|")
for i in ids:
    kernel, rest = i.rsplit("/", 1)
    shape, dtype = rest.rsplit("_", 1)
    tkernel = re.sub(r"_(fused|unfused)$", "", kernel)
    p = torch.get(f"{tkernel}/{rest}")
    r = median_s(i)
    ratio = f"{p / r:.2f}x" if p and r else "-"
    print(f"| {kernel} | {shape} | {dtype} | {fmt(p)} | {fmt(r)} | {ratio} |")
PY
