"""Writes OUT/table.md and OUT/results.json from what tests/gpu/run.sh collected (stdlib only).

One row per case: PyTorch + PEFT (the anchor's entry for that loss and checkpointing) against
reprpo (`xtask bench train`). A case that failed, timed out or was not run is a row that says so.
Exit status: 0 when the doctor passed and every command that should have run did, else 1.
"""
import argparse
import json
import os
import sys


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f), None
    except FileNotFoundError:
        return None, "no JSON written"
    except (OSError, ValueError) as e:
        return None, f"unreadable JSON ({e})"


def status(work, name):
    """(rc, seconds, limit) of a command run.sh ran, or None if it did not run it."""
    try:
        with open(os.path.join(work, "raw", name + ".status")) as f:
            rc, secs, limit = f.read().split()
            return int(rc), int(secs), int(limit)
    except (OSError, ValueError):
        return None


def outcome(work, name):
    """(json or None, problem or None) for one command."""
    st = status(work, name)
    if st is None:
        return None, "not run"
    rc, secs, limit = st
    if rc in (124, 137):
        return None, f"timed out after {limit} s"
    data, problem = load_json(os.path.join(work, "raw", name + ".json"))
    if rc != 0:
        return None, f"failed (exit {rc} after {secs} s; see logs.txt)"
    if data is None:
        return None, f"failed ({problem})"
    return data, None


def num(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--torch-reason", default="")
    ap.add_argument("--card", default="")
    ap.add_argument("--build-info", default="")
    ap.add_argument("--binary", default="")
    ap.add_argument("--seconds", default="")
    a = ap.parse_args()
    ok = True

    # doctor
    doctor, _ = load_json(os.path.join(a.work, "raw", "doctor.json"))
    st = status(a.work, "doctor")
    if st is None:
        verdict = "not run"
        ok = False
    elif st[0] == 0:
        verdict = "pass"
    elif st[0] in (124, 137):
        verdict = f"TIMED OUT after {st[2]} s"
        ok = False
    else:
        verdict = f"FAILED (exit {st[0]}; see doctor.json and logs.txt)"
        ok = False

    if isinstance(doctor, dict) and isinstance(doctor.get("checks"), int):
        failed = doctor.get("failed") or []
        names = [f if isinstance(f, str) else str(f.get("check", f)) if isinstance(f, dict) else str(f)
                 for f in failed]
        verdict += f" ({doctor['checks']} checks"
        verdict += f"; failed: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})" if names else ")"

    build = {}
    if a.build_info and os.path.isfile(a.build_info):
        with open(a.build_info) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    build[k.strip()] = v.strip()

    cases = []
    with open(os.path.join(a.work, "cases.tsv")) as f:
        for line in f:
            block, case, preset, pairs, seq, steps, warmup = line.rstrip("\n").split("\t")
            cases.append(dict(block=block, case=case, preset=preset, pairs=int(pairs),
                              seq=int(seq), steps=int(steps), warmup=int(warmup)))

    anchors = {}
    for block in dict.fromkeys(c["block"] for c in cases):
        if a.torch_reason:
            anchors[block] = (None, f"not run: {a.torch_reason}")
            if a.mode == "gpu":
                ok = False
        else:
            anchors[block] = outcome(a.work, "anchor-" + block)
            if anchors[block][1] is not None:
                ok = False

    rows, results = [], []
    versions = card = None
    for c in cases:
        name = f"ours-{c['block']}-{c['case']}"
        ours, our_problem = outcome(a.work, name)
        if our_problem is not None:
            ok = False
        anchor, anchor_problem = anchors[c["block"]]
        py = None
        if anchor is not None:
            py = anchor.get(c["case"])
            if py is None:
                anchor_problem = f"anchor JSON has no `{c['case']}`"
            if versions is None:
                versions = {k: anchor.get(k) for k in ("torch", "transformers", "peft")}
            card = card or anchor.get("gpu")
        if ours is not None and a.mode == "gpu":
            card = card or ours.get("device_name")
        label = (f"{c['preset']} {c['pairs']}x{c['seq']} {c['case'].replace('_gc', '')}"
                 + (" + grad. ckpt" if c["case"].endswith("_gc") else ""))
        py_s = py.get("step_s_median") if py else None
        our_s = ours.get("step_s_median") if ours else None
        ratio = py_s / our_s if isinstance(py_s, (int, float)) and isinstance(our_s, (int, float)) and our_s > 0 else None

        def mem(d, who):
            if d is None:
                return "-"
            if isinstance(d.get("peak_mem_gib"), (int, float)):
                return f"{d['peak_mem_gib']:.2f}"
            if isinstance(d.get("device_used_gib_sampled"), (int, float)):
                return f"{d['device_used_gib_sampled']:.2f} (sampled)"
            if who == "ours" and isinstance(d.get("peak_rss_mib"), (int, float)):
                return f"RSS {d['peak_rss_mib']:.0f} MiB"
            return "-"

        py_cells = ([num(py_s, ".4f"), mem(py, "py"), num(py.get("tokens_per_s"), ",.0f")]
                    if py else [anchor_problem or "-", "-", "-"])
        our_cells = ([num(our_s, ".4f"), mem(ours, "ours"), num(ours.get("tokens_per_s"), ",.0f")]
                     if ours else [our_problem, "-", "-"])
        rows.append([label, py_cells[0], our_cells[0],
                     f"{ratio:.2f}x" if ratio is not None else "-",
                     py_cells[1], our_cells[1], py_cells[2], our_cells[2]])
        results.append(dict(c, label=label, pytorch=py, pytorch_problem=anchor_problem if py is None else None,
                            ours=ours, ours_problem=our_problem, speed_ratio=ratio))

    commit = build.get("commit", "unknown")
    if build.get("dirty") not in (None, "", "0"):
        commit += f" (+{build['dirty']} uncommitted files)"
    if a.card:
        card = a.card
    lines = [
        "# reprpo (candle) vs PyTorch + PEFT: one preference-training step",
        "",
        f"- mode: {'GPU' if a.mode == 'gpu' else 'CPU dry run (tiny shapes)'}, device `{a.device}`"
        + (f", {card}" if card else ""),
        "- PyTorch side: "
        + (", ".join(f"{k} {v}" for k, v in (versions or {}).items() if v) or "not run"
           if not a.torch_reason else f"not run: {a.torch_reason}"),
        f"- reprpo side: commit {commit}"
        + (f", built {build['built']}" if build.get("built") else "")
        + (f", features {build['features']}" if build.get("features") else "")
        + f", binary `{os.path.basename(a.binary)}`",
        f"- doctor (`--device {a.device}`): {verdict}",
        f"- wall time of the run: {a.seconds} s",
        "- speed ratio = PyTorch step time / reprpo step time (> 1: reprpo is faster); "
        "step times are medians; peak GiB: `torch.cuda.max_memory_allocated` vs the CUDA memory "
        "pool's used high watermark (CPU: reprpo's peak RSS)",
        "",
        "| case | PyTorch step s | reprpo step s | speed ratio | PyTorch peak GiB | reprpo peak GiB "
        "| PyTorch tokens/s | reprpo tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write("\n".join(lines))

    raw = {}
    for block in anchors:
        raw[f"anchor-{block}"] = anchors[block][0]
    summary = dict(mode=a.mode, device=a.device, card=card, build=build, versions=versions,
                   doctor=dict(verdict=verdict, status=st and dict(rc=st[0], seconds=st[1]), json=doctor),
                   torch_reason=a.torch_reason or None, seconds=a.seconds, ok=ok, cases=results,
                   anchor_json=raw)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
