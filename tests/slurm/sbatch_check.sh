#!/usr/bin/env bash
# sbatch_check.sh: does the sbatch array script of `xtask sweep slurm` run under a real Slurm?
#
# What it checks, on a throw-away single-node Slurm cluster started inside this machine
# (Debian's slurm-wlm 22.05; no systemd needed):
#   1. install: slurmctld, slurmd, slurm-client and munge are installed (apt-get) when missing;
#      that needs root and apt (exit 2 otherwise: "cannot check here");
#   2. daemons: a private munged (own key and socket), slurmctld and slurmd run from a
#      slurm.conf written into a temp folder (SLURM_CONF), until `sinfo` shows the node idle;
#   3. array job: the tiny 2 configurations x 2 seeds sweep of xtask/tests/all/sweep.rs
#      (`a_small_sweep_runs_as_array_tasks_resumes_and_reports`) is planned, `sweep slurm`
#      writes sweep.sbatch, `sbatch` runs it; every run's status.json says ok and every
#      array task left its log; submitting the same script again skips every run and changes
#      no status.json (resubmitting is safe);
#   4. report: `sweep report DIR` writes report.md/.csv/.json and the plots.
# It prints the seconds of each phase, stops every daemon it started on exit (also on failure or
# Ctrl-C) and removes its temp folder (kept when KEEP=1 or on failure, for the logs).
#
# Run (as root, from the repository root):
#   bash tests/slurm/sbatch_check.sh target/debug/xtask
# Exit: 0 all passed, 1 a check failed, 2 cannot run here (not root, no apt, no Slurm).
# Environment: JOB_TIMEOUT (seconds for each array job, default 200), KEEP=1.

set -euo pipefail

XTASK_ARG=${1:-target/debug/xtask}
JOB_TIMEOUT=${JOB_TIMEOUT:-200}
START_TIMEOUT=60

say() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
skip() { printf 'SKIP: %s\n' "$*" >&2; exit 2; }
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
TIMES=()
phase_done() { TIMES+=("$(printf '%-14s %7s s' "$1" "$(secs "$2" "$(now)")")"); }

[[ -x $XTASK_ARG ]] || fail "no xtask binary at $XTASK_ARG (build it: cargo build -p xtask)"
# Absolute, since the phases below work in other folders.
XTASK_ARG=$(realpath "$XTASK_ARG")
command -v python3 >/dev/null || skip "python3 is needed (free ports, JSON checks)"

# ---------------------------------------------------------------------------------------- 1
t0=$(now)
if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null \
    || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    [[ $(id -u) == 0 ]] || skip "Slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null || skip "Slurm is not installed and there is no apt-get"
    say "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge; } >/tmp/sbatch_check-apt.log 2>&1 \
        || { tail -20 /tmp/sbatch_check-apt.log; skip "apt-get failed (log: /tmp/sbatch_check-apt.log)"; }
fi
[[ $(id -u) == 0 ]] || skip "slurmd must run as root to start job steps; run this as root"
phase_done install "$t0"

# ---------------------------------------------------------------------------------------- 2
t0=$(now)
T=$(mktemp -d /tmp/sbatch_check.XXXXXX)
chmod 700 "$T"
mkdir -p "$T"/{munge,state,spool,log,run}
PIDS=()      # the daemons this script started, stopped in reverse order on exit
OK=0

cleanup() {
    local rc=$?
    set +e
    if [[ -n ${SLURM_CONF:-} ]] && ((${#PIDS[@]} > 1)); then
        scancel --quiet --user=root 2>/dev/null   # only our own cluster: SLURM_CONF is ours
        for _ in $(seq 20); do
            [[ -z $(squeue -h 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[i]}" 2>/dev/null
    done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        for _ in $(seq 40); do
            kill -0 "${PIDS[i]}" 2>/dev/null || break
            sleep 0.25
        done
        if kill -0 "${PIDS[i]}" 2>/dev/null; then
            echo "daemon ${PIDS[i]} did not stop; killing it" >&2
            kill -9 "${PIDS[i]}" 2>/dev/null
        fi
        wait "${PIDS[i]}" 2>/dev/null
    done
    if ((OK)) && [[ ${KEEP:-0} != 1 ]]; then
        rm -rf "$T"
    else
        echo "kept $T (logs: $T/log, sweep: $T/sweep)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# munge: a private daemon with its own key and socket (the system's munged is not touched).
dd if=/dev/urandom of="$T/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$T/munge/munge.key"
MUNGE_SOCKET=$T/munge/munge.socket
munged --foreground --force --key-file="$T/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$T/run/munged.pid" --log-file="$T/log/munged.log" \
    --seed-file="$T/munge/munged.seed" >"$T/log/munged.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 40); do [[ -S $MUNGE_SOCKET ]] && break; sleep 0.25; done
munge --socket="$MUNGE_SOCKET" -n | unmunge --socket="$MUNGE_SOCKET" >/dev/null \
    || { cat "$T/log/munged.out" "$T/log/munged.log" 2>/dev/null; fail "munged does not answer"; }

# Two free TCP ports, so that no other Slurm on this machine is disturbed.
read -r CTLD_PORT SLURMD_PORT < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
HOST=$(hostname -s)
# This machine as slurmd sees it: NodeName=HOST CPUs=.. Boards=.. SocketsPerBoard=..
# CoresPerSocket=.. ThreadsPerCore=.. RealMemory=..
NODE=$(slurmd -C | head -1)
[[ $NODE == "NodeName=$HOST "* ]] || fail "slurmd -C says '$NODE', not NodeName=$HOST"

export SLURM_CONF=$T/slurm.conf
cat >"$SLURM_CONF" <<EOF
# A single-node cluster for sbatch_check.sh; everything lives in $T.
ClusterName=sbatchcheck
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/run/slurmctld.pid
SlurmdPidFile=$T/run/slurmd.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
# Cores only: tasks without --mem do not each claim the whole node's memory.
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=300
$NODE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=check Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -D -i -f "$SLURM_CONF" >"$T/log/slurmctld.out" 2>&1 &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" >"$T/log/slurmd.out" 2>&1 &
PIDS+=($!)

show_logs() {
    for f in "$T"/log/*; do
        echo "--- $f"
        tail -25 "$f"
    done >&2
}
state=""
for ((i = 0; i < START_TIMEOUT * 2; i++)); do
    for p in "${PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null || { show_logs; fail "a daemon exited during start-up"; }
    done
    state=$(sinfo -h -N -n "$HOST" -o '%t' 2>/dev/null || true)
    [[ $state == idle ]] && break
    sleep 0.5
done
[[ $state == idle ]] || {
    show_logs
    sinfo -N -l >&2 || true
    fail "the node is not idle after ${START_TIMEOUT}s (state: '${state:-no answer}')"
}
phase_done "daemons up" "$t0"
say "$(sbatch --version) cluster up: $(sinfo -h -o '%P %a %D %t %c CPUs %m MB')"

# ---------------------------------------------------------------------------------------- 3
# The data and sweep file of `tiny_sweep` (xtask/tests/all/sweep.rs): the first 8 pairs of the
# embedded default's default-test and default-ood recipes, DPO vs ReprPO, 2 seeds, 2 steps.
t0=$(now)
cd "$T"
# A copy of the binary: a concurrent `cargo build` must not swap it under the running tasks.
XTASK=$T/xtask
cp "$XTASK_ARG" "$XTASK"
for recipe in default-test default-ood; do
    "$XTASK" data prepare --recipe "$recipe" --out "$T/$recipe-all.jsonl" >/dev/null
    head -n 8 "$T/$recipe-all.jsonl" >"$T/$recipe-8.jsonl"
done
cat >"$T/tiny.toml" <<EOF
name = "tiny"
seeds = 2
baseline = "dpo"

[base]
"train.max_steps" = 2
"sft.steps" = 1
"train.n_eval_examples" = 8
"data.n_train" = 16
"data.eval_datasets" = "$T/default-test-8.jsonl"
"data.ood_datasets" = "$T/default-ood-8.jsonl"
"run.plots" = false

[axes]
loss = ["dpo", "reprpo"]

[eval]
suites = ["default"]
options = { limit = 4 }

[slurm]
parallel = 2
time = "00:10:00"
EOF
D=$T/sweep
"$XTASK" sweep plan "$T/tiny.toml" --out "$D" >"$T/log/plan.out" || fail "sweep plan: $(cat "$T/log/plan.out")"
"$XTASK" sweep slurm "$T/tiny.toml" --out "$D" >"$T/log/slurm.out" || fail "sweep slurm: $(cat "$T/log/slurm.out")"
SCRIPT=$D/sweep.sbatch
[[ -f $SCRIPT ]] || fail "sweep slurm wrote no $SCRIPT"
say "sweep.sbatch:"
sed 's/^/    /' "$SCRIPT"
grep -qx '#SBATCH --array=0-3%2' "$SCRIPT" || fail "sweep.sbatch: no '#SBATCH --array=0-3%2'"
grep -qx "exec '$XTASK' sweep run-one '$D'" "$SCRIPT" \
    || fail "sweep.sbatch does not run '$XTASK sweep run-one $D'"
mapfile -t IDS < <(python3 -c 'import json,sys; [print(r["id"]) for r in json.load(open(sys.argv[1]))["runs"]]' "$D/plan.json")
[[ ${IDS[*]} == "loss-dpo-s0 loss-reprpo-s0 loss-dpo-s1 loss-reprpo-s1" ]] || fail "plan.json runs: ${IDS[*]}"
phase_done "sweep files" "$t0"

# Submit, then poll the queue (ours alone: the cluster is private) until it is empty, and read
# each array task's end from scontrol (kept MinJobAge seconds). `sbatch --wait` works too, but its
# own polling noticed the end 10-25 s late.
submit() { # $1: label; sets JOB
    local log=$T/log/sbatch-$1 deadline=$((SECONDS + JOB_TIMEOUT)) q
    JOB=$(sbatch --parsable "$SCRIPT" 2>"$log.err") || { cat "$log.err" >&2; fail "$1: sbatch"; }
    JOB=${JOB%%;*}
    [[ $JOB =~ ^[0-9]+$ ]] || fail "$1: sbatch printed '$JOB', not a job id"
    while :; do
        q=$(squeue -h -o '%i %t' 2>>"$log.err") || fail "$1: squeue: $(tail -n 1 "$log.err")"
        [[ -z $q ]] && break
        ((SECONDS < deadline)) || { squeue >&2; fail "$1: the array job $JOB did not finish in ${JOB_TIMEOUT}s"; }
        sleep 0.5
    done
    scontrol -o show job "$JOB" >"$log.jobs" 2>>"$log.err" || { cat "$log.err" >&2; fail "$1: scontrol show job $JOB"; }
    local done
    done=$(grep -c 'JobState=COMPLETED .*ExitCode=0:0' "$log.jobs" || true)
    ((done == ${#IDS[@]})) || {
        grep -o 'JobId=[0-9]* ArrayJobId=[0-9]* ArrayTaskId=[0-9]*\|JobState=[A-Z_]*\|ExitCode=[0-9:]*' "$log.jobs" >&2
        tail -n 20 "$D"/logs/slurm-"$JOB"_*.out >&2 || true
        fail "$1: $done of ${#IDS[@]} array tasks of job $JOB completed with exit code 0"
    }
}
task_logs() { # $1: job id, $2: what run i's line says ("ok in", "already done")
    local job=$1 want=$2 i log
    for i in 0 1 2 3; do
        log=$D/logs/slurm-${job}_$i.out
        [[ -f $log ]] || fail "no log of array task $i: $log"
        # Task i ran run i (SLURM_ARRAY_TASK_ID) on 1 thread (no --cpus-per-task).
        grep -q -- "run index $i, threads 1" "$log" && grep -q -- "${IDS[i]}: $want" "$log" \
            || { cat "$log" >&2; fail "task $i of job $job: no 'run index $i' / '${IDS[i]}: $want'"; }
    done
}
status_ok() { python3 - "$D" "${IDS[@]}" <<'EOF'
import json, os, sys
d, ids = sys.argv[1], sys.argv[2:]
bad = []
for i in ids:
    run = os.path.join(d, "runs", i)
    s = json.load(open(os.path.join(run, "status.json")))
    if s.get("status") != "ok":
        bad.append(f"{i}: status {s.get('status')!r}: {s.get('error')}")
    for f in ("train/summary.json", "eval/default/table.json"):
        if not os.path.isfile(os.path.join(run, f)):
            bad.append(f"{i}: no {f}")
left = [e for e in os.listdir(os.path.join(d, "runs")) if e.startswith(".")]
if left:
    bad.append(f"work folders left in runs/: {left}")
if bad:
    sys.exit("\n".join(bad))
EOF
}
fingerprint() { # mtime and content of every status.json
    for id in "${IDS[@]}"; do
        f=$D/runs/$id/status.json
        printf '%s %s %s\n' "$id" "$(stat -c %y "$f")" "$(sha256sum <"$f")"
    done
}

t0=$(now)
submit first
JOB1=$JOB
task_logs "$JOB1" "ok in"
status_ok || fail "after job $JOB1 not every run is ok"
phase_done "array job" "$t0"
say "job $JOB1: ${#IDS[@]} array tasks ok"

t0=$(now)
BEFORE=$(fingerprint)
submit again
JOB2=$JOB
task_logs "$JOB2" "already done"
AFTER=$(fingerprint)
[[ $BEFORE == "$AFTER" ]] || fail "resubmitting changed status.json:
$BEFORE
---
$AFTER"
status_ok || fail "after resubmitting (job $JOB2) not every run is ok"
phase_done "resubmit" "$t0"
say "job $JOB2: every task skipped its done run; status.json unchanged"

# ---------------------------------------------------------------------------------------- 4
t0=$(now)
"$XTASK" sweep report "$D" >"$T/log/report.out" 2>&1 || { cat "$T/log/report.out"; fail "sweep report"; }
grep -q "4 runs planned (2 seeds): 4 ok, 0 failed, 0 not run." "$T/log/report.out" \
    || { cat "$T/log/report.out"; fail "the report does not count 4 ok runs"; }
for f in report.md report.csv report.json train-job.png default.png; do
    [[ -s $D/report/$f ]] || fail "no report/$f"
done
phase_done report "$t0"

OK=1
say "PASS: sweep.sbatch ran under Slurm $(sbatch --version | cut -d' ' -f2) (jobs $JOB1, $JOB2)"
printf '   %s\n' "${TIMES[@]}"
