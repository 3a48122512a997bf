r"""Writes tests/fixtures/eval/: a tiny random Llama, a LoRA and a BOFT adapter on it (PEFT format), and the
per-choice log-probabilities that transformers + PEFT compute for a few multiple-choice items and preference
pairs, with the scores derived from them, for the Rust evaluation tests (crates/reprpo-eval/tests/all/reference.rs).

    /work/venvs/models/bin/python tests/reference/gen_eval_fixtures.py

Pins (tests/reference/requirements-models.txt): torch 2.15.0, transformers 5.23.0, peft 0.21.2. Nothing is
downloaded (HF_HUB_OFFLINE=1); every weight comes from fixed seeds; CPU, float32, one thread.

Model: LlamaForCausalLM, vocab 64, hidden 32, intermediate 48, 2 layers, 4 heads / 2 kv heads (head_dim 8),
rope_theta 1e4, untied lm_head, no BOS/EOS/pad. Weights: every parameter in sorted-name order from
torch.Generator(seed 2024): norms 1 + 0.1 N(0,1), others 0.3 N(0,1) (large enough that choices differ).
Adapters (task_type CAUSAL_LM, dropout 0, trainable parameters overwritten in sorted-name order):
  lora  LoraConfig(r=4, lora_alpha=8, target q,k,v,o,gate,up,down_proj); lora_A, lora_B ~ 0.3 N (seed 11)
  boft  BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target q,v,up_proj); boft_R ~ 0.3 N,
        boft_s ~ 1 + 0.1 N (seed 12). PEFT's CUDA butterfly extension is disabled (get_fbd_cuda -> None): the
        CPU path every machine here takes.

Items (token ids; random from fixed seeds, ids in [1, 64)): MC items with prompts of 2..9 tokens and 2..5
choices of 1..6 tokens each, one or several correct; pairs = (prompt, chosen, rejected).

Reference computation (per model: base, lora, boft, and each adapter under ``disable_adapter()``, which must
equal the base): for each choice, ONE unpadded forward of ``prompt + choice`` ([1, P + C], plain positions,
eager attention), ``log_softmax(logits[0, P-1 : P+C-1])`` gathered at the choice tokens and summed (float32 ->
float64 sum). So nothing in the reference shares a prompt, pads or batches: the Rust prefix-cache and padded
paths are both checked against plain sequential scoring.

Derived scores (float64, numpy; the formulas of crates/reprpo-eval/src/score.rs, computed independently here):
MC: p = softmax(l), prob_correct = sum_{correct} p, acc = argmax(l) in correct (first max), length-normalised
pbar = softmax(l / n), prob_correct_norm, acc_norm. Pairs: delta = l_w/n_w - l_l/n_l, prob = sigmoid(delta),
correct = delta > 0; DPO (beta 0.1) against the base: r_w = beta (l_w - l_w_base), r_l likewise, margin,
reward_correct = r_w > r_l.

Output: tests/fixtures/eval/model/{config.json, model.safetensors, adapters/{lora,boft}/{adapter_config.json,
adapter_model.safetensors}}, tests/fixtures/eval/expected.json (items, log-probabilities, scores). Two runs
give identical files (the last line prints a sha256 of the folder).
"""

import hashlib
import json
import math
import os
import shutil
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import peft
import transformers
from peft import BOFTConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.boft import layer as boft_layer
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "fixtures", "eval"))
EXPECTED_VERSIONS = {"torch": "2.15.0", "transformers": "5.23.0", "peft": "0.21.2"}
VOCAB = 64
BETA = 0.1

torch.set_num_threads(1)
boft_layer.get_fbd_cuda = lambda: None  # PEFT's CPU fallback, forced


def gen(seed):
    return torch.Generator().manual_seed(seed)


def items():
    g = gen(7)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    def n(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    mc = []
    for i in range(6):
        k = n(2, 5)
        choices = [ids(n(1, 6)) for _ in range(k)]
        correct = [0] if i % 2 == 0 else sorted({0, k - 1})  # MC1-like and MC2-like (several true)
        if i == 3:
            correct = [k - 1]
        mc.append({"id": f"mc/{i}", "prompt": ids(n(2, 9)), "choices": choices, "correct": correct})
    pairs = []
    for i in range(4):
        pairs.append({"id": f"pair/{i}", "prompt": ids(n(2, 9)), "chosen": ids(n(1, 6)), "rejected": ids(n(1, 6))})
    return mc, pairs


def make_base():
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, pad_token_id=None, bos_token_id=None, eos_token_id=None, use_cache=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    g = gen(2024)
    with torch.no_grad():
        for name, p in sorted(m.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.3 * noise)
    return m.eval()


def load_base(d):
    return LlamaForCausalLM.from_pretrained(d, attn_implementation="eager").eval()


@torch.no_grad()
def seq_logp(model, prompt, choice):
    ids = torch.tensor([prompt + choice])
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    p = len(prompt)
    lp = torch.log_softmax(logits[p - 1 : p + len(choice) - 1], dim=-1)
    picked = lp.gather(1, torch.tensor(choice).unsqueeze(1)).squeeze(1)
    return float(picked.double().sum())


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def mc_scores(l, n, correct):
    l = np.asarray(l)
    n = np.asarray(n, dtype=np.float64)
    p = softmax(l)
    pn = softmax(l / n)
    pred = int(np.argmax(l))  # first maximum
    return {
        "probs": p.tolist(),
        "prob_correct": float(p[correct].sum()),
        "prob_correct_norm": float(pn[correct].sum()),
        "pred": pred,
        "acc": pred in correct,
        "acc_norm": int(np.argmax(l / n)) in correct,
    }


def score_model(model, mc, pairs):
    out = {"mc": [], "pairs": []}
    for it in mc:
        l = [seq_logp(model, it["prompt"], c) for c in it["choices"]]
        n = [len(c) for c in it["choices"]]
        out["mc"].append({"logps": l, **mc_scores(l, n, it["correct"])})
    for pr in pairs:
        lw = seq_logp(model, pr["prompt"], pr["chosen"])
        ll = seq_logp(model, pr["prompt"], pr["rejected"])
        delta = lw / len(pr["chosen"]) - ll / len(pr["rejected"])
        out["pairs"].append({
            "logp_chosen": lw, "logp_rejected": ll, "delta": delta,
            "prob": 1.0 / (1.0 + math.exp(-delta)), "correct": delta > 0,
        })
    return out


def main():
    for k, v in EXPECTED_VERSIONS.items():
        have = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}[k]
        assert have.split("+")[0] == v, f"{k} {have} != pinned {v}"
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    model_dir = os.path.join(OUT, "model")
    base = make_base()
    base.save_pretrained(model_dir, safe_serialization=True)
    gc = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gc):
        os.remove(gc)
    base = load_base(model_dir)
    mc, pairs = items()
    result = {"base": score_model(base, mc, pairs)}

    specs = {
        "lora": (lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), 11),
        "boft": (lambda: BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, boft_dropout=0.0,
                                    target_modules=["q_proj", "v_proj", "up_proj"]), 12),
    }
    for name, (make_cfg, seed) in specs.items():
        d = os.path.join(model_dir, "adapters", name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = make_cfg()
            cfg.task_type = "CAUSAL_LM"
            m = get_peft_model(load_base(model_dir), cfg)
        m.peft_config["default"].base_model_name_or_path = "model"
        g = gen(seed)
        with torch.no_grad():
            for pname, p in sorted(m.named_parameters(), key=lambda kv: kv[0]):
                if not p.requires_grad:
                    continue
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
                p.copy_(1.0 + 0.1 * noise if ".boft_s." in pname else 0.3 * noise)
        m.save_pretrained(d, safe_serialization=True)
        readme = os.path.join(d, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        cp = os.path.join(d, "adapter_config.json")
        with open(cp) as f:
            cj = json.load(f)
        if isinstance(cj.get("target_modules"), list):
            cj["target_modules"] = sorted(cj["target_modules"])
        with open(cp, "w") as f:
            f.write(json.dumps(cj, indent=2, sort_keys=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = PeftModel.from_pretrained(load_base(model_dir), d).eval()
        scores = score_model(m, mc, pairs)
        with m.disable_adapter():
            off = score_model(m, mc, pairs)
        assert off == result["base"], f"{name}: adapter off != base"
        assert scores["mc"][0]["logps"] != result["base"]["mc"][0]["logps"], f"{name}: no effect"
        for s, b in zip(scores["pairs"], result["base"]["pairs"]):
            rw = BETA * (s["logp_chosen"] - b["logp_chosen"])
            rl = BETA * (s["logp_rejected"] - b["logp_rejected"])
            s.update({"reward_chosen": rw, "reward_rejected": rl, "reward_margin": rw - rl, "reward_correct": rw > rl})
        result[name] = scores
        print(f"  {name}: mc logps[0] = {scores['mc'][0]['logps']}")

    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"beta": BETA, "mc": mc, "pairs": pairs, "scores": result}, f, indent=1, sort_keys=True)
        f.write("\n")
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(OUT)):
        for fn in sorted(files):
            with open(os.path.join(root, fn), "rb") as f:
                h.update(fn.encode() + f.read())
    print(f"wrote {OUT}: sha256 {h.hexdigest()}")


if __name__ == "__main__":
    main()
