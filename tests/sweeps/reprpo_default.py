#!/usr/bin/env python3
"""The sweep behind the embedded default's ReprPO preset (issue 16).

Runs `xtask train` on the embedded default (tiny random Llama, SFT stage, ReprPO + LoRA) for each
setting below and prints a markdown table. The quantity the optimiser controls is the reroute
distance L_rr (`loss_rr`), which does not depend on the coefficient schedule; since every step
sees another batch, it is compared on the same batches: the mean L_rr of the last 10 steps of a
run against the mean L_rr of the same 10 steps of a run with learning rate 0 (the adapter's
initial value on those batches: same seed, same data order, same SFT base). Also: the
chosen/rejected cosines at the end and held-out preference accuracy of the SFT base and of the
adapter, in distribution and shifted. Every run logs every step (`train.logging_steps=1`, which
changes nothing else).

Usage: tests/sweeps/reprpo_default.py XTASK_BINARY [OUT_DIR]   (stdlib only)
"""
import json
import os
import subprocess
import sys
import tempfile

SETTINGS = [
    # (label, overrides)
    ("current: lr 1e-3, alpha 10", []),
    ("lr 1e-2", ["train.lr=1e-2"]),
    ("lr 1e-2, alpha 1", ["train.lr=1e-2", "reprpo.alpha=1"]),
    ("lr 1e-2, alpha 0.1", ["train.lr=1e-2", "reprpo.alpha=0.1"]),
    ("lr 3e-3, alpha 1", ["train.lr=3e-3", "reprpo.alpha=1"]),
    ("lr 1e-2, alpha 1, 2 epochs", ["train.lr=1e-2", "reprpo.alpha=1", "train.epochs=2"]),
    ("rr-only, lr 1e-2", ["loss=reprpo-rr-only", "train.lr=1e-2"]),
]


def run(binary, out, overrides):
    args = [binary, "train", "--no-progress", f"run.out_dir={out}", "run.plots=false",
            "train.logging_steps=1", *overrides]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = [os.path.join(out, d) for d in os.listdir(out) if d.startswith("reprpo-")]
    run_dir = max(runs, key=os.path.getmtime)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    recs = [r for r in recs if "loss_rr" in r]
    return summary, recs


def pct(summary, key):
    v = summary.get(key)
    return "-" if v is None else f"{100 * v:.0f}%"


def mean_rr(recs, steps):
    by_step = {r["step"]: r["loss_rr"] for r in recs}
    return sum(by_step[s] for s in steps) / len(steps)


def main():
    binary = os.path.abspath(sys.argv[1])
    out = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="reprpo-sweep-")
    print("| setting | steps | L_rr, last 10 steps: at init -> trained | fall "
          "| cos chosen / rejected (end) | ID: SFT base -> adapter | OOD: SFT base -> adapter |")
    print("|---|---|---|---|---|---|---|")
    init = {}
    for label, overrides in SETTINGS:
        s, recs = run(binary, out, overrides)
        n = recs[-1]["step"]
        last10 = list(range(n - 9, n + 1))
        key = (n, any(o.startswith("loss=") for o in overrides))
        if key not in init:
            zero = [o for o in overrides if not o.startswith("train.lr=")] + ["train.lr=0"]
            init[key] = mean_rr(run(binary, out, zero)[1], last10)
        before, after = init[key], mean_rr(recs, last10)
        last = recs[-1]
        print(f"| {label} | {n} | {before:.3f} -> {after:.3f} | {100 * (1 - after / before):.0f}% "
              f"| {last['cosine/chosen']:.3f} / {last['cosine/rejected']:.3f} "
              f"| {pct(s, 'base/id/accuracy')} -> {pct(s, 'adapter/id/accuracy')} "
              f"| {pct(s, 'base/ood/accuracy')} -> {pct(s, 'adapter/ood/accuracy')} |",
              flush=True)


if __name__ == "__main__":
    main()
