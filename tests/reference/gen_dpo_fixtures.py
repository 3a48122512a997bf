"""Writes tests/fixtures/losses/: inputs, losses, metrics and gradients of the DPO family of losses as
computed by TRL's OWN code, for crates/reprpo-losses/tests/all/dpo_trl.rs.

Two steps, each in its own pinned environment (see requirements-losses.txt):

    <trl 1.16.0 env>/python gen_dpo_fixtures.py current   # -> dpo.safetensors + dpo.json
    <trl 0.23.1 env>/python gen_dpo_fixtures.py classic   # -> dpo_classic.safetensors + dpo_classic.json

`current` runs `DPOTrainer._compute_loss` of TRL 1.16.0 (where every loss type, the mixtures, LD-DPO,
the f-divergences and WPO weighting are computed), on an object made with `DPOTrainer.__new__` that holds
only the attributes that method reads, and a stand-in "model" whose forward returns the per-token
log-probabilities (leaf tensors with requires_grad), entropies and mean logits that TRL's fused LM head
would return. Reference log-probs go through TRL's precomputed-reference path (`ref_chosen_logps`
in the batch), made by TRL's own `compute_ref_log_probs` (which applies the LD-DPO split).

`classic` runs `DPOTrainer.get_batch_loss_metrics` of TRL 0.23.1 (its `dpo_loss`, `rpo_alpha` and the
`RunningMoments` of bco_pair) with `concatenated_forward` replaced by a stand-in returning the summed
log-probs, `nll_loss` = mean token NLL of the chosen completions (what its cross-entropy computes)
and the mean logits. These are the pre-1.x behaviours TRL 1.16 dropped: label smoothing in `sigmoid`
(cDPO), the running reward mean of `bco_pair`, and `rpo_alpha`.

All per-token log-probs are multiples of 1/64 so every sum is exact in f32; TRL runs in float32.
Nothing is downloaded.
"""

import json
import os
import sys
import types
from collections import defaultdict
from contextlib import nullcontext

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "losses")

B = 5  # examples per batch
T = 12  # sequence length (prompt + completion + padding)


def make_batch(gen, with_wpo=False):
    """Random per-token log-probs and completion masks for B chosen + B rejected sequences."""
    n = 2 * B
    completion_mask = torch.zeros(n, T, dtype=torch.long)
    attention_mask = torch.zeros(n, T, dtype=torch.long)
    for i in range(n):
        p = int(torch.randint(1, 4, (1,), generator=gen))  # prompt length >= 1
        c = int(torch.randint(1, T - p + 1, (1,), generator=gen))  # completion length >= 1
        attention_mask[i, : p + c] = 1
        completion_mask[i, p : p + c] = 1
    # per-token log-probs of the label at positions 1..T-1 (shifted), multiples of 1/64 in [-4, -1/64]
    k = torch.randint(1, 257, (2, n, T - 1), generator=gen).float()
    policy_tok = -k[0] / 64.0
    ref_tok = -k[1] / 64.0
    shift = completion_mask[:, 1:].float()
    policy_tok = policy_tok * shift
    ref_tok = ref_tok * shift
    mean_logits = torch.randint(-64, 65, (n, T - 1), generator=gen).float() / 32.0
    log_sum_sq = None
    if with_wpo:
        log_sum_sq = -torch.randint(1, 129, (n, T - 1), generator=gen).float() / 64.0
    return dict(
        completion_mask=completion_mask,
        attention_mask=attention_mask,
        policy_tok=policy_tok,
        ref_tok=ref_tok,
        mean_logits=mean_logits,
        log_sum_sq=log_sum_sq,
    )


def lengths_and_tails(completion_mask, tok):
    """Per-sequence completion length, full sum and the sum beyond the shared length (LD-DPO's tail)."""
    shift = completion_mask[:, 1:]
    pos = shift.cumsum(1)
    lens = shift.sum(1)
    c, r = lens.chunk(2)
    shared = torch.minimum(c, r).repeat(2)
    tail_mask = (pos > shared.unsqueeze(1)).float()
    return lens.float(), tok.sum(1), (tok * tail_mask).sum(1)


# ----------------------------------------------------------------------------------------------------
# TRL 1.16.0
# ----------------------------------------------------------------------------------------------------


def run_current():
    import trl
    from trl import DPOTrainer

    assert trl.__version__ == "1.16.0", trl.__version__

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

    class FakeModel:
        """Returns what TRL's fused LM head returns, from fixed per-token tensors."""

        training = True
        is_gradient_checkpointing = False

        def __init__(self, log_probs, mean_logits, log_sum_sq):
            self.log_probs = log_probs
            self.mean_logits = mean_logits
            self.log_sum_sq = log_sum_sq

        def __call__(self, **kw):
            n, t1 = self.log_probs.shape
            return types.SimpleNamespace(
                log_probs=self.log_probs,
                entropy=torch.zeros(n, t1),
                mean_logits=self.mean_logits,
                is_top1=torch.zeros(n, t1, dtype=torch.bool),
                log_sum_sq_probs=self.log_sum_sq,
                aux_loss=None,
            )

    def trainer(cfg, model):
        t = DPOTrainer.__new__(DPOTrainer)
        t.model = model
        t.ref_model = None
        t.accelerator = Accel()
        t.args = types.SimpleNamespace(
            discopop_tau=cfg.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None
        )
        lt = cfg.get("loss_type", ["sigmoid"])
        t.loss_types = lt if isinstance(lt, list) else [lt]
        t.loss_weights = cfg.get("loss_weights") or [1.0] * len(t.loss_types)
        t.beta = cfg.get("beta", 0.1)
        t.label_smoothing = cfg.get("label_smoothing", 0.0)
        t.ld_alpha = cfg.get("ld_alpha")
        t.f_divergence_type = cfg.get("f_divergence_type", "reverse_kl")
        t.f_alpha_divergence_coef = cfg.get("f_alpha_divergence_coef", 0.5)
        t.use_weighting = cfg.get("use_weighting", False)
        t.precompute_ref_logps = True
        t.aux_loss_enabled = False
        t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        t._total_train_tokens = 0
        t._tp_size = 1
        return t

    cases = [
        ("sigmoid", {"loss_type": "sigmoid", "beta": 0.1}),
        ("sigmoid_beta05_ls_ignored", {"loss_type": "sigmoid", "beta": 0.5, "label_smoothing": 0.2}),
        ("hinge", {"loss_type": "hinge", "beta": 0.3}),
        ("ipo", {"loss_type": "ipo", "beta": 0.1}),
        ("exo_pair", {"loss_type": "exo_pair", "beta": 0.2, "label_smoothing": 1e-3}),
        ("nca_pair", {"loss_type": "nca_pair", "beta": 0.2}),
        ("robust", {"loss_type": "robust", "beta": 0.2, "label_smoothing": 0.1}),
        ("bco_pair", {"loss_type": "bco_pair", "beta": 0.2}),
        ("sppo_hard", {"loss_type": "sppo_hard", "beta": 0.5}),
        ("aot", {"loss_type": "aot", "beta": 0.2, "label_smoothing": 0.1}),
        ("aot_unpaired", {"loss_type": "aot_unpaired", "beta": 0.2, "label_smoothing": 0.05}),
        ("apo_zero", {"loss_type": "apo_zero", "beta": 0.2}),
        ("apo_down", {"loss_type": "apo_down", "beta": 0.2}),
        ("discopop", {"loss_type": "discopop", "beta": 0.2, "discopop_tau": 0.05}),
        ("discopop_tau1", {"loss_type": "discopop", "beta": 0.1, "discopop_tau": 1.0}),
        ("sft", {"loss_type": "sft"}),
        ("sigmoid_norm", {"loss_type": "sigmoid_norm", "beta": 2.0}),
        ("mix_mpo", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "beta": 0.2}),
        ("mix_ipo_hinge", {"loss_type": ["ipo", "hinge"], "loss_weights": [0.5, 2.0], "beta": 0.3}),
        ("mix_default_weights", {"loss_type": ["apo_zero", "nca_pair"], "beta": 0.2}),
        ("ld_alpha_sigmoid", {"loss_type": "sigmoid", "beta": 0.2, "ld_alpha": 0.5}),
        ("ld_alpha_zero_ipo", {"loss_type": "ipo", "beta": 0.1, "ld_alpha": 0.0}),
        ("ld_alpha_mix", {"loss_type": ["sigmoid", "sft"], "beta": 0.2, "ld_alpha": 0.25}),
        ("f_forward_kl", {"loss_type": "sigmoid", "beta": 0.2, "f_divergence_type": "forward_kl"}),
        ("f_js", {"loss_type": "sigmoid", "beta": 0.2, "f_divergence_type": "js_divergence"}),
        ("f_alpha", {"loss_type": "sigmoid", "beta": 0.2, "f_divergence_type": "alpha_divergence"}),
        (
            "f_alpha_coef_1_5_hinge",
            {"loss_type": "hinge", "beta": 0.2, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.5},
        ),
        (
            "f_alpha_coef_1_limit",
            {"loss_type": "sigmoid", "beta": 0.2, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
        ),
        ("f_js_ipo", {"loss_type": "ipo", "beta": 0.1, "f_divergence_type": "js_divergence"}),
        ("f_forward_kl_sigmoid_norm", {"loss_type": "sigmoid_norm", "beta": 1.0, "f_divergence_type": "forward_kl"}),
        ("f_js_exo_robust", {"loss_type": ["exo_pair", "robust"], "beta": 0.2, "label_smoothing": 0.1, "f_divergence_type": "js_divergence"}),
        ("f_forward_kl_discopop_sft", {"loss_type": ["discopop", "sft"], "beta": 0.2, "f_divergence_type": "forward_kl"}),
        ("wpo_sigmoid", {"loss_type": "sigmoid", "beta": 0.2, "use_weighting": True}),
        ("wpo_mix", {"loss_type": ["ipo", "sigmoid"], "beta": 0.2, "use_weighting": True}),
        # the first step of DPO: policy == reference, every log-ratio exactly 0 (kinks of |x|, min, relu)
        ("sigmoid_at_reference", {"loss_type": "sigmoid", "beta": 0.1, "_reference_is_policy": True}),
        (
            "mix_at_reference",
            {"loss_type": ["nca_pair", "bco_pair", "discopop", "apo_down"], "beta": 0.1, "_reference_is_policy": True},
        ),
    ]

    tensors = {}
    meta = {"trl": trl.__version__, "torch": torch.__version__, "cases": []}
    for ci, (name, cfg) in enumerate(cases):
        gen = torch.Generator().manual_seed(1000 + ci)
        wpo = cfg.get("use_weighting", False)
        d = make_batch(gen, with_wpo=wpo)
        if cfg.get("_reference_is_policy"):
            d["ref_tok"] = d["policy_tok"].clone()
        cm = d["completion_mask"]
        shift = cm[:, 1:].float()
        policy_leaf = d["policy_tok"].clone().requires_grad_(True)
        ref_model = FakeModel(d["ref_tok"], d["mean_logits"], d["log_sum_sq"])
        t = trainer(cfg, ref_model)
        inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": d["attention_mask"], "completion_mask": cm}
        ref_c, ref_r = t.compute_ref_log_probs(ref_model, inputs)  # TRL's own reference path (LD split)
        ref_c = ref_c.detach().clone().requires_grad_(True)
        ref_r = ref_r.detach().clone().requires_grad_(True)
        model = FakeModel(policy_leaf * shift, d["mean_logits"], d["log_sum_sq"])
        t = trainer(cfg, model)
        batch = dict(inputs, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
        loss = t._compute_loss(model, batch, return_outputs=False)
        loss.backward()
        for leaf in (policy_leaf, ref_c, ref_r):
            if leaf.grad is None:  # e.g. sft never reads the reference
                leaf.grad = torch.zeros_like(leaf)
        metrics = {k: v[-1] for k, v in t._metrics["train"].items() if k not in ("num_tokens", "entropy", "mean_token_accuracy")}

        lens, pol_sum, pol_tail = lengths_and_tails(cm, d["policy_tok"])
        _, ref_sum, ref_tail = lengths_and_tails(cm, d["ref_tok"])
        # TRL's gradient w.r.t. the weighted log-prob g of a sequence sits on each of its shared tokens;
        # tail tokens get ld_alpha * g. With logp = sum - (1 - ld_alpha) * tail, d/dsum = g, d/dtail = -(1 - a) g.
        first = cm[:, 1:].float().argmax(1)
        g_pol = policy_leaf.grad.gather(1, first.unsqueeze(1)).squeeze(1)
        a = cfg.get("ld_alpha")
        p = f"{name}."
        pc, pr = pol_sum.chunk(2)
        rc_s, rr_s = ref_sum.chunk(2)
        lc, lr = lens.chunk(2)
        tensors[p + "policy_chosen_logps"] = pc
        tensors[p + "policy_rejected_logps"] = pr
        tensors[p + "reference_chosen_logps"] = rc_s
        tensors[p + "reference_rejected_logps"] = rr_s
        tensors[p + "chosen_tokens"] = lc
        tensors[p + "rejected_tokens"] = lr
        ml = (d["mean_logits"] * shift).sum(1)
        tensors[p + "chosen_logits_sum"], tensors[p + "rejected_logits_sum"] = ml.chunk(2)
        gc, gr = g_pol.chunk(2)
        tensors[p + "grad_policy_chosen_logps"] = gc
        tensors[p + "grad_policy_rejected_logps"] = gr
        tensors[p + "grad_reference_chosen_logps"] = ref_c.grad
        tensors[p + "grad_reference_rejected_logps"] = ref_r.grad
        if a is not None:
            ptc, ptr = pol_tail.chunk(2)
            rtc, rtr = ref_tail.chunk(2)
            tensors[p + "policy_chosen_tail"] = ptc
            tensors[p + "policy_rejected_tail"] = ptr
            tensors[p + "reference_chosen_tail"] = rtc
            tensors[p + "reference_rejected_tail"] = rtr
            # TRL's per-token gradient is dS on a shared token and dS + dT on a tail token (sum S, tail T).
            # Sequences without a tail (the shorter of a pair) carry NaN: TRL's graph has no such input.
            last = (cm[:, 1:].float() * torch.arange(T - 1)).argmax(1)
            g_last = policy_leaf.grad.gather(1, last.unsqueeze(1)).squeeze(1)
            has_tail = pol_tail != 0
            nan = torch.full_like(g_pol, float("nan"))
            dt = torch.where(has_tail, g_last - g_pol, nan)
            tensors[p + "grad_policy_chosen_tail"], tensors[p + "grad_policy_rejected_tail"] = dt.chunk(2)
            # the reference enters only through logp = S - (1 - a) T (its LD split by TRL's compute_ref_log_probs)
            tensors[p + "grad_reference_chosen_tail"] = torch.where(rtc != 0, -(1 - a) * ref_c.grad, float("nan"))
            tensors[p + "grad_reference_rejected_tail"] = torch.where(rtr != 0, -(1 - a) * ref_r.grad, float("nan"))
        if wpo:
            with torch.no_grad():
                aligned = ((d["policy_tok"] - d["log_sum_sq"]) * shift).sum(1) / lens.clamp_min(1)
            tensors[p + "chosen_wpo_log_weight"], tensors[p + "rejected_wpo_log_weight"] = aligned.chunk(2)
        tensors[p + "loss"] = loss.detach().reshape(())
        rust_cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        meta["cases"].append({"name": name, "config": rust_cfg, "batches": [""], "metrics": [metrics]})
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, os.path.join(OUT, "dpo.safetensors"))
    with open(os.path.join(OUT, "dpo.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {len(meta['cases'])} cases, {len(tensors)} tensors")


# ----------------------------------------------------------------------------------------------------
# TRL 0.23.1 (the pre-1.x extras: cDPO label smoothing, bco_pair running mean, rpo_alpha)
# ----------------------------------------------------------------------------------------------------


def run_classic():
    import trl
    from trl import DPOTrainer
    from trl.trainer.utils import RunningMoments

    assert trl.__version__ == "0.23.1", trl.__version__

    class Accel:
        device = torch.device("cpu")
        use_distributed = False

        def gather_for_metrics(self, x):
            return x

    def trainer(cfg):
        t = DPOTrainer.__new__(DPOTrainer)
        t.accelerator = Accel()
        t.args = types.SimpleNamespace(
            discopop_tau=0.05, rpo_alpha=cfg.get("rpo_alpha"), use_liger_loss=False
        )
        lt = cfg.get("loss_type", "sigmoid")
        t.loss_type = lt if isinstance(lt, list) else [lt]
        t.loss_weights = cfg.get("loss_weights")
        t.beta = cfg.get("beta", 0.1)
        t.label_smoothing = cfg.get("label_smoothing", 0.0)
        t.reference_free = False
        t.f_divergence_type = "reverse_kl"
        t.f_divergence_params = {}
        t.use_weighting = False
        t.aux_loss_enabled = False
        t.running = RunningMoments(t.accelerator)
        return t

    cases = [
        ("cdpo_sigmoid", {"loss_type": "sigmoid", "beta": 0.2, "label_smoothing": 0.1, "cdpo": True}, 1),
        ("bco_pair_running_mean", {"loss_type": "bco_pair", "beta": 0.2, "bco_running_mean": True}, 2),
        ("rpo_alpha", {"loss_type": "sigmoid", "beta": 0.1, "rpo_alpha": 1.0}, 1),
        ("rpo_alpha_bco", {"loss_type": "bco_pair", "beta": 0.3, "rpo_alpha": 0.5, "bco_running_mean": True}, 3),
    ]
    tensors = {}
    meta = {"trl": trl.__version__, "torch": torch.__version__, "cases": []}
    for ci, (name, cfg, nb) in enumerate(cases):
        gen = torch.Generator().manual_seed(2000 + ci)
        t = trainer(cfg)
        all_metrics, batches = [], []
        for bi in range(nb):
            d = make_batch(gen)
            cm = d["completion_mask"]
            shift = cm[:, 1:].float()
            lens, pol_sum, _ = lengths_and_tails(cm, d["policy_tok"])
            _, ref_sum, _ = lengths_and_tails(cm, d["ref_tok"])
            pol = pol_sum.clone().requires_grad_(True)
            ref = ref_sum.clone().requires_grad_(True)
            pc, pr = pol.chunk(2)
            rc, rr = ref.chunk(2)
            lc, lr = lens.chunk(2)
            ml = (d["mean_logits"] * shift).sum(1)
            mlc, mlr = ml.chunk(2)

            def fake_forward(model, batch, pc=pc, pr=pr, lc=lc, mlc=mlc, mlr=mlr, lr=lr):
                # what concatenated_forward returns: summed log-probs, the chosen tokens' mean
                # cross-entropy, and the mean logits over completion tokens
                return {
                    "chosen_logps": pc,
                    "rejected_logps": pr,
                    "nll_loss": -pc.sum() / lc.sum(),
                    "mean_chosen_logits": mlc.sum() / lc.sum(),
                    "mean_rejected_logits": mlr.sum() / lr.sum(),
                }

            t.concatenated_forward = fake_forward
            loss, metrics = t.get_batch_loss_metrics(None, {"ref_chosen_logps": rc, "ref_rejected_logps": rr})
            loss.backward()
            # per-example loss: TRL's dpo_loss itself (a second call would update the running mean,
            # so bco_pair's is left out)
            p = f"{name}.{bi}."
            tensors[p + "policy_chosen_logps"] = pc.detach()
            tensors[p + "policy_rejected_logps"] = pr.detach()
            tensors[p + "reference_chosen_logps"] = rc.detach()
            tensors[p + "reference_rejected_logps"] = rr.detach()
            tensors[p + "chosen_tokens"] = lc
            tensors[p + "rejected_tokens"] = lr
            tensors[p + "chosen_logits_sum"] = mlc
            tensors[p + "rejected_logits_sum"] = mlr
            gp, gref = pol.grad.chunk(2), ref.grad.chunk(2)
            tensors[p + "grad_policy_chosen_logps"] = gp[0]
            tensors[p + "grad_policy_rejected_logps"] = gp[1]
            tensors[p + "grad_reference_chosen_logps"] = gref[0]
            tensors[p + "grad_reference_rejected_logps"] = gref[1]
            tensors[p + "loss"] = loss.detach().reshape(())
            if cfg["loss_type"] == "sigmoid":
                with torch.no_grad():
                    per, _, _ = t.dpo_loss(pc, pr, rc, rr, "sigmoid", fake_forward(None, None))
                    if cfg.get("rpo_alpha") is not None:
                        per = per + cfg["rpo_alpha"] * (-pc.sum() / lc.sum())
                tensors[p + "per_example"] = per
            all_metrics.append({k: v for k, v in metrics.items()} | {"running_mean": t.running.mean})
            batches.append(f"{bi}.")
        meta["cases"].append({"name": name, "config": cfg, "batches": batches, "metrics": all_metrics})
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, os.path.join(OUT, "dpo_classic.safetensors"))
    with open(os.path.join(OUT, "dpo_classic.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {len(meta['cases'])} cases, {len(tensors)} tensors")


if __name__ == "__main__":
    torch.manual_seed(0)
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "current":
        run_current()
    elif mode == "classic":
        run_classic()
    else:
        sys.exit(__doc__)
