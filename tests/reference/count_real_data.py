r"""Writes tests/fixtures/data/convert_real_expected.json: the counts and first rows that
crates/reprpo-data/tests/all/convert_real.rs expects the converters to give on the real files in
../shared/data, computed here straight from the raw rows (Python stdlib only: json, csv, gzip; none
of these files is Parquet), following each dataset's documented structure (../shared/data/SOURCES.md)
and not our converters' code.

    python3 tests/reference/count_real_data.py            # write the fixture
    python3 tests/reference/count_real_data.py --check    # exit 1 if the fixture is out of date

Options: --data DIR (default: ../shared/data next to the repository), --out PATH. Deterministic: the
same files give byte-identical output.

Per source file (a group in the fixture): its path under the data folder, size in bytes and sha256
(the test checks the size, so a changed data file is reported as such), then `values`, each
{value, how}: `how` says how it was computed from the raw file. Structures read:
  truthfulqa/mc_task.json  JSON array of {question, mc1_targets {answer: 0|1}, mc2_targets {...}};
                           key order is the choice order (json keeps it).
  truthfulqa/TruthfulQA.csv  CSV with a UTF-8 BOM (read with encoding utf-8-sig).
  hh_rlhf/harmless-base-test.jsonl.gz  gzip JSONL {chosen, rejected}, full transcripts; prompt = the
                           longest common prefix of the two, cut right after the last
                           "\n\nAssistant:" in it; completions = the rest of each. A row with a
                           completion that is empty or white space gives no pair.
  genies/distributions/<name>/train.json  JSON array of {prompt, responses {text: 1.0|0.0}} with
                           exactly one 1.0; pairs = the 1.0 response against each 0.0 response.
  anthropic_evals_sycophancy/*.jsonl  JSONL {prompt, corrects [...], incorrects [...]}; choices =
                           corrects then incorrects; pairs = every correct against every incorrect.
"""

import argparse
import csv
import gzip
import hashlib
import json
import os
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
DEFAULT_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "data", "convert_real_expected.json")
ASSISTANT = "\n\nAssistant:"


def no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys in a JSON object: {keys}")
    return dict(pairs)


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f, object_pairs_hook=no_duplicate_keys)


def load_jsonl(text):
    return [json.loads(line, object_pairs_hook=no_duplicate_keys) for line in text.split("\n") if line.strip()]


def group(data, rel):
    path = os.path.join(data, rel)
    with open(path, "rb") as f:
        raw = f.read()
    return path, {"file": rel, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "values": {}}


def put(g, key, value, how):
    g["values"][key] = {"value": value, "how": how}


def histogram(counts):
    """{"n": rows with n} in increasing n."""
    return {str(n): c for n, c in sorted(Counter(counts).items())}


def truthfulqa_mc_task(data):
    path, g = group(data, "truthfulqa/mc_task.json")
    rows = load_json(path)
    assert isinstance(rows, list)
    put(g, "rows", len(rows), "len(json.load(file))")

    def targets(row, key):
        t = row[key]
        assert isinstance(t, dict) and t and all(v in (0, 1) for v in t.values()), key
        choices = list(t.keys())
        correct = [i for i, v in enumerate(t.values()) if v == 1]
        return choices, correct

    mc1 = [targets(r, "mc1_targets") for r in rows]
    mc2 = [targets(r, "mc2_targets") for r in rows]
    assert all(len(c) == 1 for _, c in mc1), "MC1 has exactly one label 1"
    put(g, "mc1_choices_total", sum(len(ch) for ch, _ in mc1), "sum over rows of len(mc1_targets)")
    put(g, "mc2_choices_total", sum(len(ch) for ch, _ in mc2), "sum over rows of len(mc2_targets)")
    put(g, "mc2_correct_total", sum(len(c) for _, c in mc2), "sum over rows of the mc2_targets values equal to 1")
    put(g, "mc1_correct_first_key_rows", sum(c == [0] for _, c in mc1),
        "rows whose only mc1_targets key with value 1 is the first key")
    first = rows[0]
    put(g, "first_row", {
        "question": first["question"],
        "mc1_choices": mc1[0][0],
        "mc1_correct": mc1[0][1],
        "mc2_choices": mc2[0][0],
        "mc2_correct": mc2[0][1],
    }, "row 1: question; the mc1_targets / mc2_targets keys in file order and the 0-based indices of value 1")
    return g


def truthfulqa_csv(data):
    path, g = group(data, "truthfulqa/TruthfulQA.csv")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert all(len(r) == len(header) for r in body)
    put(g, "rows", len(body), "csv.reader (encoding utf-8-sig): rows after the header")
    put(g, "header", header, "the header row, BOM removed by utf-8-sig")
    put(g, "first_row", dict(zip(header, body[0])), "the first row after the header, by column name")
    return g


def hh_rlhf(data):
    path, g = group(data, "hh_rlhf/harmless-base-test.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = load_jsonl(f.read())
    put(g, "rows", len(rows), "non-empty lines of the gunzipped file")

    def split(row):
        chosen, rejected = row["chosen"], row["rejected"]
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        at = chosen.rfind(ASSISTANT, 0, n)
        assert at >= 0, "every row shares a \\n\\nAssistant: marker"
        cut = at + len(ASSISTANT)
        return chosen[:cut], chosen[cut:], rejected[cut:]

    pairs, skipped = [], []
    for k, row in enumerate(rows, start=1):
        prompt, chosen, rejected = split(row)
        empty = [side for side, text in (("chosen", chosen), ("rejected", rejected)) if not text.strip()]
        if empty:
            side = empty[0]
            skipped.append({"row": k, "side": side, "completion": chosen if side == "chosen" else rejected})
        else:
            pairs.append({"row": k, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    how_split = ("prompt = longest common prefix of chosen and rejected, cut right after its last "
                 "\"\\n\\nAssistant:\"; completions = the rest of each transcript")
    put(g, "pairs", len(pairs), f"rows whose two completions are both non-blank ({how_split})")
    put(g, "skipped", len(skipped), "rows with a completion that is empty or only white space (str.strip() == '')")
    put(g, "skipped_rows", skipped,
        "per skipped row (1-based): which completion is blank (chosen checked first) and its text")
    put(g, "first_pairs", pairs[:2], f"the first two rows that give a pair: 1-based row, prompt and completions ({how_split})")
    return g


def genies(data, name):
    path, g = group(data, f"genies/distributions/{name}/train.json")
    rows = load_json(path)
    put(g, "rows", len(rows), "len(json.load(file))")
    items = []
    for r in rows:
        resp = r["responses"]
        assert all(v in (0.0, 1.0) for v in resp.values())
        correct = [i for i, v in enumerate(resp.values()) if v == 1.0]
        assert len(correct) == 1, "exactly one 1.0 response"
        items.append((r["prompt"], list(resp.keys()), correct))
    put(g, "pairs", sum(len(c) * (len(ch) - len(c)) for _, ch, c in items),
        "sum over rows of (#responses scored 1.0) x (#responses scored 0.0)")
    put(g, "responses_per_row", histogram(len(ch) for _, ch, _ in items),
        "number of rows (value) per count of responses (key)")
    put(g, "correct_per_row", histogram(len(c) for _, _, c in items),
        "number of rows (value) per count of responses scored 1.0 (key)")
    prompt, choices, correct = items[0]
    put(g, "first_row", {"prompt": prompt, "choices": choices, "correct": correct},
        "row 1: prompt, the responses keys in file order and the 0-based index of the 1.0")
    wrong = [i for i in range(len(choices)) if i not in correct]
    put(g, "first_pair", {"chosen": choices[correct[0]], "rejected": choices[wrong[0]]},
        "row 1: the 1.0 response and the first 0.0 response in key order")
    return g


def sycophancy(data, bio):
    path, g = group(data, f"anthropic_evals_sycophancy/political_typology_quiz_liberal-bio_{bio}.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = load_jsonl(f.read())
    put(g, "rows", len(rows), "non-empty lines of the file")
    put(g, "pairs", sum(len(r["corrects"]) * len(r["incorrects"]) for r in rows),
        "sum over rows of len(corrects) x len(incorrects)")
    first = rows[0]
    put(g, "first_row", {
        "prompt": first["prompt"],
        "choices": first["corrects"] + first["incorrects"],
        "correct": list(range(len(first["corrects"]))),
    }, "row 1: prompt, choices = corrects + incorrects, correct = the indices of the corrects")
    put(g, "first_pair", {"chosen": first["corrects"][0], "rejected": first["incorrects"][0]},
        "row 1: corrects[0] against incorrects[0]")
    return g


def build(data):
    return {
        "_about": ("Written by tests/reference/count_real_data.py from ../shared/data (python3, stdlib only), "
                   "straight from the raw rows; read by crates/reprpo-data/tests/all/convert_real.rs. Regenerate "
                   "with `python3 tests/reference/count_real_data.py` when a data file changes."),
        "truthfulqa_mc_task": truthfulqa_mc_task(data),
        "truthfulqa_csv": truthfulqa_csv(data),
        "hh_rlhf_harmless_base_test": hh_rlhf(data),
        "genies_alpaca_mmlu_train": genies(data, "alpaca_mmlu"),
        "genies_unhelpful_alpaca_train": genies(data, "unhelpful_alpaca"),
        "sycophancy_liberal_bio": sycophancy(data, "liberal"),
        "sycophancy_conservative_bio": sycophancy(data, "conservative"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = ap.parse_args()
    text = json.dumps(build(args.data), indent=1, ensure_ascii=False) + "\n"
    if args.check:
        with open(args.out, encoding="utf-8") as f:
            same = f.read() == text
        print(f"{args.out}: {'up to date' if same else 'OUT OF DATE'}")
        sys.exit(0 if same else 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out} ({len(text.encode())} bytes, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]})")


if __name__ == "__main__":
    main()
