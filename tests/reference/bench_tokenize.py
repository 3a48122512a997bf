"""Times TRL's own DPO dataset processing (tokenise every pair, then collate batches) on a JSONL of
pairs, for the side-by-side comparison in docs/perf.md (run by bench_tokenize.sh).

    python bench_tokenize.py train-tokenizer PAIRS.jsonl OUT_DIR   # a 16k byte-level BPE on the pairs' text
    python bench_tokenize.py classic PAIRS.jsonl TOKENIZER_DIR     # TRL 0.9.6 env: tokenize_row + DPO collator
    python bench_tokenize.py current PAIRS.jsonl TOKENIZER_DIR     # TRL 1.16.0 env: _prepare_dataset + collator

Prints one JSON line: pairs, seconds (best of --repeat after a warm-up), and a checksum (sum of the
collated input ids) that must equal the Rust side's.
"""

import json
import os
import sys
import tempfile
import time

REPEAT = int(os.environ.get("REPEAT", "3"))
BATCH = 8


def pairs(path):
    return [json.loads(l) for l in open(path)]


def train_tokenizer(path, out):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rows = pairs(path)
    text = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(
        vocab_size=16000, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(text, tr)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(out, exist_ok=True)
    p = os.path.join(out, "tokenizer.json")
    tok.save(p)
    j = json.load(open(p))
    j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    json.dump(j, open(p, "w"), ensure_ascii=False)
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, open(os.path.join(out, "tokenizer_config.json"), "w"))


def load_tok(d):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"), bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def classic(path, tokdir):
    import trl
    from datasets import Dataset
    from trl import DPOTrainer
    from trl.trainer.utils import DPODataCollatorWithPadding

    assert trl.__version__ == "0.9.6"
    tok = load_tok(tokdir)
    rows = pairs(path)
    t = DPOTrainer.__new__(DPOTrainer)
    t.tokenizer, t.is_encoder_decoder, t.is_vision_model = tok, False, False
    t.max_length, t.max_prompt_length, t.truncation_mode, t.label_pad_token_id = 512, 256, "keep_end", -100
    collator = DPODataCollatorWithPadding(pad_token_id=tok.pad_token_id, label_pad_token_id=-100, is_encoder_decoder=False)

    def once():
        ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        ds = ds.map(t.tokenize_row, load_from_cache_file=False, keep_in_memory=True)
        feats = ds.remove_columns(["prompt", "chosen", "rejected"]).to_list()
        checksum = 0
        for i in range(0, len(feats), BATCH):
            b = collator(feats[i : i + BATCH])
            cat = DPOTrainer.concatenated_inputs(b, is_encoder_decoder=False, label_pad_token_id=-100, padding_value=tok.pad_token_id, device="cpu")
            checksum += int(cat["concatenated_input_ids"].sum())
        return checksum

    return timed(once, len(rows))


def current(path, tokdir):
    import trl
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    assert trl.__version__ == "1.16.0"
    tok = load_tok(tokdir)
    rows = pairs(path)
    t = DPOTrainer.__new__(DPOTrainer)
    t._tokenizer, t._is_vision_dataset = tok, False
    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_length=1024, truncation_mode="keep_start", report_to=[], use_cpu=True, bf16=False)
    collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=1024, truncation_mode="keep_start")

    def once():
        ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        ds = t._prepare_dataset(ds, tok, args, "train")
        feats = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in ds]
        checksum = 0
        for i in range(0, len(feats), BATCH):
            checksum += int(collator(feats[i : i + BATCH])["input_ids"].sum())
        return checksum

    return timed(once, len(rows))


def timed(fn, n):
    import datasets

    datasets.disable_progress_bars()
    fn()
    best, checksum = float("inf"), None
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        checksum = fn()
        best = min(best, time.perf_counter() - t0)
    return {"pairs": n, "seconds": best, "pairs_per_second": n / best, "checksum": checksum}


if __name__ == "__main__":
    step, path, d = sys.argv[1:4]
    if step == "train-tokenizer":
        train_tokenizer(path, d)
    else:
        print(json.dumps({"classic": classic, "current": current}[step](path, d)))
