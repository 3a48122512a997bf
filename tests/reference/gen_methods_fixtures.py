"""Writes tests/fixtures/methods/methods.{safetensors,json}: losses, metrics and gradients of the reference
ReprPO method space (losses mse / prefvec / rank, transforms none / ether / hra / svd / supr / ortho, the
named presets of reprpo/experiments.py, and the token reduction) for the Rust port of issue 17.

Everything numeric here is computed by the reference code itself, imported (never copied) from a pinned
checkout of wassname/repr-preference-optimization @ bd9ae63aaa9255394aa1681eeaa48281d8c6885f, with baukit
@ 9d51abd51ebf29769aecc38c4cbef459b731a36e, installed into the venv of requirements-methods.txt:

    PYTHONHASHSEED=0 /work/venvs/reprpo-ref/bin/python tests/reference/gen_methods_fixtures.py

(The script re-executes itself with PYTHONHASHSEED=0 if it is not set.) CPU, float32, one thread,
torch.use_deterministic_algorithms(True), seeded generators; two runs give identical files.

How the reference is driven:
- Each case calls the real `PL_REPRPO_MODEL._loss_fn` (reprpo/interventions/reprpo/model.py) unbound, with a
  stub `self` (hparams: loss, layer_paths, collect_input, collect_hs; `transforms`) and a stub model
  (`eval`/`train` no-ops, `disable_adapter()` a no-op context). `reprpo_forward_baukit` is monkeypatched in
  that module to return four prepared `ReprPOModelOutput`s in the order `_loss_fn` calls it (ref_cho,
  ref_rej, pi_cho, pi_rej; each call's input_ids/mask are checked). So the loss, the transform and the
  extra metrics (DPO metrics, retain_cosine, rr_cosine) are the reference's own code.
- The transform is built as `PL_REPRPO_MODEL.__init__` builds it: `cfg.c({key: width}, model=stub)` then
  `.to(float32)`. The stub model exposes `get_input_embeddings()`, `get_output_embeddings()` and `lm_head`
  (in/hs/embed and in/hs/head; "tied" cases use in/hs/head for both).
- HRA: the reference init repeats every column twice (columns 2j and 2j+1 equal), which makes the
  Gram-Schmidt residuals pure rounding noise. Before computing, `hra_u` is REPLACED by i.i.d.
  U(-1/sqrt(r/2), 1/sqrt(r/2)) values (seeded); the stored `hra_u` is the replaced one.
- Gradients w.r.t. `label_logprobs` and the unshifted token NLL: the policy outputs carry leaf tensors
  (requires_grad) as `label_logprobs`; `cross_entropy_loss` is wrapped in the namespaces of
  losses/prefvec.py and losses/rank.py: the wrapper calls the reference helper, checks its result is
  bit-identical to the stored `nll` input, and returns the stored tensor (a requires_grad leaf for pi_cho).
  Reference-role tensors (activations, logprobs, nll) are plain constants, as in the reference (no_grad).
- Margin checks only (nothing they compute is stored): `reduce_tokens_w_attention` is wrapped in the loss
  modules to measure how far each token norm is from the sink threshold; `torch.sigmoid` is wrapped while
  a rank loss runs to bound |beta*theta|; prefvec is re-run per example (and per key for orth/angle) to
  read the values its abs() acts on; supr's delta is checked against its 0.1 threshold in float64. A miss
  first retries a random transform init (ether/hra/ortho; the init is stored, so the salt is irrelevant to
  Rust), then the next input seed from 20250603 (the seed used is in the JSON notes). The raw inputs are
  also nudged before use: last-position deltas away from supr's 0.1, and the row's largest token scaled up
  until no raw token norm lies within 0.2% of the sink threshold.

Imports: `import baukit` runs widget/image modules (torchvision, PIL) that the reference does not use, so a
bare `baukit` package object pointing at the installed package directory is put in sys.modules and the real
`baukit/nethook.py` is then imported from it (nothing of baukit is copied). `reprpo.experiments` imports
`reprpo.interventions` (lightning, bitsandbytes, transformers, peft: installed, pinned); open_pref_eval,
datasets, tyro, wandb are not needed by anything imported here and are not stubbed (open_pref_eval is
installed in the venv for gen_open_pref_eval_fixtures.py; nothing here imports it).
`experiment_configs` is enumerated (its unseeded shuffle only changes dict order; cases are sorted).
"""

import os
import sys

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import types  # noqa: E402
import zlib  # noqa: E402

import torch  # noqa: E402
from loguru import logger  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

logger.remove()  # the reference logs its SVD shapes at DEBUG level
logger.add(sys.stderr, level="WARNING")

# --- baukit: the real nethook.py without the package __init__ (see docstring) ---------------------------
_bk = importlib.util.find_spec("baukit")
_pkg = types.ModuleType("baukit")
_pkg.__path__ = list(_bk.submodule_search_locations)
_pkg.__file__ = _bk.origin
sys.modules["baukit"] = _pkg
import baukit.nethook  # noqa: E402,F401

import reprpo.experiments as experiments  # noqa: E402
import reprpo.interventions.losses.prefvec as prefvec_mod  # noqa: E402
import reprpo.interventions.losses.rank as rank_mod  # noqa: E402
import reprpo.interventions.losses.mse as mse_mod  # noqa: E402
import reprpo.interventions.reprpo.model as model_mod  # noqa: E402
from reprpo.interventions.helpers import compute_logprobs  # noqa: E402
from reprpo.interventions.losses import Losses  # noqa: E402
from reprpo.interventions.losses.helpers import cross_entropy_loss  # noqa: E402
from reprpo.interventions.reprpo.config import ReprPOConfig  # noqa: E402
from reprpo.interventions.reprpo.helpers import reduce_tokens_w_attention  # noqa: E402
from reprpo.interventions.reprpo.model import PL_REPRPO_MODEL  # noqa: E402
from reprpo.interventions.transforms import Transforms  # noqa: E402
from reprpo.interventions.transforms.ortho import OrthoConfig  # noqa: E402
from reprpo.interventions.types import ReprPOModelOutput  # noqa: E402

REFERENCE_COMMIT = "bd9ae63aaa9255394aa1681eeaa48281d8c6885f"
BAUKIT_COMMIT = "9d51abd51ebf29769aecc38c4cbef459b731a36e"

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "methods")

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.set_default_dtype(torch.float32)

ROLES = ("pi_cho", "pi_rej", "ref_cho", "ref_rej")
CALL_ORDER = ("ref_cho", "ref_rej", "pi_cho", "pi_rej")  # the order _loss_fn calls the forward
POLICY = ("pi_cho", "pi_rej")
B, T, V = 4, 12, 40
VOCAB_EMB = 160  # rows of in/hs/embed and in/hs/head
SETS = {
    "hs": {"keys": ["2", "4", "6"], "widths": {"2": 120, "4": 120, "6": 120}},
    "side": {
        "keys": [
            "model.layers.1.self_attn.o_proj",
            "model.layers.1.mlp.down_proj",
            "model.layers.2.self_attn.o_proj",
            "model.layers.2.mlp.down_proj",
        ],
        "widths": {
            "model.layers.1.self_attn.o_proj": 24,
            "model.layers.1.mlp.down_proj": 40,
            "model.layers.2.self_attn.o_proj": 24,
            "model.layers.2.mlp.down_proj": 40,
        },
    },
}
# right padding, different per row and for chosen / rejected; no all-zero rows
LENGTHS = {"cho": [12, 9, 7, 10], "rej": [10, 12, 5, 8]}
# planted high-norm "sink" tokens (row, position)
SINKS = {"cho": [(0, 0), (2, 0)], "rej": [(1, 0), (2, 3)]}
PROMPT = 3  # chosen and rejected ids share their first tokens

SUPR_THRESHOLD = 0.1  # the reference's constant, only used for the margin check
MARGIN_SINK = 1e-4  # min |norm - threshold| / threshold over every sink-filter decision
MARGIN_SUPR = 5e-3
MAX_BETA_THETA = 30.0  # far from log(sigmoid) underflow near 88
MARGIN_Z = 1e-3
MARGIN_NLL = 1e-4
MARGIN_PROJ = 1e-3  # |1e5 * loss_proj| per example, where abs() is applied
MARGIN_ORTH = 1e-4  # |mean_h O| and |cos(d, v)| per key and example, where abs() is applied

NOTES = []
TENSORS = {}


class MarginError(Exception):
    """A value lies too close to a discontinuity (sink threshold, abs/relu kink, supr threshold)."""


def need(cond, msg):
    if not cond:
        raise MarginError(msg)


def put(name, t, into=None):
    into = TENSORS if into is None else into
    assert name not in into, name
    into[name] = t.detach().contiguous().clone()


def crc(s):
    return zlib.crc32(s.encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------------------
# inputs


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def plant_sinks(x, sinks, feat, amp):
    for b, p in sinks:
        x[b, p] = 1.5 * x[b, p]
        x[b, p, feat] += amp


def make_set(set_name, gen):
    keys, widths = SETS[set_name]["keys"], SETS[set_name]["widths"]
    residual = set_name == "hs"
    scale = {s: torch.exp(0.3 * randn(gen, B, T, 1)) for s in ("cho", "rej")}
    ref = {"ref_cho": {}, "ref_rej": {}}
    prev_c = prev_r = None
    for li, k in enumerate(keys):
        H = widths[k]
        mu = 0.5 * randn(gen, H)
        if residual and prev_c is not None:
            c = prev_c + 0.7 * scale["cho"] * randn(gen, B, T, H)
            r0 = prev_r + 0.7 * scale["rej"] * randn(gen, B, T, H)
        else:
            c = mu + scale["cho"] * randn(gen, B, T, H)
            r0 = mu + scale["rej"] * randn(gen, B, T, H)
        prev_c, prev_r = c, r0
        ref_c = c.clone()
        ref_r = 0.6 * c + 0.8 * r0 + 0.4 * mu  # correlated with the chosen activations
        plant_sinks(ref_c, SINKS["cho"], feat=7 % H, amp=40.0 + 10.0 * li)
        plant_sinks(ref_r, SINKS["rej"], feat=7 % H, amp=40.0 + 10.0 * li)
        ref["ref_cho"][k] = ref_c
        ref["ref_rej"][k] = ref_r
    hs = dict(ref)
    hs["pi_cho"] = {k: v + 0.05 * scale["cho"] * randn(gen, *v.shape) for k, v in ref["ref_cho"].items()}
    hs["pi_rej"] = {k: v + 0.05 * scale["rej"] * randn(gen, *v.shape) for k, v in ref["ref_rej"].items()}

    masks, ids = {}, {}
    for s in ("cho", "rej"):
        m = torch.zeros(B, T, dtype=torch.long)
        for b, n in enumerate(LENGTHS[s]):
            m[b, :n] = 1
        masks[s] = m
    ids["cho"] = torch.randint(0, V, (B, T), generator=gen)
    ids["rej"] = torch.randint(0, V, (B, T), generator=gen)
    ids["rej"][:, :PROMPT] = ids["cho"][:, :PROMPT]
    logits = {}
    for s in ("cho", "rej"):
        lr = 2.0 * randn(gen, B, T, V)
        logits["ref_" + s] = lr
        logits["pi_" + s] = lr + 0.3 * randn(gen, B, T, V)

    out = {}
    for role in ROLES:
        s = role.split("_")[1]
        lg, i, m = logits[role], ids[s], masks[s]
        out[role] = {
            "hs": hs[role],
            "mask": m,
            "ids": i,
            "logits": lg,
            "logprobs": compute_logprobs(logits=lg, labels=i, selection_mask=m).detach(),
            "nll": cross_entropy_loss(lg, i, m).detach(),
        }
    return out


def fix_supr_margin(data, keys):
    """Move last-position deltas between consecutive keys away from supr's 0.1 threshold (hs set)."""
    for role in ROLES:
        hs = data[role]["hs"]
        for lo, hi in zip(keys[:-1], keys[1:]):
            d = hs[hi][:, -1] - hs[lo][:, -1]
            bad = (d - SUPR_THRESHOLD).abs() < 0.02
            shift = torch.where(d >= SUPR_THRESHOLD, 0.05, -0.05) * bad
            hs[hi][:, -1] += shift


def fix_sink_margin(data, keys, window=2e-3):
    """Keep every raw token norm away from its row's sink threshold (mean + std over T): while a token is
    within `window` (relative) of it, scale up the row's largest-norm token before position T-1 (already
    above the threshold, so it stays filtered; position T-1 is left alone for supr)."""
    for role in ROLES:
        for k in keys:
            x = data[role]["hs"][k]
            for b in range(B):
                for _ in range(500):
                    g = torch.linalg.vector_norm(x[b].double(), dim=1)
                    thr = g.mean() + g.std()
                    if ((g - thr).abs() / thr).min() > window:
                        break
                    t = int(g[:-1].argmax())
                    x[b, t] *= 1.02
                else:
                    raise MarginError(f"no sink margin for {role} {k} row {b}")


def check_supr_margin(data, keys, head):
    wo = head.double()
    pinv = torch.linalg.pinv(wo)
    worst = math.inf
    for role in ROLES:
        hs = data[role]["hs"]
        for lo, hi in zip(keys[:-1], keys[1:]):
            delta = ((hs[hi][:, -1] - hs[lo][:, -1]).double() @ wo.T) @ pinv.T
            worst = min(worst, (delta - SUPR_THRESHOLD).abs().min().item())
    need(worst > MARGIN_SUPR, f"supr delta within {worst} of 0.1")
    return worst


# ----------------------------------------------------------------------------------------------------------
# stubs around the reference


class StubModel(torch.nn.Module):
    """What the transforms read from the model (svd: get_input_embeddings, lm_head; supr:
    get_output_embeddings) and what _loss_fn calls (eval, train, disable_adapter)."""

    def __init__(self, embed, head):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(embed.shape[0], embed.shape[1])
        self.embed_tokens.weight.data.copy_(embed)
        self.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
        self.lm_head.weight.data.copy_(head)

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    @contextlib.contextmanager
    def disable_adapter(self):
        yield


STATE = {"nll": {}, "margins": [], "sigmoid_max": 0.0, "nll_hits": 0}

_orig_cross_entropy = {m: m.cross_entropy_loss for m in (prefvec_mod, rank_mod)}
_orig_reduce = {m: m.reduce_tokens_w_attention for m in (mse_mod, prefvec_mod, rank_mod)}


def make_ce_wrapper(orig):
    def wrapped(logits, labels, attn):
        res = orig(logits, labels, attn)
        for lg, leaf in STATE["nll"].values():
            if logits is lg:
                assert torch.equal(res.detach(), leaf.detach()), "stored nll differs from the reference helper"
                STATE["nll_hits"] += 1
                return leaf
        return res

    return wrapped


def sink_margin(x, attn_mask):
    """Smallest |token norm - (mean + std)| / (mean + std) over the rows that have a real token (a check of
    how far the reference's sink-filter decisions are from flipping; float64)."""
    with torch.no_grad():
        g = torch.linalg.vector_norm(x.detach().double(), dim=2)
        thr = g.mean(1, keepdim=True) + g.std(1, keepdim=True)
        rows = attn_mask.sum(1) > 0
        return ((g - thr).abs() / thr.abs().clamp_min(1e-30))[rows].min().item()


def make_reduce_wrapper(orig):
    def wrapped(x, attn_mask, *a, **kw):
        STATE["margins"].append(sink_margin(x, attn_mask))
        return orig(x, attn_mask, *a, **kw)

    return wrapped


for _m, _f in _orig_cross_entropy.items():
    _m.cross_entropy_loss = make_ce_wrapper(_f)
for _m, _f in _orig_reduce.items():
    _m.reduce_tokens_w_attention = make_reduce_wrapper(_f)

_orig_sigmoid = torch.sigmoid


@contextlib.contextmanager
def watch_sigmoid():
    def wrapped(x, *a, **kw):
        STATE["sigmoid_max"] = max(STATE["sigmoid_max"], x.detach().abs().max().item())
        return _orig_sigmoid(x, *a, **kw)

    torch.sigmoid = wrapped
    try:
        yield
    finally:
        torch.sigmoid = _orig_sigmoid


def batch_of(data, rows=None):
    def sl(t):
        return t if rows is None else t[rows]

    return {
        "chosen": sl(data["pi_cho"]["ids"]),
        "chosen_mask": sl(data["pi_cho"]["mask"]),
        "rejected": sl(data["pi_rej"]["ids"]),
        "rejected_mask": sl(data["pi_rej"]["mask"]),
    }


def outputs_of(data, leaves, rows=None):
    """Fresh ReprPOModelOutput objects (the losses replace .hs). Without `rows` the stored tensor objects
    themselves are used (the nll wrapper recognises the logits by identity)."""

    def sl(t):
        return t if rows is None else t[rows]

    outs = {}
    for role in ROLES:
        d = data[role]
        if leaves is not None and role in POLICY:
            hs = dict(leaves[role]["hs"])
            lp = leaves[role]["logprobs"]
        else:
            hs = {k: sl(v) for k, v in d["hs"].items()}
            lp = sl(d["logprobs"])
        outs[role] = ReprPOModelOutput(hs=hs, logits=sl(d["logits"]), label_logprobs=lp, mask=sl(d["mask"]))
    return outs


def build_transform(tcfg, widths, embed, head, seed, hra_fix):
    torch.manual_seed(seed)
    model = StubModel(embed, head)
    tr = tcfg.c(dict(widths), model=model).to(torch.float32)
    if hra_fix:
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in tr.named_parameters():
            assert name.endswith("hra_u"), name
            r = p.shape[1]
            bound = 1.0 / math.sqrt(r / 2)
            with torch.no_grad():
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    return tr, model


def loss_json(cfg):
    kind = {v.value: k for k, v in Losses.__members__.items()}[type(cfg)]
    out = {"kind": kind}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = float(v) if f.type in (float, "float") else v
    return out


def transform_json(cfg, tied):
    kinds = {v.value: k for k, v in Transforms.__members__.items()}
    kinds[OrthoConfig] = "ortho"
    kind = kinds[type(cfg)]
    out = {"kind": kind}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = float(v) if f.type in (float, "float") else v
    if kind in ("svd", "supr"):
        out["tied"] = tied
    return out


# ----------------------------------------------------------------------------------------------------------
# one case


def run_case(name, set_name, loss_cfg, tcfg, preset, tied=False, inputs=None, check_sinks=True, salt=0):
    data = inputs[set_name]
    keys, widths = SETS[set_name]["keys"], SETS[set_name]["widths"]
    embed, head = inputs["embed"], inputs["head"]
    hra_fix = type(tcfg).__name__ == "HRAConfig"
    seed = crc(name) + 1000003 * salt
    transforms, model = build_transform(tcfg, widths, head if tied else embed, head, seed, hra_fix)
    params_before = {k: v.detach().clone() for k, v in transforms.state_dict().items()}

    # leaves
    leaves = {}
    for role in POLICY:
        d = data[role]
        leaves[role] = {
            "hs": {k: d["hs"][k].clone().requires_grad_(True) for k in keys},
            "logprobs": d["logprobs"].clone().requires_grad_(True),
        }
    nll_pi = data["pi_cho"]["nll"].clone().requires_grad_(True)
    STATE["nll"] = {
        "pi_cho": (data["pi_cho"]["logits"], nll_pi),
        "ref_cho": (data["ref_cho"]["logits"], data["ref_cho"]["nll"]),
    }
    STATE["margins"] = []
    STATE["sigmoid_max"] = 0.0
    STATE["nll_hits"] = 0

    outs = outputs_of(data, leaves)
    batch = batch_of(data)
    queue = list(CALL_ORDER)

    def fake_forward(model, input_ids, attn_mask, layer_paths, collect_input=True, collect_hs=False):
        role = queue.pop(0)
        assert input_ids is data[role]["ids"] and attn_mask is data[role]["mask"], role
        assert list(layer_paths) == keys and collect_hs == (set_name == "hs")
        return outs[role]

    stub = types.SimpleNamespace(
        hparams=types.SimpleNamespace(
            loss=loss_cfg, layer_paths=list(keys), collect_input=True, collect_hs=(set_name == "hs")
        ),
        transforms=transforms,
    )
    saved = model_mod.reprpo_forward_baukit
    model_mod.reprpo_forward_baukit = fake_forward
    try:
        with watch_sigmoid():
            loss, info = PL_REPRPO_MODEL._loss_fn(stub, batch, model)
    finally:
        model_mod.reprpo_forward_baukit = saved
    assert not queue
    assert STATE["nll_hits"] == (2 if loss_json(loss_cfg)["kind"] in ("prefvec", "rank") else 0), name
    loss.backward()
    assert torch.isfinite(loss), (name, loss)

    # ---- margin checks
    if check_sinks:
        worst = min(STATE["margins"])
        if worst <= MARGIN_SINK:
            raise MarginError(f"{name}: a token norm is within {worst:.2e} (relative) of the sink threshold")
    kind = loss_json(loss_cfg)["kind"]
    lp = {r: data[r]["logprobs"].double() for r in ROLES}
    z = (lp["pi_cho"] - lp["pi_rej"]) - (lp["ref_cho"] - lp["ref_rej"])
    need(z.abs().min() > MARGIN_Z, (name, z))
    need((lp["pi_cho"] - lp["pi_rej"]).abs().min() > MARGIN_Z, name)  # dpo_acc
    if kind == "rank":
        bt = STATE["sigmoid_max"]
        need(bt < MAX_BETA_THETA, f"{name}: |beta*theta| up to {bt}")
        if loss_cfg.use_nll_loss:
            r = (data["pi_cho"]["nll"] - data["ref_cho"]["nll"]).double().mean(1)
            need(r.abs().min() > MARGIN_NLL, (name, r))
    if kind == "prefvec" and loss_cfg.use_proj_loss and loss_cfg.use_proj_abs_loss:
        for b in range(B):
            rows = slice(b, b + 1)
            o = outputs_of(data, None, rows)
            with torch.no_grad():
                _, inf_b = loss_cfg.c(
                    pi_cho=o["pi_cho"], pi_rej=o["pi_rej"], ref_cho=o["ref_cho"], ref_rej=o["ref_rej"],
                    batch=batch_of(data, rows), transforms=transforms,
                )
            inner = 1e5 * inf_b["loss_proj"].item()
            need(abs(inner) > MARGIN_PROJ, f"{name}: example {b} has 1e5*loss_proj = {inner}")
    if kind == "prefvec" and (loss_cfg.use_orth_loss or loss_cfg.use_angle_loss):
        # abs() per key and example: read |mean_h O| and cos for one key and one example at a time
        # (identity transform only: TransformByLayer needs every key, so transforms=None stands in for it)
        assert transform_json(tcfg, tied)["kind"] == "none", name
        for b in range(B):
            rows = slice(b, b + 1)
            for k in keys:
                o = outputs_of(data, None, rows)
                for oo in o.values():
                    oo.hs = {k: oo.hs[k]}
                with torch.no_grad():
                    _, inf_bk = loss_cfg.c(
                        pi_cho=o["pi_cho"], pi_rej=o["pi_rej"], ref_cho=o["ref_cho"], ref_rej=o["ref_rej"],
                        batch=batch_of(data, rows), transforms=None,
                    )
                need(inf_bk["loss_orth"].item() > MARGIN_ORTH, (name, b, k, "orth", inf_bk["loss_orth"]))
                need(abs(inf_bk["_cosine_similarity"].item()) > MARGIN_ORTH, (name, b, k, "cos"))

    # ---- store
    tens = {}
    pfx = f"case/{name}"
    state = transforms.state_dict(keep_vars=True)
    for pname, p in state.items():
        assert torch.equal(p.detach(), params_before[pname])  # unchanged by the forward
        put(f"{pfx}/param/{pname}", p, tens)
    trainable = []
    for pname, p in transforms.named_parameters():
        if p.grad is not None:
            trainable.append(pname)
            put(f"{pfx}/grad/param/{pname}", p.grad, tens)
    for role in POLICY:
        for k in keys:
            g = leaves[role]["hs"][k].grad
            if g is not None:
                put(f"{pfx}/grad/{role}/hs/{k}", g, tens)
        g = leaves[role]["logprobs"].grad
        if g is not None:
            put(f"{pfx}/grad/{role}/logprobs", g, tens)
    if nll_pi.grad is not None:
        put(f"{pfx}/grad/pi_cho/nll", nll_pi.grad, tens)

    info_f = {k: float(v) for k, v in info.items()}
    return {
        "name": name,
        "set": set_name,
        "preset": preset,
        "loss": loss_json(loss_cfg),
        "transform": transform_json(tcfg, tied),
        "loss_value": float(loss),
        "info": info_f,
        "params": list(state.keys()),
        "trainable": trainable,
    }, tens, min(STATE["margins"])


# ----------------------------------------------------------------------------------------------------------
# token reduction cases


def reduce_cases(gen):
    H = 24
    out = []

    def base():
        s = torch.exp(0.3 * randn(gen, B, T, 1))
        return 0.3 * randn(gen, H) + s * randn(gen, B, T, H)

    def pad_mask(lengths):
        m = torch.zeros(B, T, dtype=torch.long)
        for b, n in enumerate(lengths):
            m[b, :n] = 1
        return m

    cases = []
    x = base()
    plant_sinks(x, [(0, 0), (2, 0)], feat=3, amp=30.0)
    cases.append(("pad_sink", x, pad_mask([12, 9, 7, 10])))
    cases.append(("no_sink", base(), pad_mask([11, 12, 6, 9])))
    x = base()
    plant_sinks(x, [(1, 0)], feat=3, amp=30.0)
    cases.append(("all_zero_row", x, pad_mask([12, 0, 8, 5])))
    x = base()
    plant_sinks(x, [(2, 0), (2, 4), (2, 5)], feat=3, amp=30.0)
    cases.append(("multi_sink", x, pad_mask([12, 10, 9, 7])))
    # every token of every row at one of two norms (1 and 2, six of each): mean + std lies just above 2,
    # so the filter removes nothing
    d = randn(gen, B, T, H)
    d = d / torch.linalg.vector_norm(d, dim=2, keepdim=True)
    lvl = torch.tensor([1.0, 2.0] * (T // 2))
    lvl = torch.stack([lvl[torch.randperm(T, generator=gen)] for _ in range(B)])
    cases.append(("none_removed", d * lvl[..., None], pad_mask([12, 8, 10, 6])))

    for name, x, m in cases:
        need(sink_margin(x, m) > MARGIN_SINK, f"reduce case {name}: sink margin")
        xl = x.clone().requires_grad_(True)
        w = randn(gen, B, H)
        y = reduce_tokens_w_attention(xl, m)
        (y * w).sum().backward()
        g = xl.grad
        nan_rows = [b for b in range(B) if not torch.isfinite(y[b]).all()]
        kept = []
        for b in range(B):
            if b in nan_rows:
                kept.append(None)
            else:
                kept.append([int(v) for v in (g[b].abs().sum(-1) != 0).tolist()])
        p = f"reduce/{name}"
        put(f"{p}/x", x)
        put(f"{p}/mask", m.float())
        put(f"{p}/w", w)
        put(f"{p}/out", y)
        put(f"{p}/grad", g)
        out.append({
            "name": name, "x": f"{p}/x", "mask": f"{p}/mask", "w": f"{p}/w", "out": f"{p}/out",
            "grad": f"{p}/grad", "nan_rows": nan_rows,
            "grad_nan_rows": [b for b in range(B) if not torch.isfinite(g[b]).all()],
            "kept": kept,
        })
    # the planted sinks are filtered, nothing is filtered in none_removed, the empty row is NaN
    by = {c["name"]: c for c in out}
    assert by["pad_sink"]["kept"][0][0] == 0 and by["pad_sink"]["kept"][2][0] == 0
    assert [by["multi_sink"]["kept"][2][t] for t in (0, 4, 5)] == [0, 0, 0]
    mask = TENSORS["reduce/none_removed/mask"].long().tolist()
    assert by["none_removed"]["kept"] == mask
    assert by["all_zero_row"]["nan_rows"] == [1]
    return out


# ----------------------------------------------------------------------------------------------------------


SEEDED_TRANSFORMS = ("ETHERConfig", "HRAConfig", "OrthoConfig")
MAX_SALTS = 20


def run_seeded(name, set_name, loss_cfg, tcfg, preset, **kw):
    """Transforms with a random init retry another init (seeded by name and salt) on a sink-margin miss."""
    salts = range(MAX_SALTS) if type(tcfg).__name__ in SEEDED_TRANSFORMS else range(1)
    for salt in salts:
        try:
            return run_case(name, set_name, loss_cfg, tcfg, preset, salt=salt, **kw)
        except MarginError as e:
            err = e
    raise err


def attempt(input_seed):
    """All cases for one input seed; raises MarginError if some margin check fails."""
    TENSORS.clear()
    gen = torch.Generator().manual_seed(input_seed)
    inputs = {s: make_set(s, gen) for s in SETS}
    fix_supr_margin(inputs["hs"], SETS["hs"]["keys"])
    for s in SETS:
        fix_sink_margin(inputs[s], SETS[s]["keys"])
    inputs["embed"] = randn(gen, VOCAB_EMB, 120) / math.sqrt(120)
    inputs["head"] = randn(gen, VOCAB_EMB, 120) / math.sqrt(120)
    supr_margin = check_supr_margin(inputs["hs"], SETS["hs"]["keys"], inputs["head"])

    for s in SETS:
        for role in ROLES:
            d = inputs[s][role]
            for k in SETS[s]["keys"]:
                put(f"in/{s}/{role}/hs/{k}", d["hs"][k])
            put(f"in/{s}/{role}/mask", d["mask"].float())
            put(f"in/{s}/{role}/logits", d["logits"])
            put(f"in/{s}/{role}/ids", d["ids"].long())
            put(f"in/{s}/{role}/logprobs", d["logprobs"])
            put(f"in/{s}/{role}/nll", d["nll"])
    put("in/hs/embed", inputs["embed"])
    put("in/hs/head", inputs["head"])

    # ---- presets
    cases = []
    presets = {k: v for k, (_, v) in experiments.experiment_configs.items() if isinstance(v, ReprPOConfig)}
    others = sorted(k for k, (_, v) in experiments.experiment_configs.items() if not isinstance(v, ReprPOConfig))
    for name in sorted(presets):
        cfg = presets[name]
        set_name = "hs" if cfg.collect_hs else "side"
        assert name.startswith(set_name + "-"), name
        cases.append(run_seeded(name, set_name, cfg.loss, cfg.transform, True, inputs=inputs))

    # ---- extras
    P, R, M = Losses.prefvec.value, Losses.rank.value, Losses.mse.value
    E, Hr, S, Su, N = (Transforms.ether.value, Transforms.hra.value, Transforms.svd.value,
                       Transforms.supr.value, Transforms.none.value)
    extras = [
        ("x-hs-none-prefvec-orth-angle-b3", "hs", P(use_orth_loss=True, use_angle_loss=True, β=3.0), N(), False),
        ("x-side-none-rank-retain-nll", "side", R(use_rank_retain=True, use_nll_loss=True), N(), False),
        ("x-side-none-mse-a0.3", "side", M(α=0.3), N(), False),
        ("x-hs-ether-prefvec-flip_side", "hs", P(), E(flip_side=True), False),
        ("x-hs-hra-prefvec-noGS", "hs", P(), Hr(apply_GS=False), False),
        ("x-hs-svd-prefvec-single", "hs", P(), S(dual_svd=False), False),
        ("x-hs-svd-rank-hard", "hs", R(), S(quantile=1.0), False),
        ("x-hs-svd-prefvec-tied", "hs", P(), S(), True),
        ("x-hs-supr-prefvec-tied", "hs", P(), Su(), True),
        ("x-hs-ortho-prefvec", "hs", P(), OrthoConfig(), False),
    ]
    for name, set_name, lcfg, tcfg, tied in extras:
        cases.append(run_seeded(
            name, set_name, lcfg, tcfg, False, tied=tied, inputs=inputs,
            check_sinks=(name != "x-hs-svd-rank-hard"),
        ))

    for _, tens, _ in cases:
        TENSORS.update(tens)
    red = reduce_cases(gen)
    return cases, red, supr_margin, others


def main():
    for input_seed in range(20250603, 20250603 + 50):
        try:
            cases, red, supr_margin, others = attempt(input_seed)
            break
        except MarginError as e:
            print(f"input seed {input_seed}: {e}; trying the next seed", file=sys.stderr)
    else:
        raise SystemExit("no input seed satisfied the margin checks")
    margins = sorted((m, c["name"]) for c, _, m in cases if c["name"] != "x-hs-svd-rank-hard")
    cases = [c for c, _, _ in cases]

    NOTES.extend([
        f"Inputs drawn with torch.Generator seed {input_seed} (the first seed from 20250603 whose inputs pass "
        "every margin check below).",
        "Presets not in this file (not ReprPO): " + ", ".join(others) + ".",
        "hs-supr-prefvec2 / hs-supr-rank2 use collection_layers '-2,1' in the reference; here they run on the hs "
        "set keys 2,4,6 like hs-supr-* (supr drops the lowest key 2), so they equal hs-supr-prefvec / hs-supr-rank.",
        "hs-ether-prefvec and hs-ether-prefvec-Htype_ether have the same config; each case draws its own "
        "transform init (seeded by the case name), so their numbers differ. side-none-prefvec2 (beta=3) and "
        "side-none-prefvec-use_sep_loss_True are numerically identical to side-none-prefvec (beta only scales the "
        "disabled orth/angle terms; use_sep_loss is never added to the loss).",
        "Gradients are stored for the policy roles only; reference activations, logprobs and nll are constants "
        "(the reference computes them under no_grad). grad/<role>/logprobs is absent when the DPO term is off "
        "(prefvec use_dpo_loss=False, rank use_dpo_loss=False), and grad/pi_cho/nll exists only for rank with "
        "use_nll_loss (prefvec's nll only feeds info). Zeros are stored where the graph reaches a tensor with a "
        "zero gradient (e.g. relu(-z) rows with z>0, supr's dropped lowest key).",
        "trainable = transform parameters that received a gradient. ETHER's linear.weight is an nn.Parameter with "
        "requires_grad=True, but the forward reads linear.weight.data, so it never gets a gradient: it is in "
        "params, not in trainable, and has no grad tensor.",
        "State-dict names: transforms.<key>.ether_R / ether_R2 / ether_R3 / ether_R4 / linear.weight / "
        "linear_up.weight (ether), transforms.<key>.hra_u (hra), transforms.<key>.transform.parametrizations."
        "weight.original (trainable) and ...weight.0.base (buffer) (ortho). svd and supr have no parameters or "
        "buffers (their SVD / pinverse are plain attributes computed at construction from in/hs/embed, in/hs/head).",
        "HRA: hra_u was replaced by i.i.d. U(-1/sqrt(r/2), 1/sqrt(r/2)) before computing (the reference init "
        "duplicates every column, which makes Gram-Schmidt residuals rounding noise). The stored hra_u is the "
        "replaced one.",
        "x-hs-svd-rank-hard (quantile=1.0): with V >= d the hard decomposer's Vt is a full d x d orthogonal "
        "matrix, so h Vt^T Vt = h up to rounding and the dual combination a + b - (a.b/b.b) b = h too: the "
        "transform output h - io is float32 rounding noise (~1e-7 relative). The loss value is robust (rank: "
        "softplus of ~0 -> log 2 plus the DPO retain term), but the activation gradients and any sink-filter "
        "decisions are noise; compare with an absolute tolerance or check that Rust gives ~0 output. The sink "
        "margin check is skipped for this case. This holds for any full-column-rank head, not only these inputs.",
        "x-hs-supr-prefvec-tied equals hs-supr-prefvec: supr only reads get_output_embeddings(), so tying the "
        "input embedding changes nothing. x-hs-svd-prefvec-tied equals x-hs-svd-prefvec-single: with W_e = W_o "
        "the dual combination a + b - (a.b/b.b) b with a = b is just b = M_o(h), the non-dual map.",
        "hs-hra-mse equals hs-none-mse (to float32 rounding): HRA's matrix is orthogonal, and mse only uses norms "
        "(sink filter) and distances of token means, which an orthogonal map preserves. The same holds for ortho.",
        "Spec check (/work/notes/issue17-spec.md, sections 1-3, 6.2, 7): no disagreement with the reference code "
        "was found in what these cases exercise (loss formulas and info keys, reduction and sink filter, ether "
        "Htypes, flip_side and the raw reshape, hra with/without GS, soft/hard/dual svd, supr, ortho's -I init "
        "and base buffer, the 35 ReprPO preset configs). Spec 3.4 says the hard decomposer is the identity for a "
        "full-rank head with V >= d; a consequence it does not spell out is that svd with quantile >= 1 (dual or "
        "not) makes the transformed activations zero up to rounding (see x-hs-svd-rank-hard).",
        "etherplusHH at H=120: f = 120 // 60 = 2, nb = 2, so f % nb == 0 and the preset "
        "hs-ether-prefvec-Htype_etherplusHH runs (R3/R4 are [2,1]). ether flip_side at H=120: R is [nb, f/nb] = "
        "[2,1], so each H block is the 1x1 matrix [-1] for Htype ether.",
        "Masks are fed to the reference as int64 (as the tokenizer/collate produces them); they are stored as f32.",
        f"Margins checked: every sink-filter decision |norm - (mean + std)| > {MARGIN_SINK} relative (except the "
        f"hard-svd case), |beta*theta| < {MAX_BETA_THETA} for rank, |z| > {MARGIN_Z}, |pi_c - pi_r| logprobs > "
        f"{MARGIN_Z}, per-example |1e5*loss_proj| > {MARGIN_PROJ} where prefvec applies abs(), per key and example "
        f"|mean_h(orth)| and |cos| > {MARGIN_ORTH} where use_orth_loss / use_angle_loss, per-example "
        f"|mean_t(nll_pi - nll_ref)| > {MARGIN_NLL} for rank with use_nll_loss, supr |delta - 0.1| >= "
        f"{supr_margin:.4f}. Smallest sink margins: "
        + ", ".join(f"{n} {m:.1e}" for m, n in margins[:4]) + ".",
        "reduce cases: 'kept' is the effective token mask after the sink filter, read back from the reference's "
        "gradient (nonzero grad rows); null for NaN rows. all_zero_row: the reference gives NaN for the output row "
        "(0/0) and NaN gradients for that row's tokens; other rows are unaffected.",
    ])

    doc = {
        "meta": {
            "reference_commit": REFERENCE_COMMIT,
            "baukit": BAUKIT_COMMIT,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "script": "tests/reference/gen_methods_fixtures.py",
        },
        "sets": {
            s: {"keys": SETS[s]["keys"], "B": B, "T": T, "V": V, "widths": SETS[s]["widths"]} for s in SETS
        },
        "cases": cases,
        "reduce": red,
        "notes": NOTES,
    }
    os.makedirs(OUT, exist_ok=True)
    save_file(TENSORS, os.path.join(OUT, "methods.safetensors"), metadata={"reference_commit": REFERENCE_COMMIT})
    with open(os.path.join(OUT, "methods.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False, allow_nan=False)
        f.write("\n")

    w = max(len(c["name"]) for c in cases)
    print(f"{'case':<{w}}  {'loss_value':>14}  info")
    for c in cases:
        print(f"{c['name']:<{w}}  {c['loss_value']:>14.6g}  {len(c['info'])}")
    size = os.path.getsize(os.path.join(OUT, "methods.safetensors"))
    print(f"{len(cases)} cases, {len(red)} reduce cases, {len(TENSORS)} tensors, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
