r"""Writes tests/fixtures/open_pref_eval/: a tiny random Llama and what open_pref_eval @ 0c7f3a3 (the evaluation
of the reference ReprPO project, `reprpo/training.py` at bd9ae63 calls its `evaluate_model`) makes of a few
preference pairs with it: the token ids of its tokenisation and, per pair, the chosen and rejected scores,
the probability and the correct flag. For crates/reprpo-eval/tests/all/open_pref_eval.rs, which checks the
`open-pref-eval` scoring of reprpo-eval against it.

    /work/venvs/reprpo-ref/bin/python tests/reference/gen_open_pref_eval_fixtures.py

Environment: /work/venvs/reprpo-ref (tests/reference/requirements-methods.txt: torch 2.7.0, transformers
4.51.0, tokenizers 0.21.1, loguru 0.7.3) plus wassname/open_pref_eval at
0c7f3a3251ac8afdf453f9ebc74d3092401d94d3 (not on PyPI), exported from git and installed without its
dependencies:

    git --git-dir=<mirror of wassname/open_pref_eval> archive 0c7f3a3 | tar -x -C /tmp/ope-0c7f3a3
    /work/venvs/reprpo-ref/bin/pip install --no-deps /tmp/ope-0c7f3a3

The script checks that the installed trainer.py, scoring.py and evaluation.py are the 0c7f3a3 blobs (git
blob ids below). open_pref_eval/__init__.py imports evaluation.py, which imports pandas and datasets at
module level; nothing called here uses either (they serve `eval_dataset`'s DataFrame and `load_dataset`), so
when they are not installed a stub module stands in for each, whose every attribute is a class that raises
when used. Nothing is downloaded; nothing is copied from open_pref_eval.

What open_pref_eval's own code computes here (imported, not re-implemented):
- `trainer.PreTokenizer(tokenizer, max_length, max_prompt_length)` on each row: the prompt encoded without
  special tokens, left-truncated to `max_prompt_length`; each completion encoded separately without special
  tokens, right-truncated to `max_length - len(prompt)` (what `tokenize_dataset`'s `dataset.map` calls);
- `trainer.DataCollatorForPreference` on batches of 3 rows in order (what `eval_dataset`'s DataLoader does:
  prompts left-padded, EOS appended to each completion, completions right-padded);
- `evaluation.extract_logps(model, batch, step)` with its default `score_fn=score_ipo`
  (`scoring.score_log_prob_mean`): `concatenated_forward` and the mean log-probability per completion;
  `prob` is its sigmoid of the difference; `correct = prob > 0.5` as `eval_dataset` sets it.
The glue (a list of dicts instead of a `datasets.Dataset`, the loop over batches) is this script's.

Two settings: `default` (eval_dataset's defaults, max_prompt_length 512, max_length 1024, which the reference
uses; one pair has a prompt of more than 512 tokens and a completion of more than 512) and `small`
(max_prompt_length 8, max_length 20: most pairs cut).

A finding recorded in the JSON (`notes`): at 0c7f3a3 `concatenated_forward` returns the completion mask
rolled by one position against the per-token log-probabilities, so the score is the mean over the
completion's own tokens WITHOUT the appended EOS (divided by their number); the EOS is fed but never counted.
The script checks this against a direct computation (one unpadded forward per sequence) for every pair.

Model: LlamaForCausalLM, vocab 700 (the byte-level BPE tokenizer of tests/fixtures/tokenize/bytelevel: <pad>
0, <s> 1, </s> 2, 441 merges), hidden 16, intermediate 32, 2 layers, 4 heads / 2 kv heads (head_dim 4),
rope_theta 1e4, max_position_embeddings 2048, tied embeddings, eager attention. Weights: every parameter in
sorted-name order from torch.Generator(seed 2025): norms 1 + 0.1 N(0,1), others 0.5 N(0,1). CPU, float32,
one thread. open_pref_eval runs the forward under torch.autocast("cpu", float32), which torch disables with
a warning (CPU autocast takes bf16/f16 only): the forward is plain float32.

Positions: the prompts of a batch are left-padded and transformers 4.51 numbers positions 0..T-1 including the
pads, so a padded row's real tokens sit at shifted positions; RoPE makes attention depend on relative
positions only, so this changes the scores by rounding alone (the Rust side numbers every sequence from 0).

Output: tests/fixtures/open_pref_eval/model/{config.json, model.safetensors}, expected.json. Two runs give
identical files (the last line prints a sha256 of the folder).
"""

import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
import types
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "fixtures", "open_pref_eval"))
TOKENIZER = os.path.normpath(os.path.join(HERE, "..", "fixtures", "tokenize", "bytelevel"))
EXPECTED_VERSIONS = {"torch": "2.7.0", "transformers": "4.51.0"}
OPE_COMMIT = "0c7f3a3251ac8afdf453f9ebc74d3092401d94d3"
# git blob ids of the files at OPE_COMMIT (`git ls-tree 0c7f3a3 open_pref_eval/`).
OPE_BLOBS = {
    "trainer.py": "634fa5e6f527dd964b21967007d03534c448f402",
    "scoring.py": "e3876c54718f9b48ce5070f70c10b7e38f4915c9",
    "evaluation.py": "07f600c4a365d1b863ad8fab087af2bc39dab4c9",
}
BATCH = 3
SETTINGS = {"default": (512, 1024), "small": (8, 20)}

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*autocast.*")
warnings.filterwarnings("ignore", message=".*fast tokenizer.*")


def stub(name):
    """A module whose every attribute is a class that raises when instantiated or called."""
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def missing(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def fail(*_a, **_k):
            raise RuntimeError(f"{name}.{attr} is a stub in the fixture environment")

        return type(attr, (), {"__init__": fail, "__call__": fail})

    m.__getattr__ = missing
    return m


for _name in ["pandas", "datasets"]:
    try:
        importlib.import_module(_name)
    except ImportError:
        sys.modules[_name] = stub(_name)

import open_pref_eval  # noqa: E402
from open_pref_eval import scoring as ope_scoring  # noqa: E402
from open_pref_eval import trainer as ope_trainer  # noqa: E402
from open_pref_eval.evaluation import extract_logps  # noqa: E402


def git_blob(path):
    data = open(path, "rb").read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_env():
    got = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    if got != EXPECTED_VERSIONS:
        sys.exit(f"expected {EXPECTED_VERSIONS}, found {got}")
    pkg = os.path.dirname(open_pref_eval.__file__)
    for f, blob in OPE_BLOBS.items():
        b = git_blob(os.path.join(pkg, f))
        if b != blob:
            sys.exit(f"open_pref_eval/{f} is blob {b}, expected {blob} (commit {OPE_COMMIT})")
    if extract_logps.__defaults__[0] is not ope_scoring.score_ipo:
        sys.exit("extract_logps's default score_fn is not scoring.score_ipo")


WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said each she which do their time "
    "if will way about many then them write would like so these her long make thing see him two has look more "
    "day could go come did number sound no most people my over know water than call first who may down side"
).split()


def text(g, n):
    idx = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx)


def rows():
    g = torch.Generator().manual_seed(7)
    r = [
        # GENIES style: the prompt ends in a newline, the completions start with a word.
        {"prompt": "### Instruction:\nSay " + text(g, 6) + ".\n\n### Response:\n",
         "chosen": text(g, 9) + ".", "rejected": text(g, 4) + "."},
        # The ETHICS expression style: the prompt ends in a space, the completions continue it.
        {"prompt": text(g, 12) + " because ", "chosen": text(g, 7) + ".", "rejected": text(g, 5) + "."},
        # A leading space on the completions; a one-word rejected completion.
        {"prompt": text(g, 5), "chosen": " " + text(g, 11), "rejected": " the"},
        # Merges across the boundary if encoded together ("wa" + "ter").
        {"prompt": "I drink wa", "chosen": "ter every day", "rejected": "tch the sea"},
        # Non-ASCII bytes.
        {"prompt": "Caf\u00e9 au lait, na\u00efve r\u00e9sum\u00e9: ", "chosen": "\u00fcber \u2713 good",
         "rejected": "\U0001F600 bad"},
        # Longer than the default limits: a prompt of more than 512 tokens, a completion of more than 512.
        {"prompt": text(g, 700) + "\n", "chosen": text(g, 800), "rejected": text(g, 30)},
        {"prompt": text(g, 20) + "? ", "chosen": text(g, 3), "rejected": text(g, 3)},
    ]
    for i, x in enumerate(r):
        x["id"] = f"ope/{i + 1}"
    return r


def make_model():
    cfg = LlamaConfig(
        vocab_size=700, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(2025)
    with torch.no_grad():
        for name, p in sorted(m.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.5 * noise)
    return m.eval()


@torch.no_grad()
def direct_mean(model, prompt, completion, eos):
    """Mean log-probability of `completion` (not of the EOS after it) after `prompt`: one unpadded forward."""
    ids = prompt + completion + [eos]
    lp = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1)
    p = len(prompt)
    picked = [float(lp[t - 1, ids[t]]) for t in range(p, p + len(completion))]
    return sum(picked) / len(picked), sum(picked)


def run_setting(model, tok, data, max_prompt_length, max_length):
    pre = ope_trainer.PreTokenizer(tokenizer=tok, max_length=max_length, max_prompt_length=max_prompt_length)
    feats = [pre({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}) for r in data]
    collate = ope_trainer.DataCollatorForPreference(tokenizer=tok, pad_token_id=tok.pad_token_id)
    out = []
    for step, start in enumerate(range(0, len(feats), BATCH)):
        chunk = feats[start : start + BATCH]
        batch = collate(chunk)
        res = extract_logps(model, batch, step)
        for k, f in enumerate(chunk):
            r = data[start + k]
            prob = float(res["prob"][k])
            cho, rej = float(res["score__chosen_log_score"][k]), float(res["score__rejected_log_score"][k])
            # The statistic, computed directly: the mean over the completion's own tokens (EOS not counted).
            for key, got in [("chosen", cho), ("rejected", rej)]:
                want, _ = direct_mean(model, f["prompt_ids"], f[key + "_ids"], tok.eos_token_id)
                if abs(got - want) > 1e-4 * max(1.0, abs(want)):
                    sys.exit(f"{r['id']} {key}: open_pref_eval {got} != direct mean without EOS {want}")
            out.append({
                "id": r["id"],
                "prompt_ids": f["prompt_ids"],
                "chosen_ids": f["chosen_ids"],
                "rejected_ids": f["rejected_ids"],
                "prompt_truncated": bool(f["prompt_truncated"]),
                "chosen_truncated": bool(f["chosen_truncated"]),
                "rejected_truncated": bool(f["rejected_truncated"]),
                "chosen_log_score": cho,
                "rejected_log_score": rej,
                "chosen_logp_sum": float(res["_chosen_logps"][k]),
                "rejected_logp_sum": float(res["_rejected_logps"][k]),
                "log_ratio": float(res["score__log_ratio"][k]),
                "prob": prob,
                "correct": prob > 0.5,
            })
    return out


def sha_dir(d):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(d)):
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(os.path.relpath(p, d).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def main():
    check_env()
    tok = PreTrainedTokenizerFast.from_pretrained(TOKENIZER)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    model = make_model()
    os.makedirs(os.path.join(OUT, "model"), exist_ok=True)
    model.save_pretrained(os.path.join(OUT, "model"), safe_serialization=True)
    data = rows()
    expected = {
        "notes": [
            f"open_pref_eval {OPE_COMMIT}: PreTokenizer, DataCollatorForPreference, extract_logps(score_ipo); "
            f"batches of {BATCH} rows in order; correct = prob > 0.5.",
            "The score of a completion is the mean log-probability of its own tokens, without the EOS that the "
            "collator appends (concatenated_forward's mask is rolled by one against the log-probabilities); "
            "checked here against one unpadded forward per sequence (1e-4).",
            "Prompts are left-padded within a batch and transformers numbers positions from 0 including the "
            "pads; with RoPE this changes scores by rounding only.",
            "tokenizer: tests/fixtures/tokenize/bytelevel; model: model/ (float32).",
        ],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "open_pref_eval": OPE_COMMIT},
        "eos": tok.eos_token_id,
        "pairs": [{k: r[k] for k in ["id", "prompt", "chosen", "rejected"]} for r in data],
        "settings": {},
    }
    for name, (mpl, ml) in SETTINGS.items():
        expected["settings"][name] = {
            "max_prompt_length": mpl,
            "max_length": ml,
            "results": run_setting(model, tok, data, mpl, ml),
        }
    d = expected["settings"]["default"]["results"]
    assert any(r["prompt_truncated"] for r in d) and any(r["chosen_truncated"] for r in d)
    assert len(d[5]["prompt_ids"]) == 512 and len(d[5]["chosen_ids"]) == 512
    with open(os.path.join(OUT, "expected.json"), "w") as fh:
        json.dump(expected, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    print("wrote", OUT, "sha256", sha_dir(OUT))


if __name__ == "__main__":
    main()
