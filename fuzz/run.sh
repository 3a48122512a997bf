#!/usr/bin/env bash
# Run fuzz targets for a bounded time each, two at a time, seeded from the committed inputs.
#
#   fuzz/run.sh SECONDS [TARGET...]     (default: every target of crates/reprpo-fuzz/regressions)
#   FUZZ_SKIP_BUILD=1 runs the binaries already built; FUZZ_JOBS=N runs N targets at a time.
#
# Needs nightly and cargo-fuzz (`cargo install cargo-fuzz`). New corpus entries go to
# fuzz/corpus/<target>/, crashers to fuzz/artifacts/<target>/, logs to fuzz/artifacts/<target>.log
# (all ignored by git). libFuzzer's last line per target ("Done N runs in S second(s)") is the
# execution count recorded in docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
regressions=../crates/reprpo-fuzz/regressions
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(ls "$regressions")
fi
# Built once: release, debug assertions (overflow checks) on, no sanitizer (safe Rust; ASan
# would only slow the runs).
[ -n "${FUZZ_SKIP_BUILD:-}" ] || cargo +nightly fuzz build -O -a -s none
jobs=${FUZZ_JOBS:-2}
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
    (
        # The binary cargo fuzz built (`cargo fuzz run` would rebuild first, every time).
        "target/x86_64-unknown-linux-gnu/release/$t" "corpus/$t" "$regressions/$t" \
            -artifact_prefix="artifacts/$t/" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
            -print_final_stats=1 >"artifacts/$t.log" 2>&1 || true
        echo "$t: $(grep -E '^Done [0-9]+ runs' "artifacts/$t.log" || echo 'stopped early (see log)')"
    ) &
done
wait
