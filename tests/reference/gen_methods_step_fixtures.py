"""Writes tests/fixtures/methods/step.{safetensors,json}: the reference's first optimisation step (lr 0: loss,
metrics and gradients, no update) of two ReprPO presets and of the gradient interventions projgrad / projbp, on
the tiny PEFT Llama of tests/fixtures/methods/tiny_llama/ (issue 17).

Everything numeric is computed by the reference code itself, imported (never copied) from the pinned checkout of
wassname/repr-preference-optimization @ bd9ae63aaa9255394aa1681eeaa48281d8c6885f (baukit @
9d51abd51ebf29769aecc38c4cbef459b731a36e), installed --no-deps into the venv of requirements-methods.txt:

    PYTHONHASHSEED=0 /work/venvs/reprpo-ref/bin/python tests/reference/gen_methods_step_fixtures.py

(The script re-executes itself with PYTHONHASHSEED=0 if it is not set: side-mode layer paths come from
`list(set(...))`.) CPU, float32, one thread, eager attention, torch.use_deterministic_algorithms(True), seeded
generators; two runs give byte-identical files. Nothing is downloaded. The tiny model and its adapter are read
as gen_taps_fixtures.py saved them (not regenerated): LlamaForCausalLM vocab 64, hidden 32, 4 layers, 4 heads /
2 kv heads of 8 (q_proj 32 -> 32, v_proj 32 -> 16), intermediate 48, untied head; PEFT LoRA r 4, alpha 8,
rslora (scale 4), dropout 0, q_proj/v_proj, lora_B non-zero.

How the reference is driven:
- method_step (hs-ether-prefvec, side-none-rank, and one non-preset hs-ether-prefvec variant): the configs are
  taken by name from `reprpo.experiments.experiment_configs`; the real `PL_REPRPO_MODEL` is constructed exactly
  as reprpo/training.py does (`cfg._cls(model, adam8bit=False, schedule="wsd", num_iterations=1, batch_size=B,
  **{k: getattr(cfg, k) for k in cfg._model_keys})`) on the PEFT-wrapped tiny model, after
  `torch.manual_seed(seed)` so that `transform.c(sizes, model=...)` draws a fixed init. Then the real
  `_loss_fn(batch, model)` runs (the real `reprpo_forward_baukit`: baukit TraceDict / output_hidden_states, the
  adapter disabled for the reference forwards) and `loss.backward()`. `reprpo_forward_baukit` is wrapped in the
  model module only to keep a detached copy of what it returns (for the margin checks below); the wrapper calls
  the real function and returns its result unchanged.
- projgrad: the real `PL_ProjGrad_MODEL` (its `ProjGradHooks` forward hooks cache the LoRA wrapper outputs), its
  `_loss_fn` (= `compute_gradproj_loss_batch`), one `loss.backward()`, the LoRA gradients are read ("before"),
  then the real `on_after_backward()` runs with the instance's `log_dict` replaced by a function that records
  its dict (proj_frac / nproj_frac), and the gradients are read again ("after").
- projbp: the real `PL_GradBP_MODEL` (`ProjBPHooks`: forward hooks plus full backward pre-hooks that rewrite the
  gradient at each LoRA wrapper output during backward), its `_loss_fn`, one `loss.backward()` ("after"). The
  hooks cannot be bypassed inside that model, so "before" is the plain DPO gradient of the reference's
  `reprpo.interventions.dpo.compute_dpo_loss_batch` on a freshly loaded model (same loss, no hooks); the script
  checks that it is bit-identical to the projgrad "before" gradients (same DPO, forward-only hooks).
Each case loads a fresh PeftModel (is_trainable=True) from tiny_llama/ and tiny_llama/adapter/.

Margin checks (nothing they compute is stored): the batch is re-drawn (next seed from 20250611) until every
sink-filter decision of every reduce_tokens_w_attention call is at least MARGIN_SINK (relative; MARGIN_SINK_RANK
for rank) from its threshold (except where all token norms are exactly 0: the degenerate hs-ether-prefvec below), |z| and
|pi_c - pi_r| > MARGIN_Z, |beta*theta| < MAX_BETA_THETA in rank, and, for the non-degenerate prefvec case, the
per-example 1e5*loss_proj (where prefvec applies abs()) is away from 0.

Imports: `import baukit` runs widget modules (torchvision, PIL) that the reference does not use, so a bare
`baukit` package object pointing at the installed package directory is put in sys.modules and the real
`baukit/nethook.py` is imported from it (nothing of baukit is copied); same as the sibling scripts.
"""

import os
import sys

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
import zlib  # noqa: E402

import torch  # noqa: E402
from loguru import logger  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

logger.remove()
logger.add(sys.stderr, level="WARNING")
warnings.simplefilter("ignore")

# --- baukit: the real nethook.py without the package __init__ (see docstring) ---------------------------
_bk = importlib.util.find_spec("baukit")
_pkg = types.ModuleType("baukit")
_pkg.__path__ = list(_bk.submodule_search_locations)
_pkg.__file__ = _bk.origin
sys.modules["baukit"] = _pkg
import baukit.nethook  # noqa: E402,F401

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import reprpo.experiments as experiments  # noqa: E402
import reprpo.interventions.losses.mse as mse_mod  # noqa: E402
import reprpo.interventions.losses.prefvec as prefvec_mod  # noqa: E402
import reprpo.interventions.losses.rank as rank_mod  # noqa: E402
import reprpo.interventions.reprpo.model as model_mod  # noqa: E402
from reprpo.interventions.dpo import compute_dpo_loss_batch  # noqa: E402
from reprpo.interventions.dpo_projbp import PL_GradBP_MODEL, ProjBPConfig, ProjBPHooks  # noqa: E402
from reprpo.interventions.dpo_projgrad import PL_ProjGrad_MODEL, ProjGradConfig  # noqa: E402
from reprpo.interventions.losses import Losses  # noqa: E402
from reprpo.interventions.reprpo.config import ReprPOConfig  # noqa: E402
from reprpo.interventions.reprpo.model import (  # noqa: E402
    PL_REPRPO_MODEL,
    parse_collection_layers,
)
from reprpo.interventions.transforms import Transforms  # noqa: E402
from reprpo.interventions.types import ReprPOModelOutput  # noqa: E402

REFERENCE_COMMIT = "bd9ae63aaa9255394aa1681eeaa48281d8c6885f"
BAUKIT_COMMIT = "9d51abd51ebf29769aecc38c4cbef459b731a36e"

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "methods")
MODEL_DIR = os.path.join(OUT, "tiny_llama")
ADAPTER_DIR = os.path.join(MODEL_DIR, "adapter")
PREFIX = "base_model.model."

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.set_default_dtype(torch.float32)

B, T, PROMPT = 3, 16, 5
VOCAB, N_LAYERS = 64, 4
BOS, EOS = 1, 2
PAD = EOS  # the reference pads with the tokenizer's pad token, or EOS when there is none
LEN_CHO = [16, 12, 9]  # real lengths, prompt included (right padding)
LEN_REJ = [14, 16, 7]

MARGIN_SINK = 1e-4
MARGIN_SINK_RANK = 2e-5  # rank filters log-softmax vectors, whose norms are nearly equal (see the notes)
MARGIN_Z = 1e-3
MAX_BETA_THETA = 30.0
MARGIN_PROJ = 1e-3

TENSORS = {}


class MarginError(Exception):
    pass


def need(cond, msg):
    if not cond:
        raise MarginError(msg)


def put(name, t):
    assert name not in TENSORS, name
    TENSORS[name] = t.detach().contiguous().clone()


def crc(s):
    return zlib.crc32(s.encode()) & 0x7FFFFFFF


def strip(name):
    assert name.startswith(PREFIX), name
    return name[len(PREFIX):]


# ----------------------------------------------------------------------------------------------------------
# batch and model


def make_batch(seed):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (B, PROMPT), generator=g)
    prompt[:, 0] = BOS
    out = {}
    for side, lens in (("chosen", LEN_CHO), ("rejected", LEN_REJ)):
        ids = torch.randint(3, VOCAB, (B, T), generator=g)
        ids[:, :PROMPT] = prompt
        mask = torch.zeros(B, T, dtype=torch.int64)
        for b, n in enumerate(lens):
            mask[b, :n] = 1
        out[side] = torch.where(mask.bool(), ids, torch.full_like(ids, PAD))
        out[side + "_mask"] = mask
    # the shared prefix is exactly PROMPT tokens long
    for b in range(B):
        if out["chosen"][b, PROMPT] == out["rejected"][b, PROMPT]:
            out["rejected"][b, PROMPT] = 3 + (out["rejected"][b, PROMPT] - 3 + 1) % (VOCAB - 3)
    return out


def load_policy():
    base = LlamaForCausalLM.from_pretrained(MODEL_DIR, attn_implementation="eager", torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, ADAPTER_DIR, is_trainable=True)
    assert model.dtype == torch.float32
    return model


def lora_grads(model):
    """{adapter-file key without PEFT's prefix: grad}, e.g. model.layers.0.self_attn.q_proj.lora_A.weight."""
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert ".default." in n, n
        key = strip(n.replace(".default.", "."))
        assert p.grad is not None, n
        out[key] = p.grad.detach().clone()
    assert len(out) == 4 * N_LAYERS, sorted(out)
    return dict(sorted(out.items()))


def tofloat(v):
    return float(v.detach()) if torch.is_tensor(v) else float(v)


def config_json(cfg):
    def conv(x):
        if isinstance(x, tuple):
            return [conv(v) for v in x]
        if isinstance(x, list):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    out = {"class": type(cfg).__name__, "run_name": cfg._name}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            d = {"class": type(v).__name__}
            d.update(conv(dataclasses.asdict(v)))
            out[f.name] = d
        else:
            out[f.name] = conv(v)
    out["_model_keys"] = list(cfg._model_keys)
    return out


# ----------------------------------------------------------------------------------------------------------
# wrappers used for the margin checks only


STATE = {"margins": [], "degenerate_rows": 0, "sigmoid_max": 0.0, "captured": []}
_orig_reduce = {m: m.reduce_tokens_w_attention for m in (mse_mod, prefvec_mod, rank_mod)}
_orig_forward = model_mod.reprpo_forward_baukit
_orig_sigmoid = torch.sigmoid


def make_reduce_wrapper(orig):
    def wrapped(x, attn_mask, *a, **kw):
        with torch.no_grad():
            g = torch.linalg.vector_norm(x.detach().double(), dim=2)
            thr = g.mean(1, keepdim=True) + g.std(1, keepdim=True)
            for b in range(x.shape[0]):
                if attn_mask[b].sum() == 0:
                    continue
                if float(g[b].abs().max()) == 0.0:  # all-zero activations: g == thr == 0 exactly, nothing filtered
                    STATE["degenerate_rows"] += 1
                    continue
                STATE["margins"].append(float(((g[b] - thr[b]).abs() / thr[b].abs()).min()))
        return orig(x, attn_mask, *a, **kw)

    return wrapped


def capturing_forward(model, input_ids, attn_mask, layer_paths, collect_input=True, collect_hs=False):
    o = _orig_forward(model, input_ids, attn_mask, layer_paths, collect_input=collect_input, collect_hs=collect_hs)
    STATE["captured"].append(ReprPOModelOutput(
        hs={k: v.detach().clone() for k, v in o.hs.items()},
        logits=o.logits.detach().clone(),
        label_logprobs=o.label_logprobs.detach().clone(),
        mask=o.mask,
    ))
    return o


def watched_sigmoid(x, *a, **kw):
    STATE["sigmoid_max"] = max(STATE["sigmoid_max"], float(x.detach().abs().max()))
    return _orig_sigmoid(x, *a, **kw)


def install_wrappers():
    for m, f in _orig_reduce.items():
        m.reduce_tokens_w_attention = make_reduce_wrapper(f)
    model_mod.reprpo_forward_baukit = capturing_forward
    torch.sigmoid = watched_sigmoid


def remove_wrappers():
    for m, f in _orig_reduce.items():
        m.reduce_tokens_w_attention = f
    model_mod.reprpo_forward_baukit = _orig_forward
    torch.sigmoid = _orig_sigmoid


def check_logprob_margins(name, lp):
    """lp: pi_cho, pi_rej, ref_cho, ref_rej label_logprobs."""
    z = (lp[0].double() - lp[1].double()) - (lp[2].double() - lp[3].double())
    need(z.abs().min() > MARGIN_Z, f"{name}: z = {z.tolist()}")
    need((lp[0].double() - lp[1].double()).abs().min() > MARGIN_Z, f"{name}: pi_c - pi_r near 0 (dpo_acc)")
    return z


# ----------------------------------------------------------------------------------------------------------
# cases


def method_step_case(name, cfg, batch, degenerate=False):
    model = load_policy()
    seed = crc(name)
    torch.manual_seed(seed)
    model_kwargs = {k: getattr(cfg, k) for k in cfg._model_keys}
    pl = cfg._cls(model, adam8bit=False, schedule="wsd", num_iterations=1, batch_size=B, **model_kwargs)
    assert type(pl) is PL_REPRPO_MODEL
    h = pl.hparams
    params_before = {k: v.detach().clone() for k, v in pl.transforms.state_dict().items()}

    STATE.update(margins=[], degenerate_rows=0, sigmoid_max=0.0, captured=[])
    install_wrappers()
    try:
        loss, info = pl._loss_fn(batch, pl._model)
    finally:
        remove_wrappers()
    loss.backward()
    assert torch.isfinite(loss), (name, loss)

    # ---- margins
    cap = STATE["captured"]
    assert len(cap) == 4  # ref_cho, ref_rej, pi_cho, pi_rej
    ref_cho, ref_rej, pi_cho, pi_rej = cap
    z = check_logprob_margins(name, [pi_cho.label_logprobs, pi_rej.label_logprobs, ref_cho.label_logprobs,
                                     ref_rej.label_logprobs])
    kind = {v.value: k for k, v in Losses.__members__.items()}[type(h.loss)]
    if STATE["margins"]:
        lim = MARGIN_SINK_RANK if kind == "rank" else MARGIN_SINK
        need(min(STATE["margins"]) > lim, f"{name}: sink margin {min(STATE['margins']):.2e}")
    assert degenerate == (STATE["degenerate_rows"] > 0), (name, STATE["degenerate_rows"])
    if kind == "rank":
        need(STATE["sigmoid_max"] < MAX_BETA_THETA, f"{name}: |beta*theta| up to {STATE['sigmoid_max']}")
    proj_inner = None
    if kind == "prefvec" and h.loss.use_proj_loss and h.loss.use_proj_abs_loss:
        proj_inner = []
        for b in range(B):
            rows = slice(b, b + 1)
            outs = [ReprPOModelOutput(hs={k: v[rows] for k, v in o.hs.items()}, logits=o.logits[rows],
                                      label_logprobs=o.label_logprobs[rows], mask=o.mask[rows]) for o in cap]
            bb = {k: v[rows] for k, v in batch.items()}
            with torch.no_grad():
                _, inf_b = h.loss.c(pi_cho=outs[2], pi_rej=outs[3], ref_cho=outs[0], ref_rej=outs[1], batch=bb,
                                    transforms=pl.transforms)
            proj_inner.append(1e5 * float(inf_b["loss_proj"]))
        if degenerate:
            assert all(v == 0.0 for v in proj_inner), proj_inner
        else:
            need(min(abs(v) for v in proj_inner) > MARGIN_PROJ, f"{name}: 1e5*loss_proj {proj_inner}")

    # ---- store
    pfx = f"case/{name}"
    names = []

    def store(n, t):
        put(n, t)
        names.append(n)

    state = pl.transforms.state_dict(keep_vars=True)
    trainable = []
    for pname, p in state.items():
        assert torch.equal(p.detach(), params_before[pname])
        store(f"{pfx}/param/{pname}", p)
    for pname, p in pl.transforms.named_parameters():
        if p.grad is not None:
            trainable.append(pname)
            store(f"{pfx}/grad/{pname}", p.grad)
    for k, g in lora_grads(pl._model).items():
        store(f"{pfx}/grad/lora/{k}", g)

    N = pl._model.config.num_hidden_layers
    resolved = parse_collection_layers(h.collection_layers, N)
    paths = list(h.layer_paths)
    entry = {
        "name": name,
        "kind": "method_step",
        "preset": name in experiments.experiment_configs,
        "config": config_json(cfg),
        "loss_kind": kind,
        "transform_kind": {v.value: k for k, v in Transforms.__members__.items()}[type(h.transform)],
        "transform_seed": seed,
        "collection_layers_resolved": [int(v) for v in resolved],
        "layer_paths": paths if h.collect_hs else [strip(p) for p in paths],
        "transform_sizes": {(k if h.collect_hs else strip(k)): int(v.shape[-1]) for k, v in pi_cho.hs.items()},
        "loss": float(loss),
        "info": {k: tofloat(v) for k, v in info.items()},
        "transform_state": list(state.keys()),
        "transform_trainable": trainable,
        "z": [float(v) for v in z],
        "min_sink_margin": min(STATE["margins"]) if STATE["margins"] else None,
        "tensors": names,
    }
    if proj_inner is not None:
        entry["per_example_1e5_loss_proj"] = proj_inner
    if kind == "rank":
        entry["max_abs_beta_theta"] = STATE["sigmoid_max"]
    return entry


def plain_dpo_grads(batch):
    model = load_policy()
    loss, info = compute_dpo_loss_batch(batch, model)
    loss.backward()
    return float(loss), lora_grads(model)


_orig_prehook = ProjBPHooks.backward_prehook_projgrad


def intervention_case(name, kind, cfg, batch, plain):
    model = load_policy()
    prehook_calls = {}

    def counting_prehook(self, module, grad_output):  # counts, then runs the real pre-hook
        n = next(strip(k) for k, m in self.model.named_modules() if m is module)
        prehook_calls[n] = prehook_calls.get(n, 0) + 1
        return _orig_prehook(self, module, grad_output)

    ProjBPHooks.backward_prehook_projgrad = counting_prehook  # looked up when ProjBPHooks registers its hooks
    try:
        model_kwargs = {k: getattr(cfg, k) for k in cfg._model_keys}
        pl = cfg._cls(model, adam8bit=False, schedule="wsd", num_iterations=1, batch_size=B, **model_kwargs)
    finally:
        ProjBPHooks.backward_prehook_projgrad = _orig_prehook
    assert isinstance(pl, PL_ProjGrad_MODEL if kind == "projgrad" else PL_GradBP_MODEL)
    hooked = sorted(strip(k) for k in pl.projgrad.enabled_modules())
    loss, info = pl._loss_fn(batch, pl._model)
    loss.backward()
    if kind == "projbp":
        assert prehook_calls == {n: 2 for n in hooked}, prehook_calls  # once per policy forward (cho, rej)
    else:
        assert not prehook_calls
    assert torch.isfinite(loss)
    grads = lora_grads(pl._model)
    logged = {}
    if kind == "projgrad":
        before = grads
        assert all(torch.equal(before[k], plain[1][k]) for k in before), "projgrad before != plain DPO grads"

        def log_dict(d, **kw):
            logged.update({k: tofloat(v) for k, v in d.items()})

        pl.log_dict = log_dict
        pl.on_after_backward()
        after = lora_grads(pl._model)
    else:
        before, after = plain[1], grads
    assert float(loss) == plain[0], (name, float(loss), plain[0])

    pfx = f"case/{name}"
    names = []
    for k in before:
        put(f"{pfx}/grad_before/lora/{k}", before[k])
        names.append(f"{pfx}/grad_before/lora/{k}")
    for k in after:
        put(f"{pfx}/grad_after/lora/{k}", after[k])
        names.append(f"{pfx}/grad_after/lora/{k}")
    modified = [k for k in after if not torch.equal(before[k], after[k])]
    info_f = {k: tofloat(v) for k, v in info.items()}
    info_f.update(logged)
    return {
        "name": name,
        "kind": kind,
        "preset": name in experiments.experiment_configs,
        "config": config_json(cfg),
        "hooked_modules": hooked,
        "prehook_calls": dict(sorted(prehook_calls.items())),
        "loss": float(loss),
        "info": info_f,
        "modified": modified,
        "unmodified": [k for k in after if k not in modified],
        "tensors": names,
    }


def attempt(seed):
    TENSORS.clear()
    batch = make_batch(seed)
    for k, v in batch.items():
        put(f"batch/{k}", v)
    cases = []
    ec = experiments.experiment_configs
    step_cfgs = [
        ("hs-ether-prefvec", ec["hs-ether-prefvec"][1], True),
        ("side-none-rank", ec["side-none-rank"][1], False),
        # not a preset: ether with reduction 4 (f = 8) and three hs layers, see the notes
        ("x-hs-ether-prefvec-reduction4-layers123", ReprPOConfig(
            collect_hs=True, collection_layers="1,2,3", transform=Transforms.ether.value(reduction=4),
            loss=Losses.prefvec.value()), False),
    ]
    for name, cfg, degenerate in step_cfgs:
        cases.append(method_step_case(name, cfg, batch, degenerate=degenerate))

    plain = plain_dpo_grads(batch)
    variant = dict(reverse_pref=False, scale_orth=True, neg_slope=0.1, mag_clip=0.5, use_pref_ref=False)
    inter = [
        ("projgrad", "projgrad", ec["projgrad"][1]),
        ("x-projgrad-wd0", "projgrad", ProjGradConfig(weight_dim=0, **variant)),
        ("x-projgrad-wd2", "projgrad", ProjGradConfig(weight_dim=2, **variant)),
        ("projbp", "projbp", ec["projbp"][1]),
        ("x-projbp-scaleorth-reverse-noclip", "projbp",
         ProjBPConfig(scale_orth=True, reverse_pref=True, mag_clip=None)),
    ]
    for name, kind, cfg in inter:
        cases.append(intervention_case(name, kind, cfg, batch, plain))
    return batch, cases, plain


def main():
    for seed in range(20250611, 20250611 + 50):
        try:
            batch, cases, plain = attempt(seed)
            break
        except MarginError as e:
            print(f"batch seed {seed}: {e}; trying the next seed", file=sys.stderr)
    else:
        raise SystemExit("no batch seed satisfied the margin checks")

    side = next(c for c in cases if c["name"] == "side-none-rank")
    notes = [
        f"Batch drawn with torch.Generator seed {seed} (the first seed from 20250611 whose batch passes every margin "
        "check in the docstring).",
        "Masks are int64 0/1 (as the reference's collate produces them and as they were fed to the reference); ids "
        f"are int64. Right padding with id {PAD} (EOS; the tiny model has no pad token and the reference pads with "
        "EOS then). Row 0 of each side starts with BOS (1); chosen and rejected share exactly the first "
        f"{PROMPT} tokens of each row. Padded positions take part in the forward (attention masked, positions "
        "0..T-1 as HF assigns them), and their activations enter the sink-filter statistics: feed the stored ids.",
        "hs keys are hidden_states indices as strings: key 'k' = hidden_states[k] of HF's output_hidden_states "
        "(0 = embeddings, k >= 1 = output of decoder block k counted from 1 = input of model.layers[k]). With N = 4 "
        "the default collection_layers 'range(.3,-2)' resolves to [1] (range(int(0.3*4)=1, 4-2=2)), so "
        "hs-ether-prefvec collects hidden_states[1] only.",
        "Side mode (side-none-rank): layer_paths are every o_proj and down_proj of all 4 blocks whatever "
        "collection_layers says (the bd9ae63 get_layer_paths no-op, spec 4.3), in the reference's list(set(...)) "
        "order under PYTHONHASHSEED=0 (PEFT prefix stripped; the order only changes the summation order of the "
        "per-layer mean). Inputs are collected (collect_input=True): o_proj input width 32, down_proj input width 48.",
        "hs-ether-prefvec is DEGENERATE on this model: ETHER's bottleneck is f = hidden // reduction = 32 // 60 = 0, "
        "so transforms.1.linear.weight is [0, 32], linear_up.weight is [32, 0] (zero-element tensors, stored as "
        "such), and the transformed activations are exactly 0 for all four outputs. prefvec then has d = v = 0, "
        "u = 0/1e-12 = 0, loss_proj = 0 exactly, inner = |0| = 0 with gradient 0 (torch's abs'(0) = 0), "
        "cosines 0 (retain_cosine = rr_cosine = 0), every sink filter keeps all real tokens (norms 0 = mean + std "
        "0, not strictly greater); the loss is the DPO term log(sigmoid(-z)) alone, the LoRA gradients are those of "
        "that term, and ether_R gets an all-zero gradient. A port must either produce exactly this (an f = 0 "
        "bottleneck, abs/norm gradients 0 at 0) or reject reduction > hidden; the preset on a real model "
        "(hidden >= 60) is not degenerate. x-hs-ether-prefvec-reduction4-layers123 (not a preset: ETHERConfig("
        "reduction=4), collection_layers '1,2,3', prefvec defaults) is the non-degenerate ETHER step (f = 8, "
        "nb = 2, n = 16).",
        "LoRA gradient names are the adapter-file keys (adapter_model.safetensors) without PEFT's "
        "'base_model.model.' prefix and without the '.default' adapter name, e.g. "
        "'model.layers.0.self_attn.q_proj.lora_A.weight' (lora_A [4, 32], q lora_B [32, 4], v lora_B [16, 4]). "
        "Transform tensors use the TransformByLayer state-dict names ('transforms.<key>.ether_R', "
        "'transforms.<key>.linear.weight', 'transforms.<key>.linear_up.weight'), as in methods.json. "
        "ETHER's linear.weight never gets a gradient (the forward reads .data): it is in param/, not in grad/.",
        "method_step: loss and every info key of _loss_fn (loss info, DPO metrics with beta 0.1, retain_cosine, "
        "rr_cosine, dpo_acc, logits, chosen_rewards); grad/lora/* = d loss / d LoRA params, grad/transforms.* = "
        "d loss / d transform params (the transform params also get gradient through the reference branch). "
        "The lr is irrelevant (no optimizer step is taken).",
        "projgrad / projbp: grad_before = the plain DPO gradient (identical for all five cases; checked bit-equal "
        "between compute_dpo_loss_batch and the projgrad model's backward, whose hooks only cache), grad_after = "
        "after on_after_backward (projgrad) or after the backward with the projbp pre-hooks (projbp). 'modified' "
        "lists the LoRA tensors whose gradient changed. info adds train/proj_frac and train/nproj_frac as "
        "on_after_backward logged them (projgrad only). The loss is the DPO loss (beta 0.1, equal to the plain "
        "one) in every case: the hooks change gradients only.",
        "projgrad weight_dim / shape coincidence on this model (q_proj 32 -> 32, v_proj 32 -> 16, r 4): the "
        "direction lives in each module's output space (32 for q, 16 for v); weight_dim 1 (default) matches "
        "grad.shape[-1] == out, i.e. q lora_A [4, 32] (its INPUT dim, by coincidence of in == out) and nothing in "
        "v_proj; weight_dim 0 matches grad.shape[0] == out: q lora_B [32, 4] and v lora_B [16, 4]; weight_dim 2 "
        "does both (q lora_A along dim -1, q lora_B and v lora_B along dim 0). See each case's 'modified'.",
        "projgrad x-* cases use use_pref_ref=False: the direction comes from the policy ('cho'/'rej') caches, i.e. "
        "the LoRA wrapper outputs with the adapter on (lora_B is non-zero, so they differ from the reference "
        "ones). Both caches keep only example 0's activation [T, out] (the tuple-of-rows quirk, spec 5), averaged "
        "under each example's mask.",
        "projbp rewrites the gradient at every hooked module output during backward, so the change reaches every "
        "earlier LoRA tensor too. prehook_calls (counted by a wrapper around the real pre-hook) shows it fires "
        "twice per hooked module (the chosen and the rejected policy forward), layer 0 included although that "
        "module's input does not require grad; never in the reference forwards (no_grad).",
        "projgrad mag_clip (x-* cases, 0.5): the ratio is elementwise against preference_dir.clamp(1e-12), so every "
        "negative direction component gives a ~1e12 ratio and its gradient row/column is divided down to ~1e-12 "
        "(where the mean is positive) before the projection; the after-gradients still have ordinary magnitudes "
        "(min |g| ~ 1e-7) because the projection mixes rows. Compare with a relative + absolute tolerance.",
        f"Sink-filter margins (min_sink_margin per case: min over every decision of |norm - (mean + std)| / "
        f"(mean + std), float64 on the reference's activations): >= {MARGIN_SINK} for prefvec; >= {MARGIN_SINK_RANK} "
        "for rank, whose filter sees log-softmax vectors with nearly equal norms (std/mean down to ~6e-4 per row), "
        "so with ~1,500 decisions (8 keys x 4 outputs x 3 rows x 16 tokens) a larger relative margin is out of "
        "reach; it is still ~100x the float32 rounding of those norms. The degenerate hs-ether-prefvec has none.",
        "config: every dataclass field of the reference config (ExperimentConfig fields included: base_model, "
        "dataset, batch_size, ... are the reference defaults and were NOT used: the model is tiny_llama, the batch "
        "is the stored one); nested loss/transform configs with their class. run_name is the reference's _name.",
    ]
    doc = {
        "meta": {
            "reference_commit": REFERENCE_COMMIT,
            "baukit": BAUKIT_COMMIT,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
            "script": "tests/reference/gen_methods_step_fixtures.py",
            "model": "tests/fixtures/methods/tiny_llama (adapter: tiny_llama/adapter)",
            "num_hidden_layers": N_LAYERS,
            "dtype": "float32",
            "device": "cpu",
        },
        "batch": {
            "B": B,
            "T": T,
            "seed": seed,
            "prompt_len": PROMPT,
            "chosen_lengths": LEN_CHO,
            "rejected_lengths": LEN_REJ,
            "pad_id": PAD,
            "bos_id": BOS,
            "ids_dtype": "int64",
            "mask_dtype": "int64 (0/1)",
            "tensors": ["batch/chosen", "batch/chosen_mask", "batch/rejected", "batch/rejected_mask"],
        },
        "hs_key_convention": "hidden_states index (str); see notes",
        "collection_layers_default_resolved": {
            "spec": "range(.3,-2)", "n": N_LAYERS, "layers": parse_collection_layers("range(.3,-2)", N_LAYERS),
        },
        "side_modules_resolved": sorted(side["layer_paths"]),
        "plain_dpo_loss": plain[0],
        "cases": cases,
        "notes": notes,
    }
    os.makedirs(OUT, exist_ok=True)
    save_file(dict(sorted(TENSORS.items())), os.path.join(OUT, "step.safetensors"),
              metadata={"reference_commit": REFERENCE_COMMIT})
    with open(os.path.join(OUT, "step.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False, allow_nan=False)
        f.write("\n")

    w = max(len(c["name"]) for c in cases)
    for c in cases:
        extra = c.get("modified", c.get("transform_trainable"))
        print(f"{c['name']:<{w}}  loss {c['loss']:>12.6g}  {len(c['info'])} info  {extra}")
    size = os.path.getsize(os.path.join(OUT, "step.safetensors"))
    print(f"batch seed {seed}: {len(cases)} cases, {len(TENSORS)} tensors, {size / 1e6:.3f} MB")


if __name__ == "__main__":
    main()
