"""Writes tests/fixtures/train/: a tiny random Llama, two non-trivial PEFT adapters, four preference pairs
and the loss and metrics of the FIRST training step at learning rate 0 as computed by the Python references,
for crates/reprpo-train/tests/all/train_reference.rs.

    /work/venvs/cur/bin/python tests/reference/gen_train_fixtures.py

Environment: requirements-train.txt (trl 1.16.0, torch 2.15.0, transformers 5.24.0, peft 0.21.2). Nothing is
downloaded. Deterministic: every random number comes from a seeded generator, so rerunning rewrites the same
files (up to torch's CPU kernels).

What is written (all under tests/fixtures/train/):

model/       LlamaForCausalLM from a fixed LlamaConfig (vocab 259, hidden 32, 3 layers, 4 query heads, 2 key/value
             heads (GQA), intermediate 64, tied embeddings, default RoPE), weights ~ N(0, 0.1) (initializer_range),
             float32, `save_pretrained` (config.json + model.safetensors). tokenizer.json and
             tokenizer_config.json are NOT written here: they are the project's byte-level tokenizer
             (`reprpo_data::Tok::byte_level()`, ids 0 <pad>, 1 <s>, 2 </s>, 3..258 the bytes), written once by
             `cargo test -p reprpo-train --test all train_reference:: -- --ignored write_fixture_tokenizer`, and this
             script tokenises with that same tokenizer.json through the `tokenizers` library.
lora/        PEFT LoRA (r=4, lora_alpha=8, every linear layer of the decoder, dropout 0) with lora_A, lora_B
             overwritten by 0.2 N(0, 1) (B is not zero: the policy differs from the reference).
dora/        the same with use_dora=True; lora_magnitude_vector = its initial value * (1 + 0.1 N(0, 1)).
pairs.jsonl  4 preference pairs in the project's `pairs` format; datasets/train-fixture.toml is the recipe
             (`path = "pairs.jsonl"`, relative to the parent of datasets/, which is how reprpo-data resolves
             recipe paths).
expected.json  per case: the Rust overrides, the adapter, and the metrics of the first logged step.

How the batch is built (what the Rust trainer does): classic (TRL 0.9) tokenisation: prompt = <s> + bytes of the
prompt, completion = bytes of the completion + </s> (with a byte-level tokenizer enc(p + c) = enc(p) + enc(c),
asserted); no truncation (every sequence is far below max_length 512). One batch holding all 4 pairs, rows 0..3
the chosen sequences, rows 4..7 the rejected ones; prompts LEFT-padded to the longest prompt, completions
RIGHT-padded to the longest completion (pad id 0); attention_mask 1 on real tokens; completion_mask 1 on
completion tokens. The model is called without position_ids (transformers then uses 0..T-1 for every row) with
the attention mask, eager attention (finite mask values).

DPO types: TRL 1.16.0's own `DPOTrainer._compute_loss` runs on that batch, on an object made with
`DPOTrainer.__new__` holding the attributes the method reads, with the real PEFT model (fused LM head added by
TRL's `add_fused_lm_head`, as `DPOTrainer.__init__` does) and `precompute_ref_logps=False`: TRL itself does the
policy forward with the adapter on and the reference forward inside `use_adapter(model, None)` (adapter
disabled). The metrics are TRL's logged values (`rewards/*`, `logps/*`, `logits/*`); the loss is the returned
loss. As a cross-check, the summed log-probs are recomputed from a plain (unfused) forward and compared.

ReprPO: hidden states (`output_hidden_states`, transformers' convention: index 0 the embeddings, index i the
output of block i, the last one after the final norm) at the Rust default layers (round(n/3), round(2n/3),
round(0.8 n), clamped to [1, n], sorted, deduplicated: [1, 2] for n = 3) or the case's `reprpo.layers`, with the
adapter on (policy) and disabled (reference, no grad), split into chosen and rejected rows; masks = the attention
masks of those rows; progress 0 (the first step). The loss and its diagnostics come from the independent
PyTorch reference `reprpo()` of tests/reference/gen_reprpo_fixtures.py (imported), in float64 from the float32
hidden states; with `example_weights` the DPO margin z = (pi_c - pi_r) - (ref_c - ref_r) of the summed
completion log-probs (float64 from a plain forward).

grad_norm: the global L2 norm of the gradients of every trainable adapter tensor (lora_A, lora_B and, for DoRA,
lora_magnitude_vector) of that loss, before clipping. learning_rate: 0.
"""

import json
import math
import os
import sys
import types
import warnings
from collections import defaultdict
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_reprpo_fixtures as rref  # noqa: E402

OUT = os.path.normpath(os.path.join(HERE, "..", "fixtures", "train"))
MODEL = os.path.join(OUT, "model")

EXPECTED_VERSIONS = {"trl": "1.16.0", "torch": "2.15.0", "transformers": "5.24.0", "peft": "0.21.2"}

PAIRS = [
    (
        "User: How do I boil an egg?\nAssistant:",
        " Put it in boiling water for nine minutes, then cool it.",
        " Figure it out yourself.",
    ),
    ("Q: Name a colour.\nA:", " Blue.", " I will not answer that. Go away!"),
    (
        "User: Any tips for sleeping well?\nAssistant:",
        " Keep a regular schedule and a dark, quiet room.",
        " No.",
    ),
    ("Hi!", " Hello! How can I help you today?", " What now?"),
]

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name, adapter, Rust overrides, python config
CASES = [
    ("dpo_sigmoid_lora", "lora", ["loss=dpo"], dict(family="dpo", loss_type=["sigmoid"], beta=0.1)),
    ("ipo_lora", "lora", ["loss=ipo", "dpo.beta=0.1"], dict(family="dpo", loss_type=["ipo"], beta=0.1)),
    ("hinge_lora", "lora", ["loss=hinge", "dpo.beta=0.3"], dict(family="dpo", loss_type=["hinge"], beta=0.3)),
    (
        "mix_sigmoid_sft_lora",
        "lora",
        ["loss=dpo", 'dpo.loss_type=["sigmoid","sft"]', "dpo.loss_weights=[0.8,0.5]", "dpo.beta=0.2"],
        dict(family="dpo", loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.5], beta=0.2),
    ),
    ("dpo_sigmoid_dora", "dora", ["loss=dpo"], dict(family="dpo", loss_type=["sigmoid"], beta=0.1)),
    (
        "ld_alpha_sigmoid_lora",
        "lora",
        ["loss=dpo", "dpo.ld_alpha=0.5"],
        dict(family="dpo", loss_type=["sigmoid"], beta=0.1, ld_alpha=0.5),
    ),
    (
        "wpo_sigmoid_lora",
        "lora",
        ["loss=dpo", "dpo.use_weighting=true"],
        dict(family="dpo", loss_type=["sigmoid"], beta=0.1, use_weighting=True),
    ),
    ("reprpo_lora", "lora", ["loss=reprpo"], dict(family="reprpo")),
    ("reprpo_dora", "dora", ["loss=reprpo"], dict(family="reprpo")),
    (
        "reprpo_weights_lora",
        "lora",
        ["loss=reprpo", "reprpo.example_weights=true"],
        dict(family="reprpo", example_weights=True),
    ),
    (
        "reprpo_last_layer_lora",
        "lora",
        ["loss=reprpo", "reprpo.layers=[1,-1]"],
        dict(family="reprpo", layers=[1, -1]),
    ),
]


def check_versions():
    import peft
    import transformers
    import trl

    got = {"trl": trl.__version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
           "peft": peft.__version__}
    for k, v in EXPECTED_VERSIONS.items():
        assert got[k] == v, f"{k} {got[k]} != {v} (see requirements-train.txt)"
    return got


# ----------------------------------------------------------------------------------------------------------
# model, adapters, data
# ----------------------------------------------------------------------------------------------------------


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.1,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=False,
    )
    torch.manual_seed(3001)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        # RMSNorm weights are ones after init; make them non-trivial too
        g = torch.Generator().manual_seed(3002)
        for n, p in sorted(model.named_parameters()):
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    os.makedirs(MODEL, exist_ok=True)
    model.save_pretrained(MODEL, safe_serialization=True)
    gc = os.path.join(MODEL, "generation_config.json")
    if os.path.exists(gc):
        os.remove(gc)


def load_base():
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(MODEL, attn_implementation="eager", dtype=torch.float32)
    return m.eval()


def build_adapter(name, use_dora, seed):
    from peft import LoraConfig, get_peft_model

    d = os.path.join(OUT, name)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_ALL, use_dora=use_dora,
                     task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_base(), cfg)
    model.peft_config["default"].base_model_name_or_path = "model"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if not p.requires_grad:
                continue
            if "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(d, safe_serialization=True, save_embedding_layers=False)
    readme = os.path.join(d, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    path = os.path.join(d, "adapter_config.json")
    with open(path) as f:
        cj = json.load(f)
    cj["target_modules"] = sorted(cj["target_modules"])  # a set in peft: sort for a stable file
    with open(path, "w") as f:
        f.write(json.dumps(cj, indent=2, sort_keys=True))


def load_peft(name):
    from peft import PeftModel
    from trl.trainer.utils import add_fused_lm_head

    base = load_base()
    # as DPOTrainer.__init__ does (every per-token output TRL can ask for)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, os.path.join(OUT, name), is_trainable=True)
    return model.eval()


def write_data():
    with open(os.path.join(OUT, "pairs.jsonl"), "w") as f:
        for i, (p, c, r) in enumerate(PAIRS):
            row = {"id": f"train-fixture/{i + 1}", "prompt": p, "chosen": c, "rejected": r,
                   "source": {"dataset": "train-fixture", "row": i + 1}}
            f.write(json.dumps(row) + "\n")
    os.makedirs(os.path.join(OUT, "datasets"), exist_ok=True)
    with open(os.path.join(OUT, "datasets", "train-fixture.toml"), "w") as f:
        f.write(
            'description = "4 preference pairs for the first-step reference test '
            '(tests/reference/gen_train_fixtures.py)"\n'
            'converter = "pairs"\n\n[source]\n'
            "# relative to the parent of this datasets/ folder (tests/fixtures/train)\n"
            'path = "pairs.jsonl"\n'
        )


def make_batch():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    bos, eos, pad = tok.token_to_id("<s>"), tok.token_to_id("</s>"), tok.token_to_id("<pad>")
    assert (bos, eos, pad) == (1, 2, 0)
    seqs = {0: [], 1: []}
    for p, c, r in PAIRS:
        ep = tok.encode(p, add_special_tokens=False).ids
        for k, a in enumerate((c, r)):
            full = tok.encode(p + a, add_special_tokens=False).ids
            assert full[: len(ep)] == ep  # classic rule: the completion starts at len(enc(p))
            seqs[k].append(([bos] + ep, full[len(ep):] + [eos]))
    rows = seqs[0] + seqs[1]
    pmax = max(len(s[0]) for s in rows)
    cmax = max(len(s[1]) for s in rows)
    assert pmax + cmax < 512
    T = pmax + cmax
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    att = torch.zeros(len(rows), T, dtype=torch.long)
    comp = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (pr, co) in enumerate(rows):
        s = pmax - len(pr)
        ids[i, s:pmax] = torch.tensor(pr)
        ids[i, pmax:pmax + len(co)] = torch.tensor(co)
        att[i, s:pmax + len(co)] = 1
        comp[i, pmax:pmax + len(co)] = 1
    return ids, att, comp


# ----------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------


def plain_logps(model, ids, att, comp, adapter_on):
    """float64 summed completion log-probs from a plain (unfused) forward."""
    ctx = nullcontext() if adapter_on else model.disable_adapter()
    with torch.no_grad(), ctx:
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (lp * comp[:, 1:]).sum(1)


def adapter_grad_norm(model):
    sq = 0.0
    n = 0
    for _, p in model.named_parameters():
        if p.requires_grad:
            n += 1
            if p.grad is not None:  # None: the loss does not reach it (a block past the deepest hidden state)
                sq += float(p.grad.double().pow(2).sum())
    assert n > 0
    return math.sqrt(sq)


class Accel:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x

    def autocast(self):
        return nullcontext()

    def unwrap_model(self, m):
        return m


def trl_case(model, cfg, ids, att, comp):
    from trl import DPOTrainer

    t = DPOTrainer.__new__(DPOTrainer)
    t.model = model
    t.ref_model = None
    t.accelerator = Accel()
    t.args = types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None)
    t.loss_types = cfg["loss_type"]
    t.loss_weights = cfg.get("loss_weights") or [1.0] * len(t.loss_types)
    t.beta = cfg["beta"]
    t.label_smoothing = 0.0
    t.ld_alpha = cfg.get("ld_alpha")
    t.f_divergence_type = "reverse_kl"
    t.f_alpha_divergence_coef = 0.5
    t.use_weighting = cfg.get("use_weighting", False)
    t.precompute_ref_logps = False  # TRL runs the reference forward itself, adapter disabled
    t.aux_loss_enabled = False
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._total_train_tokens = 0
    t._tp_size = 1
    model.zero_grad(set_to_none=True)
    inputs = {"input_ids": ids, "attention_mask": att, "completion_mask": comp}
    loss = t._compute_loss(model, inputs, return_outputs=False)
    loss.backward()
    mode = "train" if model.training else "eval"
    keep = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected")
    metrics = {k: float(t._metrics[mode][k][-1]) for k in keep}
    metrics["loss"] = float(loss.detach())
    metrics["grad_norm"] = adapter_grad_norm(model)
    # cross-check TRL's summed log-probs against a plain forward (ld_alpha reweights them, skip then)
    if cfg.get("ld_alpha") is None:
        pol = plain_logps(model, ids, att, comp, True)
        b = ids.shape[0] // 2
        for name, v in (("logps/chosen", pol[:b].mean()), ("logps/rejected", pol[b:].mean())):
            assert abs(float(v) - metrics[name]) < 1e-4 * abs(float(v)), (name, float(v), metrics[name])
    return metrics


def default_layers(n):
    v = sorted({min(max(int(math.floor(f * n + 0.5)), 1), n) for f in (1 / 3, 2 / 3, 0.8)})
    return v


def reprpo_case(model, cfg, ids, att, comp):
    n_layers = model.config.num_hidden_layers
    layers = cfg.get("layers")
    layers = default_layers(n_layers) if layers is None else [i % (n_layers + 1) for i in layers]
    b = ids.shape[0] // 2
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), model.disable_adapter():
        ref_h = model(input_ids=ids, attention_mask=att, use_cache=False, output_hidden_states=True).hidden_states
    pol_h = model(input_ids=ids, attention_mask=att, use_cache=False, output_hidden_states=True).hidden_states
    pol = torch.stack([pol_h[i] for i in layers]).double()
    ref = torch.stack([ref_h[i] for i in layers]).double()
    inp = dict(
        policy_chosen=pol[:, :b],
        policy_rejected=pol[:, b:],
        reference_chosen=ref[:, :b],
        reference_rejected=ref[:, b:],
        chosen_mask=att[:b].double(),
        rejected_mask=att[b:].double(),
    )
    if cfg.get("example_weights"):
        pi = plain_logps(model, ids, att, comp, True)
        rf = plain_logps(model, ids, att, comp, False)
        inp["dpo_z"] = (pi[:b] - pi[b:]) - (rf[:b] - rf[b:])
    else:
        inp["dpo_z"] = torch.zeros(b, dtype=torch.float64)
    rcfg = dict(rref.DEFAULTS)
    rcfg["example_weights"] = bool(cfg.get("example_weights", False))
    # the reference's shape constants (module globals)
    rref.L, rref.B = len(layers), b
    loss, per_example, metrics = rref.reprpo(inp, rcfg, 0.0)
    loss.backward()
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["loss"] = float(loss.detach())
    metrics["grad_norm"] = adapter_grad_norm(model)
    return metrics, layers


def main():
    versions = check_versions()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if not os.path.exists(os.path.join(MODEL, "tokenizer.json")):
        sys.exit("tests/fixtures/train/model/tokenizer.json is missing: run the Rust writer first (see the doc)")
    build_model()
    build_adapter("lora", False, 3101)
    build_adapter("dora", True, 3102)
    write_data()
    ids, att, comp = make_batch()
    models = {name: load_peft(name) for name in ("lora", "dora")}
    # the adapters really change the model
    for name, m in models.items():
        on = plain_logps(m, ids, att, comp, True)
        off = plain_logps(m, ids, att, comp, False)
        assert float((on - off).abs().max()) > 1.0, (name, on - off)
    cases = []
    for name, adapter, overrides, cfg in CASES:
        m = models[adapter]
        extra = {}
        if cfg["family"] == "dpo":
            metrics = trl_case(m, cfg, ids, att, comp)
        else:
            metrics, layers = reprpo_case(m, cfg, ids, att, comp)
            extra["hidden_state_indices"] = layers
        metrics["learning_rate"] = 0.0
        cases.append(dict(name=name, adapter=adapter, overrides=overrides, config=cfg, metrics=metrics, **extra))
        print(f"{name:28s} " + "  ".join(f"{k} {v:.6g}" for k, v in sorted(metrics.items())))
    meta = dict(
        generator="tests/reference/gen_train_fixtures.py",
        versions=versions,
        batch=dict(
            rows=int(ids.shape[0]),
            seq_len=int(ids.shape[1]),
            input_ids=ids.tolist(),
            attention_mask=att.tolist(),
            completion_mask=comp.tolist(),
        ),
        cases=cases,
    )
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
