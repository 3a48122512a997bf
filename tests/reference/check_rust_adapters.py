"""Loads the adapters that reprpo saved (crates/reprpo-models/tests/all/peft_export.rs) with PEFT 0.21.2
and checks PEFT computes the same logits as reprpo did (real positions, relative to max |logit|).

    REPRPO_EXPORT_DIR=/tmp/rust_adapters cargo test -p reprpo-models --test all peft_export:: -- --ignored
    /work/venvs/models/bin/python tests/reference/check_rust_adapters.py /tmp/rust_adapters
"""

import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(HERE, "..", "fixtures", "models", "llama_gqa_rope3")
root = sys.argv[1]
inp = load_file(os.path.join(BASE, "adapters", "inputs.safetensors"))
mask = inp["attention_mask"].bool()
worst = 0.0
# PEFT's CPU path forces boft_n_butterfly_factor to 1 (it needs its fbd_cuda extension for more),
# so it cannot load a factor-2 BOFT adapter on a CPU-only machine; checked against our own
# factor-2 reference instead (tests/all/orth_reference.rs).
CPU_IMPOSSIBLE = {"boft_nbf2_reference"}
for kind in sorted(os.listdir(root)):
    if kind in CPU_IMPOSSIBLE and not torch.cuda.is_available():
        print(f"{kind:22s} skipped: PEFT on CPU cannot build factor-2 BOFT")
        continue
    base = LlamaForCausalLM.from_pretrained(BASE, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, os.path.join(root, kind))
    model.eval()
    with torch.no_grad():
        got = model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], position_ids=inp["position_ids"]).logits
    want = load_file(os.path.join(root, kind, "rust_logits.safetensors"))["logits"]
    err = ((got - want).abs()[mask].max() / want.abs()[mask].max()).item()
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], position_ids=inp["position_ids"]).logits
    moved = ((got - base_logits).abs()[mask].max() / base_logits.abs()[mask].max()).item()
    print(f"{kind:22s} rel err {err:.2e}   (adapter moves logits by {moved:.2e})")
    assert moved > 1e-3, f"{kind}: the adapter does nothing, the check proves little"
    worst = max(worst, err)
print(f"worst rel err {worst:.2e}")
assert worst < 1e-4, "PEFT disagrees with reprpo"
