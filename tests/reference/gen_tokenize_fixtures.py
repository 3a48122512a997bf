"""Writes tests/fixtures/tokenize/: two small trained tokenizers and the ids, masks and batches that
TRL itself produces for a set of preference pairs, for the Rust tokenisation tests.

Two steps, each in its own pinned environment (see requirements-*.txt):

    python gen_tokenize_fixtures.py tokenizers        # any env with `tokenizers` + `transformers`
    <trl09 env>/python gen_tokenize_fixtures.py classic   # TRL 0.9.6: DPOTrainer.tokenize_row + collator
    <trl116 env>/python gen_tokenize_fixtures.py current  # TRL 1.16.0: _prepare_dataset + DataCollatorForPreference
    <trl116 env>/python gen_tokenize_fixtures.py chat     # transformers' apply_chat_template renderings

Nothing here is fetched: the tokenizers are trained on text this script writes.
"""

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "tokenize")

WORDS = (
    "the a an of to and in is it you that he was for on are with as I his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said each she "
    "which do their time if will way about many then them write would like so these her long make thing see "
    "him two has look more day could go come did number sound no most people my over know water than call "
    "first who may down side been now find any new work part take get place made live where after back little "
    "only round man year came show every good me give our under name very through just form sentence great "
    "think say help low line differ turn cause much mean before move right boy old too same tell does set "
    "three want air well also play small end put home read hand port large spell add even land here must big "
    "high such follow act why ask men change went light kind off need house picture try us again animal point "
    "mother world near build self earth father head stand own page should country found answer school grow "
    "study still learn plant cover food sun four between state keep eye never last let thought city tree cross "
    "farm hard start might story saw far sea draw left late run don't while press close night real life few north"
).split()

ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
LLAMA3ISH = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def corpus(rng):
    lines = []
    for _ in range(4000):
        n = rng.randint(3, 14)
        s = " ".join(rng.choice(WORDS) for _ in range(n))
        if rng.random() < 0.3:
            s = s.capitalize() + rng.choice([".", "?", "!", ":", ","])
        lines.append(s)
    lines += ["\n\nHuman: " + l + "\n\nAssistant: " + l for l in lines[:300]]
    lines += ["Question: café naïve déjà vu — 中文 测试 🙂 ok"] * 5
    return lines


def build_tokenizers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(0)
    text = corpus(rng)
    # (a) GPT-2 / Llama-3 style: byte-level BPE, spaces attach to the following word.
    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bl.train_from_iterator(text, tr)
    bl.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    # (b) Llama-2 / SentencePiece style: metaspace, byte fallback, merges may cross the prompt/completion boundary.
    ms = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    ms.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    ms.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tr = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)],
        show_progress=False,
        max_token_length=8,
    )
    ms.train_from_iterator(text, tr)
    ms.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])

    for name, tok, cfg in [
        ("bytelevel", bl, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": ZEPHYR}),
        ("metaspace", ms, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": LLAMA3ISH}),
    ]:
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "tokenizer.json")
        tok.save(path)
        # Legacy "a b" merge strings, so that the tokenizers 0.19 of the TRL 0.9 environment reads it too.
        j = json.load(open(path))
        j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
        with open(path, "w") as f:
            json.dump(j, f, ensure_ascii=False, indent=1)
        cfg = dict(cfg, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False)
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=1, ensure_ascii=False)


def cases():
    """Pairs that exercise the rules: merges at the boundary, unicode, EOS already present, truncation."""
    rng = random.Random(1)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
    c = [
        {"prompt": "The sky is", "chosen": " blue", "rejected": " green"},
        {"prompt": "Q: what is two plus two?\nA: ", "chosen": "four", "rejected": "five, I think"},
        {"prompt": "\n\nHuman: can you help me?\n\nAssistant:", "chosen": " Yes, of course.", "rejected": " No."},
        {"prompt": "Say hello", "chosen": "hello", "rejected": "hel"},
        {"prompt": "Question: café naïve", "chosen": " déjà vu — 中文", "rejected": " 测试 🙂 ok"},
        {"prompt": "Ends with eos", "chosen": " done</s>", "rejected": " not done"},
        {"prompt": "Trailing space ", "chosen": " leading space", "rejected": "no space"},
        {"prompt": "Newlines\n", "chosen": "\nline two\n", "rejected": "line\n\ntwo"},
        {"prompt": "x", "chosen": "y", "rejected": "yy"},
    ]
    for i in range(6):
        c.append({"prompt": words(40 + 10 * i) + ":", "chosen": " " + words(5 + 7 * i), "rejected": " " + words(3 + 11 * i)})
    c.append({"prompt": words(150), "chosen": " " + words(4), "rejected": " " + words(6)})
    for i in range(4):
        c.append({"prompt": words(3 + i) + " ", "chosen": words(2 + i), "rejected": words(4 + i)})
    return c


CLASSIC = [
    {"name": "classic-default", "max_length": 512, "max_prompt_length": 256, "truncation_mode": "keep_end"},
    {"name": "classic-keep-end", "max_length": 48, "max_prompt_length": 20, "truncation_mode": "keep_end"},
    {"name": "classic-keep-start", "max_length": 48, "max_prompt_length": 20, "truncation_mode": "keep_start"},
]
CURRENT = [
    {"name": "current-default", "max_length": 1024, "truncation_mode": "keep_start"},
    {"name": "current-keep-start", "max_length": 40, "truncation_mode": "keep_start"},
    {"name": "current-keep-end", "max_length": 40, "truncation_mode": "keep_end"},
]


def load_tok(name):
    from transformers import PreTrainedTokenizerFast

    d = os.path.join(OUT, name)
    cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(d, "tokenizer.json"),
        bos_token=cfg["bos_token"],
        eos_token=cfg["eos_token"],
        pad_token=cfg.get("pad_token"),
        unk_token=cfg.get("unk_token"),
    )
    tok.chat_template = cfg["chat_template"]
    if tok.pad_token is None:  # what both trainers do when the tokenizer has no pad token
        tok.pad_token = tok.eos_token
    return tok


def write(name, obj):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(obj, f, ensure_ascii=False)
        f.write("\n")


def gen_classic():
    import trl
    from trl import DPOTrainer
    from trl.trainer.utils import DPODataCollatorWithPadding

    assert trl.__version__ == "0.9.6", trl.__version__
    out = {"trl": trl.__version__, "cases": cases(), "runs": []}
    for tname in ["bytelevel", "metaspace"]:
        tok = load_tok(tname)
        pad = tok.pad_token_id
        for cfg in CLASSIC:
            t = DPOTrainer.__new__(DPOTrainer)  # only the tokenisation state, no model
            t.tokenizer = tok
            t.is_encoder_decoder = False
            t.is_vision_model = False
            t.max_length = cfg["max_length"]
            t.max_prompt_length = cfg["max_prompt_length"]
            t.truncation_mode = cfg["truncation_mode"]
            t.label_pad_token_id = -100
            t.padding_value = pad
            rows = [t.tokenize_row(dict(c)) for c in out["cases"]]
            if cfg["name"] == "classic-default":
                # Chat template: the user renders the conversation before TRL 0.9 (which applied none),
                # as TRL's later `maybe_apply_chat_template` does: prompt with the generation prompt,
                # completion = the rest of the rendered full conversation.
                chat_rows = []
                for c in out["cases"]:
                    p = tok.apply_chat_template([{"role": "user", "content": c["prompt"]}], tokenize=False, add_generation_prompt=True)
                    r = {"prompt": p}
                    for k in ("chosen", "rejected"):
                        full = tok.apply_chat_template(
                            [{"role": "user", "content": c["prompt"]}, {"role": "assistant", "content": c[k]}], tokenize=False
                        )
                        assert full.startswith(p)
                        r[k] = full[len(p) :]
                    chat_rows.append(t.tokenize_row(r))
                out["runs"].append(
                    {
                        "tokenizer": tname,
                        "config": dict(cfg, name="classic-chat", chat_template=True),
                        "pad": pad,
                        "rows": [
                            {k: r[k] for k in ("prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
                            for r in chat_rows
                        ],
                    }
                )
            collator = DPODataCollatorWithPadding(pad_token_id=pad, label_pad_token_id=-100, is_encoder_decoder=False)
            batch = collator([dict(r) for r in rows[:4]])
            cat = DPOTrainer.concatenated_inputs(batch, is_encoder_decoder=False, label_pad_token_id=-100, padding_value=pad, device="cpu")
            out["runs"].append(
                {
                    "tokenizer": tname,
                    "config": cfg,
                    "pad": pad,
                    "rows": [
                        {
                            "prompt_input_ids": r["prompt_input_ids"],
                            "chosen_input_ids": r["chosen_input_ids"],
                            "chosen_labels": r["chosen_labels"],
                            "rejected_input_ids": r["rejected_input_ids"],
                            "rejected_labels": r["rejected_labels"],
                        }
                        for r in rows
                    ],
                    "batch_of_first_4": {
                        "input_ids": cat["concatenated_input_ids"].tolist(),
                        "attention_mask": cat["concatenated_attention_mask"].tolist(),
                        "labels": cat["concatenated_labels"].tolist(),
                    },
                }
            )
    write("classic.json", out)


def gen_current(chat=False):
    import tempfile

    import trl
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    assert trl.__version__ == "1.16.0", trl.__version__
    cs = cases()
    out = {"trl": trl.__version__, "cases": cs, "runs": []}
    for tname in ["bytelevel", "metaspace"]:
        tok = load_tok(tname)
        for cfg in CURRENT:
            t = DPOTrainer.__new__(DPOTrainer)
            t._tokenizer = tok
            t._is_vision_dataset = False
            args = DPOConfig(
                output_dir=tempfile.mkdtemp(), max_length=cfg["max_length"], truncation_mode=cfg["truncation_mode"], report_to=[], use_cpu=True, bf16=False
            )
            ds = Dataset.from_list([dict(c, idx=i) for i, c in enumerate(cs)])
            ds = t._prepare_dataset(ds, tok, args, "train")
            kept = list(ds)
            pad = tok.pad_token_id
            collator = DataCollatorForPreference(pad_token_id=pad, max_length=cfg["max_length"], truncation_mode=cfg["truncation_mode"])
            batch = collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in kept[:4]])
            out["runs"].append(
                {
                    "tokenizer": tname,
                    "config": cfg,
                    "pad": pad,
                    "rows": [
                        {"idx": r["idx"], "prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]}
                        for r in kept
                    ],
                    "batch_of_first_4": {
                        "input_ids": batch["input_ids"].tolist(),
                        "attention_mask": batch["attention_mask"].tolist(),
                        "completion_mask": batch["completion_mask"].tolist(),
                    },
                }
            )
    # Conversational format: TRL applies the chat template itself (no EOS text is appended).
    for tname in ["bytelevel", "metaspace"]:
        tok = load_tok(tname)
        t = DPOTrainer.__new__(DPOTrainer)
        t._tokenizer = tok
        t._is_vision_dataset = False
        args = DPOConfig(output_dir=tempfile.mkdtemp(), max_length=1024, report_to=[], use_cpu=True, bf16=False)
        conv = [
            {
                "prompt": [{"role": "user", "content": c["prompt"]}],
                "chosen": [{"role": "assistant", "content": c["chosen"]}],
                "rejected": [{"role": "assistant", "content": c["rejected"]}],
                "idx": i,
            }
            for i, c in enumerate(cs)
        ]
        kept = list(t._prepare_dataset(Dataset.from_list(conv), tok, args, "train"))
        out["runs"].append(
            {
                "tokenizer": tname,
                "config": {"name": "current-chat", "max_length": 1024, "truncation_mode": "keep_start", "chat_template": True},
                "pad": tok.pad_token_id,
                "rows": [
                    {"idx": r["idx"], "prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]}
                    for r in kept
                ],
            }
        )
    write("current.json", out)


def gen_chat():
    import transformers

    msgs = [
        [{"role": "user", "content": "Hello there"}],
        [{"role": "user", "content": "  What is 2+2?  "}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    out = {"transformers": transformers.__version__, "cases": []}
    for tname in ["bytelevel", "metaspace"]:
        tok = load_tok(tname)
        for m in msgs:
            for gen in [False, True]:
                out["cases"].append(
                    {
                        "tokenizer": tname,
                        "messages": m,
                        "add_generation_prompt": gen,
                        "text": tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen),
                    }
                )
    write("chat.json", out)


if __name__ == "__main__":
    step = sys.argv[1]
    {"tokenizers": build_tokenizers, "classic": gen_classic, "current": gen_current, "chat": gen_chat}[step]()
