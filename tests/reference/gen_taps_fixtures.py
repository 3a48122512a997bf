r"""Writes the side-activation ("tap") fixtures of the models crate: tests/fixtures/methods/tiny_llama/ (a tiny
random Llama and a PEFT LoRA adapter on it), tests/fixtures/methods/taps.safetensors and
tests/fixtures/methods/taps.json, for crates/reprpo-models/tests/all/collect.rs.

What it records comes from the reference ReprPO project itself (wassname/repr-preference-optimization at
bd9ae63, "side" mode): its layer parser ``parse_collection_layers`` and its module selection
``get_regexp_layers`` are imported and called, never re-implemented here, and the module inputs / outputs are
recorded with baukit's ``TraceDict`` (davidbau/baukit at 9d51abd), which is what the reference collects with.

    # the venv of tests/reference/requirements-methods.txt (torch 2.7.0, transformers 4.51.0, peft 0.15.2, ...)
    # plus, with --no-deps, baukit @ 9d51abd and the reference package @ bd9ae63:
    /work/venvs/reprpo-ref/bin/pip install --no-deps /work/venvs/src/baukit-9d51abd /work/venvs/src/reprpo-bd9ae63
    PYTHONHASHSEED=0 /work/venvs/reprpo-ref/bin/python tests/reference/gen_taps_fixtures.py

Packages this script needs beyond requirements-methods.txt: none (baukit and the reference package are
installed with --no-deps as above). baukit's package ``__init__`` imports torchvision, which the venv does not
have; the script therefore registers an empty ``baukit`` package pointing at the installed folder and imports
the real ``baukit/nethook.py`` from it (nothing of baukit is copied).

Nothing is downloaded: every weight is drawn from fixed seeds, CPU, float32, eager attention,
``torch.use_deterministic_algorithms(True)``. Two runs give byte-identical files.

Files
-----
tiny_llama/config.json, model.safetensors
    LlamaForCausalLM: vocab 64, hidden 32, 4 layers, 4 heads / 2 kv heads (head_dim 8), intermediate 48,
    rms_norm_eps 1e-5, rope_theta 1e4, max_position_embeddings 64, untied head. Every weight ~ 0.1 N(0,1),
    RMSNorm weights ~ 1 + 0.1 N(0,1) (seed 1701, parameters in sorted-name order). config.json as
    transformers 4.51 writes it (top-level rope_theta, torch_dtype); generation_config.json deleted.
tiny_llama/adapter/adapter_config.json, adapter_model.safetensors
    PEFT LoRA r 4, lora_alpha 8, use_rslora (scale 8 / sqrt 4 = 4), lora_dropout 0, target_modules
    [q_proj, v_proj] (sorted in the JSON), base_model_name_or_path "tiny_llama". lora_A and lora_B ~ 0.1 N(0,1)
    (seed 1702, sorted-name order), so lora_B is non-zero.
taps.safetensors (float32 unless said)
    input_ids, attention_mask  i64 [3, 10]: right-padded batch (row 0 full, row 1 padded by 3, row 2 by 5; pad
        token 0, real tokens uniform in [1, 64), seed 1703).
    on.<module>.input / on.<module>.output, off.<module>.input / off.<module>.output:
        <module> is the module path without PEFT's ``base_model.model.`` prefix, e.g.
        ``model.layers.2.self_attn.o_proj``. ``input`` for every o_proj and down_proj (the reference's default
        collection_keys_in, taken with retain_input), ``output`` for every q/k/v/gate/up_proj (the default
        collection_keys_out, retain_output). ``on``: adapter on; ``off``: inside ``model.disable_adapter()``.
        The q_proj / v_proj outputs with the adapter on are PEFT's LoRA wrapper outputs (base + delta).
    w.<module>.<input|output>: the weight of each tap in the objective, ~ N(0,1) (seed 1704, in the order of
        taps.json "objective_taps").
    objective [1]: s = sum over the taps of sum(tap * w), adapter on, one forward (train mode; dropout 0).
    grad.<PEFT key> : ds/dparam for every LoRA parameter, under its adapter_model.safetensors key
        (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, ...).
taps.json
    "num_layers": 4
    "objective_taps": [[module, "input"|"output"], ...] in the order of the objective.
    "selection": [{"model": "llama"|"phi3", "patterns": [...], "modules": [...]} or {..., "error": "..."}]:
        ``get_regexp_layers(patterns, peft_model)``, names with the PEFT prefix stripped and sorted (the
        reference returns a set). Llama: the tiny model above with its adapter; phi3: a 2-layer tiny
        Phi3ForCausalLM with LoRA on qkv_proj (only its module names matter).
    "side_paths": the reference's side-mode module list for keys_in and collection_layers "range(.3,-2)":
        ``get_layer_paths(get_regexp_layers(keys), parse_collection_layers(spec, 4))``, deduplicated, stripped and
        sorted: every block's o_proj and down_proj, whatever the layers (the reference at bd9ae63 applies no
        layer selection in side mode).
    "layers": [{"spec", "n", "result": [...]} or {"spec", "n", "error": "<ExceptionType>: <message>"}] from
        ``parse_collection_layers(spec, n)``.
"""

import importlib.util
import json
import os
import shutil
import sys
import types
import warnings

import torch
from safetensors.torch import load_file, save_file

# baukit's __init__ pulls torchvision (image widgets); load only its nethook module, from the installed package.
_spec = importlib.util.find_spec("baukit")
if _spec is None or not _spec.submodule_search_locations:
    sys.exit("baukit is not installed in this venv (see the docstring)")
_pkg = types.ModuleType("baukit")
_pkg.__path__ = list(_spec.submodule_search_locations)
sys.modules["baukit"] = _pkg
from baukit.nethook import TraceDict  # noqa: E402

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM  # noqa: E402

from reprpo.interventions.reprpo.helpers import get_layer_paths  # noqa: E402
from reprpo.interventions.reprpo.model import get_regexp_layers, parse_collection_layers  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "methods")
MODEL_DIR = os.path.join(OUT, "tiny_llama")
ADAPTER_DIR = os.path.join(MODEL_DIR, "adapter")
PREFIX = "base_model.model."
VOCAB, LAYERS = 64, 4
KEYS_IN = [".*o_proj$", ".*down_proj$"]
KEYS_OUT = [".*q_proj$", ".*k_proj$", ".*v_proj$", ".*gate_proj$", ".*up_proj$"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randomize(model, seed, only_trainable=False):
    g = gen(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if only_trainable and not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)


def build_model():
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=1e4,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    randomize(model, 1701)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    os.remove(os.path.join(MODEL_DIR, "generation_config.json"))


def load_base():
    return LlamaForCausalLM.from_pretrained(
        MODEL_DIR, attn_implementation="eager", torch_dtype=torch.float32
    ).eval()


def build_adapter():
    cfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True, target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(load_base(), cfg)
    model.peft_config["default"].base_model_name_or_path = "tiny_llama"
    randomize(model, 1702, only_trainable=True)
    model.save_pretrained(ADAPTER_DIR, safe_serialization=True, save_embedding_layers=False)
    os.remove(os.path.join(ADAPTER_DIR, "README.md"))  # peft's empty model card
    path = os.path.join(ADAPTER_DIR, "adapter_config.json")
    with open(path) as f:
        cfg_json = json.load(f)
    cfg_json["target_modules"] = sorted(cfg_json["target_modules"])  # a set in peft: order follows the hash seed
    with open(path, "w") as f:
        f.write(json.dumps(cfg_json, indent=2, sort_keys=True))


def inputs():
    g = gen(1703)
    b, t = 3, 10
    ids = torch.randint(1, VOCAB, (b, t), generator=g, dtype=torch.int64)
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[1, t - 3 :] = 0
    mask[2, t - 5 :] = 0
    return ids * mask, mask


def strip(name):
    assert name.startswith(PREFIX), name
    return name[len(PREFIX) :]


def tap_list(model):
    """(PEFT module name, side) of every default tap, in module order."""
    ins = set(get_regexp_layers(KEYS_IN, model))
    outs = set(get_regexp_layers(KEYS_OUT, model))
    taps = []
    for name, _ in model.named_modules():
        if name in ins:
            taps.append((name, "input"))
        if name in outs:
            taps.append((name, "output"))
    return taps


def record(model, ids, mask, taps):
    names = [n for n, _ in taps]
    with TraceDict(model, names, retain_input=True, retain_output=True) as ret:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return {(n, side): (ret[n].input if side == "input" else ret[n].output) for n, side in taps}


def taps_and_grads(ids, mask):
    model = PeftModel.from_pretrained(load_base(), ADAPTER_DIR, is_trainable=True)
    taps = tap_list(model)
    tensors = {}
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            off = record(model, ids, mask, taps)
    model.train()  # dropout is 0: train mode changes nothing but is what the policy forward uses
    on = record(model, ids, mask, taps)
    g = gen(1704)
    s = torch.zeros(())
    for n, side in taps:
        w = torch.randn(on[(n, side)].shape, generator=g, dtype=torch.float32)
        tensors[f"w.{strip(n)}.{side}"] = w
        s = s + (on[(n, side)] * w).sum()
        tensors[f"on.{strip(n)}.{side}"] = on[(n, side)].detach().clone()
        tensors[f"off.{strip(n)}.{side}"] = off[(n, side)].detach().clone()
    model.zero_grad(set_to_none=True)
    s.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads = get_peft_model_state_dict(model, state_dict=grads, save_embedding_layers=False)
    saved = load_file(os.path.join(ADAPTER_DIR, "adapter_model.safetensors"))
    assert set(grads) == set(saved), sorted(grads)
    assert all(float(v.abs().max()) > 0 for v in grads.values()), "a LoRA gradient is zero"
    for k, v in grads.items():
        tensors[f"grad.{k}"] = v
    tensors["objective"] = s.detach().reshape(1)
    tensors["input_ids"] = ids
    tensors["attention_mask"] = mask
    return tensors, [[strip(n), side] for n, side in taps]


def select(model, kind, patterns):
    row = {"model": kind, "patterns": patterns}
    try:
        row["modules"] = sorted(strip(n) for n in get_regexp_layers(patterns, model))
    except Exception as e:  # the reference raises ValueError when nothing matches; re.error for bad regexes
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def tiny_phi3():
    cfg = Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
    )
    model = Phi3ForCausalLM(cfg)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def selections():
    llama = PeftModel.from_pretrained(load_base(), ADAPTER_DIR)
    llama_cases = [
        KEYS_IN,
        KEYS_OUT,
        ["o_proj"],  # suffix match
        ["q_proj", "down_proj"],  # suffixes; q_proj must not select PEFT's lora_A / base_layer children
        [r"^base_model\.model\.model\.layers\.[12]\.mlp\.(gate|up)_proj$"],  # anchored at both ends
        [r"^model\.layers\.1\.mlp\.down_proj$"],  # anchored without PEFT's prefix: matches nothing there
        [r".*layers\.3\..*_proj$"],
        [".*qkv_proj$"],  # matches nothing: the reference's error
        [".*q_proj$", ".*qkv_proj$"],  # one pattern matches nothing: no error in the reference
        [r".*(?<!k)_proj$"],  # a lookbehind: Python's re only
    ]
    rows = [select(llama, "llama", p) for p in llama_cases]
    phi3 = tiny_phi3()
    rows += [select(phi3, "phi3", p) for p in (KEYS_IN, KEYS_OUT, [".*qkv_proj$", ".*gate_up_proj$"])]
    keys = get_regexp_layers(KEYS_IN, llama)
    layers = parse_collection_layers("range(.3,-2)", LAYERS)
    side = {
        "patterns": KEYS_IN,
        "collection_layers": "range(.3,-2)",
        "parsed_layers": layers,
        "paths": sorted({strip(p) for p in get_layer_paths(keys, layers)}),
    }
    return rows, side


LAYER_CASES = [
    ("range(.3,-2)", 4),
    ("range(.3,-2)", 16),
    ("range(.3,-2)", 28),
    ("-2,-1", 16),
    ("-2,1", 16),
    ("range(3,10,2)", 16),
    ("0.5,0.9,2", 16),
    ("1.0", 16),
    ("-0.5", 16),
    ("range(3,16)", 16),
    ("range(0,4,0)", 16),
    ("", 16),
    ("0.999", 16),
    ("inf", 16),
    # more corners of the same rules
    ("-inf", 16),
    ("nan", 16),
    ("range(3)", 16),
    ("range(20)", 16),
    ("range(0.25,0.75,2)", 16),
    (" -2 , -1 ,-2", 16),
    ("-1.5", 16),
    ("-17", 16),
    ("1e0,2E0", 16),
    ("1_0", 16),
    ("x", 16),
    ("range(1,3))", 16),
    ("range(2, 6, 17)", 16),
    ("0.3,,0.6", 10),
    ("1__0", 16),
    ("_1", 16),
    ("1_", 16),
    ("+2", 16),
    ("INFINITY", 16),
    (".5e1", 16),
    ("2.", 16),
    ("1.5", 16),
    ("-0", 16),
    ("range()", 16),
]


def layer_table():
    rows = []
    for spec, n in LAYER_CASES:
        row = {"spec": spec, "n": n}
        try:
            row["result"] = [int(v) for v in parse_collection_layers(spec, n)]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for d in (MODEL_DIR,):
        if os.path.exists(d):
            shutil.rmtree(d)
    os.makedirs(OUT, exist_ok=True)
    build_model()
    build_adapter()
    ids, mask = inputs()
    tensors, order = taps_and_grads(ids, mask)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, os.path.join(OUT, "taps.safetensors"))
    rows, side = selections()
    meta = {
        "num_layers": LAYERS,
        "objective_taps": order,
        "selection": rows,
        "side_paths": side,
        "layers": layer_table(),
    }
    with open(os.path.join(OUT, "taps.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(tensors)} tensors, {len(rows)} selections, {len(meta['layers'])} layer rows")


if __name__ == "__main__":
    main()
