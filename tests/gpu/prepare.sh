#!/usr/bin/env bash
# Packs what tests/gpu/run.sh needs on a GPU machine (python3 + torch there, no Rust, no network,
# no ../shared) into tests/gpu/anchor/ (git-ignored, carried to the machine):
#   xtask.gz            the binary, stripped and gzipped (the CUDA release build is ~50 MB, ~12 MB gzipped)
#   pytorch_anchor.py   ../shared/anchors/pytorch_anchor.py (or $REPRPO_ANCHOR_SRC)
#   build-info.txt      commit, uncommitted files, build time, features: the table's header
#
#   tests/gpu/prepare.sh [BINARY]    default: ${CARGO_TARGET_DIR:-target}/release/xtask
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${1:-${CARGO_TARGET_DIR:-$root/target}/release/xtask}
src=${REPRPO_ANCHOR_SRC:-$root/../shared/anchors/pytorch_anchor.py}
[ -f "$bin" ] || { echo "prepare.sh: no binary at $bin (cargo build --release -p xtask --features cuda)" >&2; exit 2; }
[ -f "$src" ] || { echo "prepare.sh: no anchor at $src (set REPRPO_ANCHOR_SRC)" >&2; exit 2; }
dst=$here/anchor
mkdir -p "$dst"
cp "$src" "$dst/pytorch_anchor.py"
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
if command -v strip > /dev/null; then strip -o "$tmp" "$bin"; else cp "$bin" "$tmp"; fi
gzip -9 -c "$tmp" > "$dst/xtask.gz"
features=cpu
if command -v readelf > /dev/null && readelf -d "$bin" 2>/dev/null | grep -q 'libcuda\|libcublas'; then
  features=cuda
fi
{
  echo "commit=$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  echo "dirty=$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null | wc -l | tr -d ' ')"
  echo "built=$(date -u -r "$bin" +%Y-%m-%dT%H:%MZ)"
  echo "features=$features"
} > "$dst/build-info.txt"
size=$(du -cm "$dst"/* | tail -1 | cut -f1)
echo "prepare.sh: $dst: $(ls "$dst" | tr '\n' ' ')(${size} MiB; the device tool carries 64 MiB at most)"
[ "$size" -lt 60 ] || { echo "prepare.sh: too large to carry" >&2; exit 1; }
