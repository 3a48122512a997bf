"""PyTorch side of the method benchmark (docs/perf.md, "Reference ReprPO methods (issue 17)"): the reference ReprPO
project's OWN code (wassname/repr-preference-optimization @ bd9ae63, imported from the pinned venv of
requirements-methods.txt, never copied), timed on the CPU at the shapes of the Rust benches.

    /work/venvs/reprpo-ref/bin/python tests/reference/bench_methods.py losses --threads 2 [--filter x2x64x]
    /work/venvs/reprpo-ref/bin/python tests/reference/bench_methods.py step --loss hs-ether-prefvec [--json F]

`losses` (the ids of crates/reprpo-losses/benches/methods.rs and crates/reprpo-models/benches/transforms.rs),
forward + backward, one JSON line per id: {"id", "median_s", "reps", ...} (median after warm-ups):
- method_{mse,prefvec,rank}/{set}{K}x{B}x{T}x{H}_{f32,bf16}: `Losses.<name>.value().c(pi_cho=, pi_rej=, ref_cho=,
  ref_rej=, batch=, transforms=NoneTransforms)` (its defaults), backward into the policy's activations and
  label log-probabilities. set `hs`: 3 keys of width H; `side`: 4 keys, o_proj (H) and down_proj (11H/4) of two
  layers. The chosen NLL that prefvec and rank compute from the logits with `cross_entropy_loss` is an input on
  the Rust side (the model crate's `unshifted_nll`, outside the loss), so here `cross_entropy_loss` is replaced,
  in those two modules only, by a function that returns the precomputed [B, T] NLL the output carries in its
  `logits` field: both sides time the same work.
- method_reduce/...: the reference's `reduce_tokens_w_attention` (imported) of every key of the four outputs, backward
  of the sum into the policy's activations: the first step of every loss; method_reduce_log_softmax/... the same
  after `.log_softmax(-1)`, as its rank loss's `preproc_hs` does.
- method_metrics/...: the extra metrics `PL_REPRPO_MODEL._loss_fn` computes around every loss (`compute_dpo_loss`
  of reprpo.interventions.dpo, imported, and `cosine_on_keys`, a closure inside `_loss_fn`, repeated below
  verbatim), forward only (no_grad, as there).
- transform_{ether,hra}_prefvec/hs3x{B}x{T}x{H}_{f32,bf16}: `Transforms.{ether,hra}.value().c(sizes, model=None)`
  (defaults) cast to the dtype as PL_REPRPO_MODEL casts it, passed as `transforms=` to prefvec; backward into the
  policy's tensors and the transform's parameters. HRA's `hra_u` is redrawn i.i.d. from U(+-1/sqrt(r/2)) (its
  init repeats every column; as the Rust bench does).
Inputs as the Rust benches: ref_c ~ N(0,1), ref_r = 0.6 ref_c + 0.8 N, pi_c = ref_c + 0.3 N, pi_r = ref_r + 0.3 N;
example b of B has its chosen mask left-padded by b*T//(4B) and its rejected mask right-padded by b*T//(3B)
(int64 masks, as the reference's collate makes them).

`step`: one training step of a method preset exactly as the reference trains it: a random LlamaForCausalLM of
the anchor's shape (../shared/anchors/pytorch_anchor.py PRESETS, sdpa attention, f32), PEFT LoRA r 16, alpha 16,
dropout 0 on the seven projections, the real `PL_REPRPO_MODEL` built from `experiment_configs[<loss>]` as
reprpo/training.py builds it, then per step its `_loss_fn(batch, model)` (two reference forwards without the
adapter, two policy forwards, transform, loss, metrics), `loss.backward()` and torch AdamW (lr 1e-4; the
reference trains with bitsandbytes' PagedAdam32bit, which needs CUDA) over the LoRA and transform parameters.
Batch: random ids, every token attended, chosen = first `pairs` rows. Median of --steps after --warmup.
"""

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import types
import warnings

import torch
from loguru import logger

logger.remove()
logger.add(sys.stderr, level="WARNING")
warnings.simplefilter("ignore")

# --- baukit: the real nethook.py without the package __init__ (as gen_methods_fixtures.py) -------------
_bk = importlib.util.find_spec("baukit")
_pkg = types.ModuleType("baukit")
_pkg.__path__ = list(_bk.submodule_search_locations)
_pkg.__file__ = _bk.origin
sys.modules["baukit"] = _pkg
import baukit.nethook  # noqa: E402,F401

import reprpo.interventions.losses.prefvec as prefvec_mod  # noqa: E402
import reprpo.interventions.losses.rank as rank_mod  # noqa: E402
from reprpo.interventions.dpo import compute_dpo_loss  # noqa: E402
from reprpo.interventions.losses import Losses  # noqa: E402
from reprpo.interventions.reprpo.helpers import reduce_tokens_w_attention  # noqa: E402
from reprpo.interventions.transforms import Transforms  # noqa: E402
from reprpo.interventions.types import ReprPOModelOutput  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
DT = {"f32": torch.float32, "bf16": torch.bfloat16}
REFERENCE_COMMIT = "bd9ae63aaa9255394aa1681eeaa48281d8c6885f"


def timeit(fn, warm, reps):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def emit(id_, med, reps):
    print(json.dumps({"id": id_, "median_s": med, "reps": reps, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "reference": REFERENCE_COMMIT}), flush=True)


# ------------------------------------------------------------------------------------------------------------
# losses and transforms


def precomputed_nll(logits, labels, attn):
    """Stands in for the reference's cross_entropy_loss: the output's `logits` field holds the [B, T] NLL."""
    return logits


def key_set(s, h):
    if s == "hs":
        return [(k, h) for k in ("2", "4", "6")]
    out = []
    for layer in (1, 2):
        out.append((f"model.layers.{layer}.self_attn.o_proj", h))
        out.append((f"model.layers.{layer}.mlp.down_proj", 11 * h // 4))
    return out


def masks(B, T):
    m_c = torch.zeros(B, T, dtype=torch.int64)
    m_r = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        m_c[b, b * T // (4 * B):] = 1
        m_r[b, : T - b * T // (3 * B)] = 1
    return m_c, m_r


def make_data(keys, B, T, dt):
    m_c, m_r = masks(B, T)
    hs = {r: {} for r in ("pi_cho", "pi_rej", "ref_cho", "ref_rej")}
    for k, h in keys:
        rc = torch.randn(B, T, h)
        rr = 0.6 * rc + 0.8 * torch.randn(B, T, h)
        hs["pi_cho"][k] = (rc + 0.3 * torch.randn(B, T, h)).to(dt).requires_grad_()
        hs["pi_rej"][k] = (rr + 0.3 * torch.randn(B, T, h)).to(dt).requires_grad_()
        hs["ref_cho"][k] = rc.to(dt)
        hs["ref_rej"][k] = rr.to(dt)
    lp = {
        "pi_cho": (torch.randn(B) * 5 - 100).to(dt).requires_grad_(),
        "pi_rej": (torch.randn(B) * 5 - 110).to(dt).requires_grad_(),
        "ref_cho": (torch.randn(B) * 5 - 101).to(dt),
        "ref_rej": (torch.randn(B) * 5 - 109).to(dt),
    }
    nll = {"pi_cho": (torch.rand(B, T) * 6 * m_c).to(dt), "ref_cho": (torch.rand(B, T) * 6 * m_c).to(dt)}
    mask = {"pi_cho": m_c, "ref_cho": m_c, "pi_rej": m_r, "ref_rej": m_r}
    leaves = [t for r in ("pi_cho", "pi_rej") for t in hs[r].values()] + [lp["pi_cho"], lp["pi_rej"]]
    return {"hs": hs, "lp": lp, "nll": nll, "mask": mask, "leaves": leaves}


def outputs(d):
    """Fresh ReprPOModelOutputs (the losses' `transforms` replace the dict entries in place)."""
    return {
        r: ReprPOModelOutput(hs=dict(d["hs"][r]), logits=d["nll"].get(r), label_logprobs=d["lp"][r], mask=d["mask"][r])
        for r in ("pi_cho", "pi_rej", "ref_cho", "ref_rej")
    }


def extra_metrics(pi_cho, pi_rej, ref_cho, ref_rej):
    """The metrics block of PL_REPRPO_MODEL._loss_fn (reprpo/interventions/reprpo/model.py), verbatim."""
    info = {}
    with torch.no_grad():
        _, info_dpo = compute_dpo_loss(
            pi_cho.label_logprobs,
            pi_rej.label_logprobs,
            ref_cho.label_logprobs,
            ref_rej.label_logprobs,
        )
        info["logits"] = info_dpo["logits"]
        info["chosen_rewards"] = info_dpo["chosen_rewards"]

        def cosine_on_keys(hs1, hs2):
            return torch.stack(
                [
                    torch.nn.functional.cosine_similarity(hs1[k], hs2[k], dim=-1).nanmean()
                    for k in hs1.keys()
                ]
            ).nanmean()

        info["retain_cosine"] = cosine_on_keys(pi_cho.hs, ref_cho.hs)
        info["rr_cosine"] = cosine_on_keys(pi_rej.hs, ref_cho.hs)
    return {**info, **info_dpo}


def make_transform(name, keys, dt):
    tr = getattr(Transforms, name).value().c({k: h for k, h in keys}, model=None).to(dt)
    if name == "hra":
        for _, p in tr.named_parameters():
            r = p.shape[1]
            bound = 1.0 / math.sqrt(r / 2)
            with torch.no_grad():
                p.copy_((torch.rand(p.shape) * 2 - 1) * bound)
    return tr


def run_losses(a):
    prefvec_mod.cross_entropy_loss = precomputed_nll
    rank_mod.cross_entropy_loss = precomputed_nll
    torch.manual_seed(0)
    none = Transforms.none.value().c({}, model=None)
    # One untimed pass first: the first autograd call of a process pays for lazy initialisation.
    x = torch.randn(8, requires_grad=True)
    (x * x).sum().backward()
    for (B, T, H), big in [((2, 64, 256), False), ((8, 512, 2048), True)]:
        warm, reps = (1, a.reps_big) if big else (3, a.reps_small)
        for s in ("hs", "side"):
            keys = key_set(s, H)
            sname = f"{s}{len(keys)}x{B}x{T}x{H}"
            for dn, dt in DT.items():
                ids = [f"method_{n}/{sname}_{dn}" for n in ("mse", "prefvec", "rank", "reduce", "reduce_log_softmax",
                                                            "metrics")]
                tids = [f"transform_{n}_prefvec/{sname}_{dn}" for n in ("ether", "hra")] if s == "hs" else []
                if not any(a.filter in i for i in ids + tids):
                    continue
                d = make_data(keys, B, T, dt)
                for name in ("mse", "prefvec", "rank"):
                    id_ = f"method_{name}/{sname}_{dn}"
                    if a.filter not in id_:
                        continue
                    cfg = getattr(Losses, name).value()

                    def step():
                        o = outputs(d)
                        loss, info = cfg.c(pi_cho=o["pi_cho"], pi_rej=o["pi_rej"], ref_cho=o["ref_cho"],
                                           ref_rej=o["ref_rej"], batch={"chosen": None, "chosen_mask": None},
                                           transforms=none)
                        loss.backward()
                        for t in d["leaves"]:
                            t.grad = None

                    emit(id_, timeit(step, warm, reps)[0], reps)
                for rname, pre in (("reduce", lambda x: x), ("reduce_log_softmax", lambda x: x.log_softmax(-1))):
                    id_ = f"method_{rname}/{sname}_{dn}"
                    if a.filter not in id_:
                        continue

                    def reduce():
                        total = 0
                        for r in ("pi_cho", "pi_rej", "ref_cho", "ref_rej"):
                            for x in d["hs"][r].values():
                                total = total + reduce_tokens_w_attention(pre(x), d["mask"][r]).sum()
                        total.backward()
                        for t in d["leaves"]:
                            t.grad = None

                    emit(id_, timeit(reduce, warm, reps)[0], reps)
                id_ = f"method_metrics/{sname}_{dn}"
                if a.filter in id_:
                    def metrics():
                        o = outputs(d)
                        info = extra_metrics(o["pi_cho"], o["pi_rej"], o["ref_cho"], o["ref_rej"])
                        # the values on the host, as a logging step reads them
                        [float(v) for v in info.values()]

                    emit(id_, timeit(metrics, warm, reps)[0], reps)
                for tname in ("ether", "hra"):
                    id_ = f"transform_{tname}_prefvec/{sname}_{dn}"
                    if s != "hs" or a.filter not in id_:
                        continue
                    tr = make_transform(tname, keys, dt)
                    cfg = Losses.prefvec.value()
                    params = [p for p in tr.parameters() if p.requires_grad]

                    def tstep():
                        o = outputs(d)
                        loss, info = cfg.c(pi_cho=o["pi_cho"], pi_rej=o["pi_rej"], ref_cho=o["ref_cho"],
                                           ref_rej=o["ref_rej"], batch={"chosen": None, "chosen_mask": None},
                                           transforms=tr)
                        loss.backward()
                        for t in d["leaves"] + params:
                            t.grad = None

                    r = a.reps_transform if big else reps
                    emit(id_, timeit(tstep, warm, r)[0], r)
                del d


# ------------------------------------------------------------------------------------------------------------
# one training step


def run_step(a):
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import reprpo.experiments as experiments
    from reprpo.interventions.dpo_projgrad import PL_ProjGrad_MODEL
    from reprpo.interventions.reprpo.model import PL_REPRPO_MODEL

    spec = importlib.util.spec_from_file_location("pytorch_anchor", a.anchor)
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    cfgd = anchor.PRESETS[a.preset]

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, attn_implementation="sdpa", **cfgd)
    model = LlamaForCausalLM(cfg)
    lcfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lcfg)
    ecfg = experiments.experiment_configs[a.loss][1]
    B, T, V = a.pairs, a.seq, cfgd["vocab_size"]
    model_kwargs = {k: getattr(ecfg, k) for k in ecfg._model_keys}
    pl = ecfg._cls(model, adam8bit=False, schedule="wsd", num_iterations=1, batch_size=B, **model_kwargs)
    assert type(pl) in (PL_REPRPO_MODEL, PL_ProjGrad_MODEL), type(pl)
    projgrad = type(pl) is PL_ProjGrad_MODEL
    if projgrad:
        # Its gradient rewrite runs in Lightning's on_after_backward hook, which logs its
        # fractions through the trainer: called directly here, the log is dropped.
        pl.log_dict = lambda d, **kw: None
    params = [p for p in pl.parameters() if p.requires_grad]
    n_transform = 0 if projgrad else sum(p.numel() for p in pl.transforms.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, V, (2 * B, T))
    ones = torch.ones(B, T, dtype=torch.int64)
    batch = {"chosen": ids[:B], "chosen_mask": ones, "rejected": ids[B:], "rejected_mask": ones}

    def step():
        loss, info = pl._loss_fn(batch, pl._model)
        loss.backward()
        if projgrad:
            pl.on_after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    ts = []
    loss = None
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        print(f"step {i + 1}/{a.warmup + a.steps}{' (warm-up)' if i < a.warmup else ''}: {dt:.3f} s",
              file=sys.stderr, flush=True)
        if i >= a.warmup:
            ts.append(dt)
    h = pl.hparams
    out = {
        "bench": "method-step", "loss_preset": a.loss, "preset": a.preset, "pairs": B, "seq": T,
        "steps": a.steps, "warmup": a.warmup, "step_s_median": statistics.median(ts), "step_s_min": min(ts),
        "step_s_max": max(ts), "loss": float(loss.detach()), "threads": torch.get_num_threads(),
        # projgrad: the modules whose gradients it rewrites; the method presets: the collected keys.
        "keys": len(list(pl.projgrad.enabled_modules())) if projgrad else len(set(h.layer_paths)),
        "collect_hs": None if projgrad else h.collect_hs,
        "transform": None if projgrad else type(h.transform).__name__,
        "transform_params": n_transform, "trainable_params": sum(p.numel() for p in params),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "reference": REFERENCE_COMMIT,
    }
    print(json.dumps(out), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["losses", "step"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--filter", default="")
    ap.add_argument("--reps-small", type=int, default=30)
    ap.add_argument("--reps-big", type=int, default=7)
    ap.add_argument("--reps-transform", type=int, default=5)
    ap.add_argument("--loss", default="hs-ether-prefvec")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--anchor", default=os.path.join(ROOT, "..", "shared", "anchors", "pytorch_anchor.py"))
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.mode == "losses":
        run_losses(a)
    else:
        run_step(a)


if __name__ == "__main__":
    main()
