"""Writes tests/fixtures/train/reference_model.json: the first optimizer steps of DPO (sigmoid) from a
non-trivial LoRA adapter (`adapter.init_from`) with TRL 1.16.0's two references, for
crates/reprpo-train/tests/all/reference_model.rs (`adapter.reference`).

    /work/venvs/cur/bin/python tests/reference/gen_reference_fixtures.py

Environment: requirements-train.txt (trl 1.16.0, torch 2.15.0, transformers 5.24.0, peft 0.21.2), the same as
gen_train_fixtures.py, whose model, adapter (tests/fixtures/train/lora), pairs and batch this script reuses
(it imports that script and writes nothing else).

Cases:
- `initial`: what `DPOTrainer.__init__` does with a PEFT model and no `ref_model` (trl/trainer/dpo_trainer.py,
  "If the model is a PEFT model with a pretrained adapter, we need to create a 'ref' adapter that is a copy of
  the 'default' adapter"): `model.add_adapter("ref", default_config)` and every `.default.` parameter copied
  into its `.ref.` twin; TRL's `_compute_loss` then runs the reference forward inside
  `use_adapter(model, "ref")`. Step 1 has rewards 0 and loss ln 2.
- `base`: no "ref" adapter, so TRL's reference forward runs inside `use_adapter(model, None)`, i.e.
  `disable_adapter()` (the base model).

Each step: TRL's own `DPOTrainer._compute_loss` on the fixed batch (all 4 pairs, built as gen_train_fixtures.py
builds it), `backward`, the global L2 norm of the trained adapter's gradients (the "default" adapter's
parameters only: the "ref" copy is frozen), `torch.nn.utils.clip_grad_norm_` to `max_grad_norm`, then
`torch.optim.AdamW` (betas 0.9/0.999, eps 1e-8, weight decay 0; what transformers' Trainer builds) at a
constant learning rate (no warmup, `lr_scheduler_type="constant"`). Logged per step, as TRL logs them: loss,
rewards/*, logps/*, logits/*, grad_norm (before clipping), learning_rate. float32, one CPU thread,
deterministic algorithms.
"""

import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_train_fixtures as gtf  # noqa: E402

OUT = os.path.join(gtf.OUT, "reference_model.json")
STEPS = 10
LR = 5e-3
MAX_GRAD_NORM = 1.0
BETA = 0.1


def add_ref_copy(model):
    """DPOTrainer.__init__ (trl 1.16.0) for a PEFT model without ref_model: a frozen copy named "ref"."""
    default_config = model.peft_config["default"]
    model.add_adapter("ref", default_config)
    for name, param in model.named_parameters():
        if ".default." in name:
            ref_param = model.get_parameter(name.replace(".default.", ".ref."))
            ref_param.data.copy_(param.data)
    assert model.active_adapter == "default"


def trained_params(model):
    return [p for n, p in sorted(model.named_parameters()) if ".default." in n and p.requires_grad]


def trajectory(reference, ids, att, comp):
    model = gtf.load_peft("lora")
    if reference == "initial":
        add_ref_copy(model)
    params = trained_params(model)
    for n, p in model.named_parameters():
        if ".ref." in n:
            p.requires_grad_(False)  # frozen (never in the optimizer, no gradient)
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    cfg = dict(family="dpo", loss_type=["sigmoid"], beta=BETA)
    steps = []
    for step in range(1, STEPS + 1):
        opt.zero_grad(set_to_none=True)
        # gen_train_fixtures.trl_case: TRL's _compute_loss + backward + metrics (grad norm of every
        # parameter that requires grad: the "default" adapter's)
        m = gtf.trl_case(model, cfg, ids, att, comp)
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        assert abs(float(norm) - m["grad_norm"]) <= 1e-5 * m["grad_norm"], (float(norm), m["grad_norm"])
        opt.step()
        m["learning_rate"] = LR
        m["step"] = step
        steps.append(m)
        print(f"{reference:8s} step {step:2d} " + "  ".join(f"{k} {v:.6g}" for k, v in sorted(m.items())))
    if reference == "initial":
        assert steps[0]["rewards/chosen"] == 0.0 and steps[0]["rewards/rejected"] == 0.0, steps[0]
        assert abs(steps[0]["loss"] - math.log(2.0)) < 1e-7, steps[0]["loss"]
    return steps


def main():
    versions = gtf.check_versions()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    ids, att, comp = gtf.make_batch()
    overrides = [
        "loss=dpo",
        f"dpo.beta={BETA}",
        f"train.lr={LR}",
        "train.schedule=constant",
        "train.warmup_ratio=0",
        "train.warmup_steps=0",
        "train.weight_decay=0",
        "train.adam_beta1=0.9",
        "train.adam_beta2=0.999",
        "train.adam_eps=1e-8",
        f"train.max_grad_norm={MAX_GRAD_NORM}",
        f"train.max_steps={STEPS}",
    ]
    cases = []
    for reference in ("initial", "base"):
        steps = trajectory(reference, ids, att, comp)
        cases.append(dict(reference=reference, adapter="lora", overrides=overrides + [f"adapter.reference={reference}"],
                          steps=steps))
    meta = dict(generator="tests/reference/gen_reference_fixtures.py", versions=versions, cases=cases)
    with open(OUT, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
