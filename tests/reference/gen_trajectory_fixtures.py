"""Writes tests/fixtures/train/trajectory.json and trajectory_adapters.safetensors: whole training trajectories
(every optimizer step's logged values, and the adapter after the last step) of the reference trainers, for
crates/reprpo-train/tests/all/trajectory.rs, which runs the Rust trainer with the same settings.

    /work/venvs/cur/bin/python tests/reference/gen_trajectory_fixtures.py

Environment: requirements-train.txt (trl 1.16.0, torch 2.15.0, transformers 5.24.0, accelerate 1.15.0,
peft 0.21.2), the same as gen_train_fixtures.py, whose tiny Llama, LoRA adapter (tests/fixtures/train/lora) and
batch layout this script reuses (it imports that script, gen_reference_fixtures.py and gen_reprpo_fixtures.py and
writes only the two files above). float32, one CPU thread, deterministic algorithms.

Data (every case): the first two of the fixture pairs (gen_train_fixtures.PAIRS; the JSON holds them, and the
Rust test writes them to a `pairs` file), batch size 1 and gradient accumulation 2 (batch size 2 for per-example
weights), so that every optimizer step sees both pairs, once, whatever order they come in: the Rust trainer draws
a seeded permutation per epoch (it has no "no shuffle" setting) and transformers' Trainer its own, and the sum of
two gradients or metrics does not depend on the order (with batch size 2 each micro-batch holds both pairs).
Classic tokenisation (<s> + prompt bytes, completion bytes + </s>); a micro-batch is laid out as the Rust trainer
lays it out (prompts left-padded, completions right-padded: gen_train_fixtures.make_batch's rows, with the
columns that are padding in every row of the micro-batch cut off); the model is called without position_ids.

Cases (the `overrides` of each are the Rust settings; this script reads its own settings from the same constants):

- `dpo_initial`: TRL 1.16.0's own `DPOTrainer(...).train()` (transformers' Trainer: its data loader and
  collator, gradient accumulation with the loss divided by the accumulation steps, `clip_grad_norm_`,
  `torch.optim.AdamW` (`optim="adamw_torch"`), `get_cosine_schedule_with_warmup`, logging) on the PEFT model
  with the fixture LoRA adapter, no `ref_model`: DPOTrainer adds its frozen "ref" copy of the initial adapter and
  uses it as the reference (the Rust `adapter.reference = "initial"`, its default with `adapter.init_from`).
  TRL tokenises the two pairs itself; its token ids are asserted equal to the classic layout above. 20 steps,
  learning rate 5e-3, 3 warm-up steps then cosine decay (step 1 has learning rate 0: transformers' schedule),
  beta 0.1, sigmoid loss, `max_grad_norm` 1.0 (it clips at steps 1-4 and not after; every case asserts that its
  limit is crossed at some steps and not at others). Logged per step, TRL's values (`trainer.state.log_history`):
  loss, grad_norm, learning_rate, rewards/*, logps/*, logits/* (not TRL's entropy, num_tokens and
  mean_token_accuracy, which the Rust trainer does not log).
- `dpo_base`: the same with the "ref" adapter deleted after `DPOTrainer.__init__`, so that TRL's reference
  forward runs inside `use_adapter(model, None)`, i.e. `disable_adapter()` (Rust `adapter.reference = "base"`).
- `reprpo_schedule`, `reprpo_circuit_breakers`, `reprpo_weights`: the original ReprPO (L2 distances, the Rust
  default layers [1, 2] of 3) from the fixture LoRA adapter, 20 steps, in a plain PyTorch loop written from the
  project's documented formulas:
  * learning rate of 0-based step t of T with w warm-up steps (crates/reprpo-train/src/optim/schedule.rs, as
    transformers): lr t / w for t < w, else lr (1 + cos(pi (t - w) / (T - w))) / 2;
  * training progress p = t / T (0 at the first step; crates/reprpo-train/src/trainer.rs), which drives the
    coefficients of crates/reprpo-losses/src/reprpo.rs: schedule `reprpo` c_rr = 1 - p/2, c_retain = p/2,
    loss = c_rr L_rr + alpha c_retain L_retain; `circuit-breakers` c_rr = alpha (1 - p), c_retain = alpha p,
    loss = c_rr L_rr + c_retain L_retain. The loss itself is gen_reprpo_fixtures.reprpo() (independent plain
    PyTorch, float64 from the float32 hidden states, transformers' `output_hidden_states`);
  * per micro-batch: backward of loss / accumulation steps (gradients summed); per step: the global norm and
    `torch.nn.utils.clip_grad_norm_`, then `torch.optim.AdamW` at that step's learning rate; logged: the means
    over the micro-batches of the loss and its diagnostics, the norm before clipping, the learning rate.
  `reprpo_schedule`: schedule reprpo, alpha 3, reference the base (adapter off); `reprpo_circuit_breakers`:
  schedule circuit-breakers, alpha 0.5, reference the initial adapter (the frozen "ref" copy that
  gen_reference_fixtures.add_ref_copy makes, as TRL does), weight decay 0.05; `reprpo_weights`: per-example
  weights (w = softmax(-s z) over the micro-batch's pairs, z the DPO margin of the summed completion log-probs,
  float64 from a plain forward; batch size 2, so each micro-batch holds both pairs and the two accumulated
  gradients are those of the same batch), schedule reprpo, alpha 3, reference the base, weight scale s = 0.25
  (the default 30 saturates the softmax here, |z_1 - z_2| is about 8, and would make the weights 0 and 1: asserted
  that the smaller weight stays above 0.02).
- `sft`: 10 steps of SFT from the fixture LoRA adapter, the same loop with the loss of
  crates/reprpo-train/src/objective.rs: the token mean of -log p over the completion tokens of the chosen
  sequences of a micro-batch (each micro-batch's own mean, then the mean over the accumulated micro-batches; TRL's
  SFTTrainer would divide by the tokens of the whole accumulated batch instead).
- `full_dpo`: 10 steps of full fine-tuning (Rust `adapter.kind = "full"`: a dense delta on every linear layer of
  the decoder, zero at the start; embeddings, norms and the tied head frozen) with DPO against the base, by TRL's
  `DPOTrainer(...).train()` on the plain model whose embeddings and norms are frozen (training W is training
  W + delta, since dL/dW = dL/d delta; weight decay 0), the reference model TRL loads itself from the model
  folder. The final adapter is W - W0 per layer.

trajectory_adapters.safetensors: `<case>/<PEFT tensor name>` -> the trained adapter after the last step (the
"default" adapter's tensors as `get_peft_model_state_dict` names them; full_dpo: `<module>.full_delta.weight`).
"""

import json
import math
import os
import sys
import warnings
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_reference_fixtures as grf  # noqa: E402
import gen_reprpo_fixtures as rref  # noqa: E402
import gen_train_fixtures as gtf  # noqa: E402

OUT_JSON = os.path.join(gtf.OUT, "trajectory.json")
OUT_ADAPTERS = os.path.join(gtf.OUT, "trajectory_adapters.safetensors")

N_PAIRS = 2
PAIRS = gtf.PAIRS[:N_PAIRS]
GRAD_ACCUM = 2
ADAM = dict(betas=(0.9, 0.999), eps=1e-8)

# name, method, settings
CASES = [
    ("dpo_initial", "trl_dpo",
     dict(steps=20, lr=5e-3, warmup=3, max_grad_norm=1.0, batch_size=1, weight_decay=0.0, beta=0.1,
          reference="initial", adapter="lora")),
    ("dpo_base", "trl_dpo",
     dict(steps=20, lr=5e-3, warmup=3, max_grad_norm=1.0, batch_size=1, weight_decay=0.0, beta=0.1,
          reference="base", adapter="lora")),
    ("reprpo_schedule", "loop",
     dict(steps=20, lr=2e-3, warmup=3, max_grad_norm=8.0, batch_size=1, weight_decay=0.0, loss="reprpo",
          schedule="reprpo", alpha=3.0, example_weights=False, reference="base", adapter="lora")),
    ("reprpo_circuit_breakers", "loop",
     dict(steps=20, lr=2e-3, warmup=3, max_grad_norm=3.0, batch_size=1, weight_decay=0.05, loss="reprpo",
          schedule="circuit-breakers", alpha=0.5, example_weights=False, reference="initial", adapter="lora")),
    ("reprpo_weights", "loop",
     dict(steps=20, lr=2e-3, warmup=3, max_grad_norm=15.0, batch_size=2, weight_decay=0.0, loss="reprpo",
          schedule="reprpo", alpha=3.0, example_weights=True, weight_scale=0.25, reference="base",
          adapter="lora")),
    ("sft", "loop",
     dict(steps=10, lr=5e-3, warmup=2, max_grad_norm=2.5, batch_size=1, weight_decay=0.0, loss="sft",
          reference="base", adapter="lora")),
    ("full_dpo", "trl_dpo",
     dict(steps=10, lr=1e-3, warmup=2, max_grad_norm=1.0, batch_size=1, weight_decay=0.0, beta=0.1,
          reference="base", adapter="full")),
]


def overrides(s):
    """The Rust settings of a case (the test adds the model, the data and the run folder)."""
    o = [
        f"train.max_steps={s['steps']}",
        f"train.lr={s['lr']}",
        "train.schedule=cosine",
        f"train.warmup_steps={s['warmup']}",
        f"train.max_grad_norm={s['max_grad_norm']}",
        f"train.batch_size={s['batch_size']}",
        f"train.grad_accum={GRAD_ACCUM}",
        f"train.weight_decay={s['weight_decay']}",
        f"train.adam_beta1={ADAM['betas'][0]}",
        f"train.adam_beta2={ADAM['betas'][1]}",
        f"train.adam_eps={ADAM['eps']}",
        f"adapter.reference={s['reference']}",
    ]
    if s["adapter"] == "lora":
        o.append("adapter.init_from=lora")  # the test makes it tests/fixtures/train/lora
    else:
        o += ["adapter.kind=full", "adapter.target_modules=[\"all-linear\"]"]
    if "beta" in s:
        o += ["loss=dpo", f"dpo.beta={s['beta']}"]
    elif s["loss"] == "sft":
        o.append("loss=sft")
    else:
        o += ["loss=reprpo", "reprpo.variant=original", f"reprpo.schedule={s['schedule']}",
              f"reprpo.alpha={s['alpha']}", f"reprpo.example_weights={str(s['example_weights']).lower()}"]
        if "weight_scale" in s:
            o.append(f"reprpo.weight_scale={s['weight_scale']}")
    return o


def lr_at(s, t):
    """The learning rate of 0-based step t (schedule.rs / transformers' cosine schedule with warm-up)."""
    w, total, peak = s["warmup"], s["steps"], s["lr"]
    if t < w:
        return peak * t / max(w, 1)
    q = (t - w) / max(total - w, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * q))


# ----------------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------------


def micro_batch(full, pairs):
    """Rows of `pairs` (chosen, then rejected) of gen_train_fixtures.make_batch's batch, the columns that are
    padding in all of them cut off: the Rust trainer's layout of a micro-batch of these pairs."""
    ids, att, comp = full
    n = ids.shape[0] // 2
    rows = list(pairs) + [n + i for i in pairs]
    ids, att, comp = ids[rows], att[rows], comp[rows]
    real = att.sum(0) > 0
    cols = torch.nonzero(real).flatten()
    lo, hi = int(cols.min()), int(cols.max()) + 1
    return ids[:, lo:hi], att[:, lo:hi], comp[:, lo:hi]


def step_micro_batches(full, batch_size):
    """The micro-batches of one optimizer step: every pair once (batch size 1: one each; 2: both, twice)."""
    if batch_size == 1:
        return [micro_batch(full, [i]) for i in range(N_PAIRS)]
    assert batch_size == N_PAIRS
    return [micro_batch(full, list(range(N_PAIRS))) for _ in range(GRAD_ACCUM)]


# ----------------------------------------------------------------------------------------------------------
# TRL's DPOTrainer
# ----------------------------------------------------------------------------------------------------------


def trl_dpo(name, s, full):
    from datasets import Dataset
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(gtf.MODEL)
    ds = Dataset.from_list([dict(prompt=p, chosen=c, rejected=r) for p, c, r in PAIRS])
    base = gtf.load_base()
    if s["adapter"] == "lora":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(base, os.path.join(gtf.OUT, "lora"), is_trainable=True)
        w0 = frozen0 = None
    else:
        model = base
        for n, p in model.named_parameters():
            # the decoder's linear layers train; embeddings (tied to the head) and norms stay frozen
            p.requires_grad_(n.endswith("proj.weight"))
        w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        frozen0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = DPOConfig(
        output_dir=os.path.join("/tmp", "gen_trajectory_fixtures", name),
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=GRAD_ACCUM,
        max_steps=s["steps"],
        learning_rate=s["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=s["warmup"],
        max_grad_norm=s["max_grad_norm"],
        weight_decay=s["weight_decay"],
        adam_beta1=ADAM["betas"][0],
        adam_beta2=ADAM["betas"][1],
        adam_epsilon=ADAM["eps"],
        optim="adamw_torch",
        beta=s["beta"],
        loss_type=["sigmoid"],
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    # TRL's tokenisation of the two pairs is the classic layout of one pair per micro-batch
    for i, row in enumerate(tr.train_dataset):
        ids, att, comp = micro_batch(full, [i])
        c = ids[0][att[0] > 0].tolist()
        r = ids[1][att[1] > 0].tolist()
        assert row["prompt_ids"] + row["chosen_ids"] == c, (row, c)
        assert row["prompt_ids"] + row["rejected_ids"] == r, (row, r)
        assert len(row["prompt_ids"]) == int((comp[0] == 0).logical_and(att[0] > 0).sum())
    if s["adapter"] == "lora":
        peft_model = tr.model
        if s["reference"] == "base":
            peft_model.delete_adapter("ref")
            assert "ref" not in peft_model.peft_config and peft_model.active_adapter == "default"
        else:
            assert "ref" in peft_model.peft_config
    else:
        assert tr.ref_model is not None  # the base, loaded by TRL from the model folder
    tr.train()
    steps = []
    for h in tr.state.log_history:
        if "loss" not in h:
            continue
        keep = {k: float(v) for k, v in h.items()
                if k in ("loss", "grad_norm", "learning_rate") or k.startswith(("rewards/", "logps/", "logits/"))}
        keep["step"] = int(h["step"])
        steps.append(keep)
    assert [m["step"] for m in steps] == list(range(1, s["steps"] + 1))
    for t, m in enumerate(steps):
        assert abs(m["learning_rate"] - lr_at(s, t)) <= 1e-12 * s["lr"], (t, m["learning_rate"], lr_at(s, t))
    norms = [m["grad_norm"] for m in steps]
    assert any(n > s["max_grad_norm"] for n in norms) and any(n < s["max_grad_norm"] for n in norms), norms
    if s["reference"] == "initial":
        assert steps[0]["rewards/chosen"] == 0.0 and abs(steps[0]["loss"] - math.log(2)) < 1e-6
    if s["adapter"] == "lora":
        sd = get_peft_model_state_dict(tr.model, adapter_name="default")
        final = {k: v.detach().float().contiguous().clone() for k, v in sd.items()}
    else:
        for n, p in tr.model.named_parameters():
            if n in frozen0:
                assert torch.equal(p.detach(), frozen0[n]), f"{n} moved"
        final = {}
        for n, p in tr.model.named_parameters():
            if n in w0:
                key = "base_model.model." + n[: -len(".weight")] + ".full_delta.weight"
                final[key] = (p.detach() - w0[n]).contiguous().clone()
    return steps, final


# ----------------------------------------------------------------------------------------------------------
# plain PyTorch loop (ReprPO, SFT)
# ----------------------------------------------------------------------------------------------------------


def reference_ctx(model, reference):
    """The reference forward: the frozen copy of the initial adapter ("ref"), or the adapter off."""
    from trl.trainer.utils import use_adapter

    return use_adapter(model, "ref" if reference == "initial" else None)


def seq_logps(model, ids, att, comp, ctx):
    """float64 summed completion log-probs from a plain forward, no gradient."""
    with torch.no_grad(), ctx:
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (lp * comp[:, 1:]).sum(1)


def reprpo_loss(model, s, batch, progress):
    ids, att, comp = batch
    layers = gtf.default_layers(model.config.num_hidden_layers)
    b = ids.shape[0] // 2
    with torch.no_grad(), reference_ctx(model, s["reference"]):
        ref_h = model(input_ids=ids, attention_mask=att, use_cache=False, output_hidden_states=True).hidden_states
    pol_h = model(input_ids=ids, attention_mask=att, use_cache=False, output_hidden_states=True).hidden_states
    pol = torch.stack([pol_h[i] for i in layers]).double()
    ref = torch.stack([ref_h[i] for i in layers]).double()
    inp = dict(policy_chosen=pol[:, :b], policy_rejected=pol[:, b:], reference_chosen=ref[:, :b],
               reference_rejected=ref[:, b:], chosen_mask=att[:b].double(), rejected_mask=att[b:].double())
    if s["example_weights"]:
        pi = seq_logps(model, ids, att, comp, nullcontext())
        rf = seq_logps(model, ids, att, comp, reference_ctx(model, s["reference"]))
        inp["dpo_z"] = (pi[:b] - pi[b:]) - (rf[:b] - rf[b:])
    else:
        inp["dpo_z"] = torch.zeros(b, dtype=torch.float64)
    cfg = dict(rref.DEFAULTS, variant="original", schedule=s["schedule"], alpha=s["alpha"],
               example_weights=s["example_weights"])
    if "weight_scale" in s:
        cfg["weight_scale"] = s["weight_scale"]
    rref.L, rref.B = len(layers), b  # the reference's shape constants (module globals)
    loss, _, metrics = rref.reprpo(inp, cfg, progress)
    if s["example_weights"]:
        w = torch.softmax(-cfg["weight_scale"] * inp["dpo_z"], dim=0)
        assert float(w.min()) > 0.02, w  # not saturated: the scale matters
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def sft_loss(model, batch):
    ids, att, comp = batch
    assert ids.shape[0] == 2  # one pair: its chosen row, no padding once the rejected row's is cut off
    b = ids.shape[0] // 2
    ids, att, comp = ids[:b], att[:b], comp[:b]  # the chosen sequences
    real = att.sum(0) > 0
    cols = torch.nonzero(real).flatten()
    ids, att, comp = ids[:, : int(cols.max()) + 1], att[:, : int(cols.max()) + 1], comp[:, : int(cols.max()) + 1]
    logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = comp[:, 1:].double()
    loss = -(lp * m).sum() / m.sum()
    return loss, {"loss": float(loss.detach()), "nll_loss": float(loss.detach())}


def loop(name, s, full):
    model = gtf.load_peft("lora")
    if s["reference"] == "initial":
        grf.add_ref_copy(model)
    params = grf.trained_params(model)
    for n, p in model.named_parameters():
        if ".ref." in n:
            p.requires_grad_(False)
    model.train()  # LoRA dropout is 0: the same values as eval
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"], **ADAM)
    steps = []
    for t in range(s["steps"]):
        lr = lr_at(s, t)
        for g in opt.param_groups:
            g["lr"] = lr
        progress = t / s["steps"]
        opt.zero_grad(set_to_none=True)
        sums = {}
        batches = step_micro_batches(full, s["batch_size"])
        for batch in batches:
            if s["loss"] == "sft":
                loss, metrics = sft_loss(model, batch)
            else:
                loss, metrics = reprpo_loss(model, s, batch, progress)
            (loss / GRAD_ACCUM).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        # the same parameter set on both sides: every trained tensor that got a gradient
        norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], s["max_grad_norm"])
        opt.step()
        m = {k: v / len(batches) for k, v in sums.items()}
        m.update(grad_norm=float(norm), learning_rate=lr, step=t + 1)
        steps.append(m)
    norms = [m["grad_norm"] for m in steps]
    assert any(n > s["max_grad_norm"] for n in norms) and any(n < s["max_grad_norm"] for n in norms), norms
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name="default")
    final = {k: v.detach().float().contiguous().clone() for k, v in sd.items()}
    return steps, final


def main():
    from safetensors.torch import save_file

    versions = gtf.check_versions()
    import accelerate

    assert accelerate.__version__ == "1.15.0", accelerate.__version__
    versions["accelerate"] = accelerate.__version__
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    full = gtf.make_batch()
    only = set(sys.argv[1:])
    cases, tensors = [], {}
    for name, method, s in CASES:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        steps, final = (trl_dpo if method == "trl_dpo" else loop)(name, s, full)
        for k, v in final.items():
            tensors[f"{name}/{k}"] = v
        trainer = "TRL 1.16.0 DPOTrainer.train()" if method == "trl_dpo" else "plain PyTorch loop"
        cases.append(dict(name=name, reference=trainer, settings=s, overrides=overrides(s), steps=steps))
        for m in steps:
            print(f"{name:24s} " + "  ".join(f"{k} {v:.6g}" for k, v in sorted(m.items())))
    meta = dict(
        generator="tests/reference/gen_trajectory_fixtures.py",
        versions=versions,
        pairs=[dict(id=f"trajectory/{i + 1}", prompt=p, chosen=c, rejected=r) for i, (p, c, r) in enumerate(PAIRS)],
        cases=cases,
    )
    if only:
        print("(a subset: nothing written)")
        return
    with open(OUT_JSON, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    save_file(tensors, OUT_ADAPTERS)
    os.chmod(OUT_ADAPTERS, 0o644)


if __name__ == "__main__":
    main()
