#!/usr/bin/env bash
# Kill-and-resume soak (issue 15): N trials over a short default run, each interrupted at a random
# point, then resumed with `train --resume` until it finishes; the final adapter and metrics.jsonl
# of every trial must be byte-identical to those of the uninterrupted run.
#
# Interruptions, drawn in turn from a seeded generator:
#   KILL, INT, TERM  the signal sent 0-300 ms after a random step is logged (step 0: as soon as
#                    the run folder exists, i.e. in the SFT stage; the last step: in the final
#                    evaluation); INT and TERM: checkpoint then exit 130; KILL: nothing saved;
#   CRASH            REPRPO_CRASH_AT=STEP:PHASE, an abort inside the checkpoint write of STEP
#                    after PHASE (adapter, optimizer, state, metrics, manifest, rename).
#
# Usage: tests/soak/kill_resume.sh XTASK_BINARY [N=3] [SEED=1] [RESULTS.tsv]
# Run from anywhere; REPRPO_ROOT is set to this checkout. Exit status 0 when every trial is
# identical, 1 otherwise. The per-trial table goes to RESULTS.tsv (default: the work folder).
set -euo pipefail

bin=$(realpath "${1:?usage: kill_resume.sh XTASK_BINARY [N] [SEED] [RESULTS.tsv]}")
n=${2:-3}
seed=${3:-1}
here=$(cd "$(dirname "$0")/../.." && pwd)
export REPRPO_ROOT=$here
work=$(mktemp -d "${TMPDIR:-/tmp}/kill_resume.XXXXXX")
results=${4:-$work/results.tsv}
trap 'rm -rf "$work"' EXIT

# The run: the embedded default, shortened; a checkpoint every 2 steps, an evaluation every 4,
# an SFT stage of 10 steps (each trial has its own out_dir, so its own SFT cache); no process
# memory in the log (it differs run to run), so that logs compare byte for byte.
args=(train --no-progress run.plots=false train.max_steps=12 run.save_steps=2
      train.logging_steps=1 train.eval_every=4 train.n_eval_examples=16 sft.steps=10
      data.ood_datasets=[] run.log_memory=false)
steps=12
phases=(adapter optimizer state metrics manifest rename)
RANDOM=$seed

now_ms() { date +%s%3N; }
run_dir_of() { find "$1" -mindepth 1 -maxdepth 1 -type d -name 'reprpo-*' | head -n 1; }
last_step() {
  local s
  s=$(tail -n 1 "$1/metrics.jsonl" 2>/dev/null | grep -o '"step":[0-9]*' | cut -d: -f2)
  echo "${s:-0}"
}

t0=$(now_ms)
"$bin" "${args[@]}" "run.out_dir=$work/ref" >"$work/ref.log" 2>&1
ref_ms=$(($(now_ms) - t0))
ref=$(run_dir_of "$work/ref")
echo "reference run: ${ref_ms} ms ($ref)"

printf 'trial\tkind\tpoint\tfirst_status\tnewest_checkpoint\tresumes\tadapter\tmetrics\n' >"$results"
failed=0
for ((i = 1; i <= n; i++)); do
  out=$work/t$i
  mkdir -p "$out"
  kinds=(KILL INT TERM CRASH)
  kind=${kinds[$((RANDOM % 4))]}
  status=0
  if [[ $kind == CRASH ]]; then
    step=$((2 * (1 + RANDOM % (steps / 2))))
    phase=${phases[$((RANDOM % ${#phases[@]}))]}
    point="$step:$phase"
    REPRPO_CRASH_AT=$point "$bin" "${args[@]}" "run.out_dir=$out" >"$out/first.log" 2>&1 ||
      status=$?
  else
    # Wait for a random logged step (0: the run folder only, i.e. during the SFT stage or
    # before the first step; 12: the last step, i.e. during the final evaluation), then a
    # random 0-300 ms.
    "$bin" "${args[@]}" "run.out_dir=$out" >"$out/first.log" 2>&1 &
    pid=$!
    at=$((RANDOM % (steps + 1)))
    until [[ -n $(run_dir_of "$out") ]] && (( $(last_step "$(run_dir_of "$out")") >= at )); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.05
    done
    delay_ms=$((RANDOM % 300))
    point="step${at}+${delay_ms}ms"
    sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
    kill "-$kind" "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || status=$?
  fi
  run=$(run_dir_of "$out")
  from=none
  if [[ -n $run && -d $run/checkpoints ]]; then
    from=$(find "$run/checkpoints" -mindepth 1 -maxdepth 1 -name 'step-*' | sort | tail -n 1)
    from=${from##*/step-}
    from=${from:-none}
  fi
  resumes=0
  while [[ ! -f ${run:-/nonexistent}/summary.json ]]; do
    resumes=$((resumes + 1))
    if ((resumes > 3)); then break; fi
    if [[ -z $run ]]; then
      # Killed before its run folder existed: start it again.
      "$bin" "${args[@]}" "run.out_dir=$out" >>"$out/resume.log" 2>&1 || true
    else
      "$bin" train --no-progress --resume "$run" >>"$out/resume.log" 2>&1 || true
    fi
    run=$(run_dir_of "$out")
  done
  same() { cmp -s "$ref/$1" "${run:-/nonexistent}/$1" && echo identical || echo DIFFERENT; }
  a=$(same adapter/adapter_model.safetensors)
  m=$(same metrics.jsonl)
  printf '%d\t%s\t%s\t%d\t%s\t%d\t%s\t%s\n' "$i" "$kind" "$point" "$status" "$from" "$resumes" \
    "$a" "$m" |
    tee -a "$results"
  if [[ $a != identical || $m != identical ]]; then
    failed=1
    echo "--- trial $i: first run" && tail -n 20 "$out/first.log"
    [[ -f $out/resume.log ]] && echo "--- resumes" && tail -n 40 "$out/resume.log"
  fi
done
echo "$n trials, $( ((failed)) && echo 'SOME DIFFERENT' || echo 'all identical')"
exit $failed
