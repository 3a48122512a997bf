"""Fixtures for a QLoRA step (issue 19): PEFT LoRA on a bitsandbytes-quantised tiny Llama, on the CPU.

Writes, under tests/fixtures/quant/qlora/:

* ``tiny_llama_dense/``: the dense f32 tiny Llama that ``gen_quant_fixtures.py`` quantised into
  ``tests/fixtures/quant/tiny_llama_bnb_nf4/`` (rebuilt here with the same seed and recipe; checked:
  ``quantize_4bit`` of every projection equals the committed packed tensors byte for byte).
* ``adapter/``: a PEFT LoRA adapter (r=4, alpha=8, dropout 0, the seven projections q, k, v, o, gate,
  up, down), saved with ``save_pretrained``. A is PEFT's default (Kaiming-uniform, ``torch.manual_seed(1)``),
  B is drawn from N(0, 0.05^2) (generator seeded 2) so that every A and B gets a gradient.
* ``qlora.safetensors``: ``input_ids`` [2, 10], ``attention_mask`` [2, 10] (row 1's last 3 tokens are
  padding), and per case ``{case}.logits`` [2, 10, 128], ``{case}.loss`` [1] and
  ``{case}.grad.{name}`` for every LoRA weight under PEFT's saved names
  (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``).
* ``qlora.json``: versions, the cases, the loss formula, the code paths.

Cases (all with the same adapter and batch; f32 compute):

* ``nf4``: the pre-quantised folder ``tiny_llama_bnb_nf4`` (nf4, double quant, block 64) loaded by
  transformers as it is.
* ``int8``: ``tiny_llama_dense`` quantised at load time by transformers with
  ``BitsAndBytesConfig(load_in_8bit=True)`` (LLM.int8 row-wise, weights cast to f16 first).
* ``nf4`` quantised at load time from ``tiny_llama_dense`` (``load_in_4bit``, nf4, double quant): the
  script checks that it gives the pre-quantised folder's tensors byte for byte and the ``nf4`` case's
  logits, loss and gradients exactly, so it stores nothing more for it (``nf4_at_load_equals_nf4``).

The loss (every case):

    loss = sum_{b, t < T-1, mask[b, t+1] = 1} -log_softmax(logits[b, t])[ids[b, t+1]]
           / #{(b, t) : t < T-1, mask[b, t+1] = 1}

i.e. the mean next-token cross-entropy over attended targets (transformers' ``labels`` loss with
``labels = ids`` and -100 where the mask is 0; checked equal). ``loss.backward()`` then gives the
gradients.

Code paths (bitsandbytes 0.50.2 on the CPU; models in ``train()`` mode, all dropout 0):

* ``Linear4bit``: ``support_avx512bf16_for_cpu = False`` on every layer (on an AVX-512-BF16 CPU an
  eval-mode forward on an input without gradient would repack the weight and run a bf16 GEMV);
  ``matmul_4bit`` -> ``gemm_4bit`` (bnb's default implementation: ``dequantize_4bit`` (CPU kernel; every
  row length here is a multiple of the block size, where that kernel is right) then an f32
  ``linear``); backward ``grad @ dequantize_4bit(W)``.
* ``Linear8bitLt`` in train mode on the CPU: ``MatMul8bitFp``: ``CB * (SCB / 127)`` in f32 then an
  f32 ``linear`` (in eval mode it would instead quantise the activations to int8 as well, LLM.int8's
  inference path, which is not what a QLoRA step computes); backward ``grad @ that weight``.
* Cross-check: each case's logits equal a dense f32 transformers model holding bnb's dequantised
  weights with the LoRA delta ``s B A`` merged in (recorded in qlora.json).

Run (see requirements-quant.txt for the environment; same venv as gen_quant_fixtures.py):

    /work/venvs/bnb/bin/python tests/reference/gen_qlora_fixtures.py
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
import numpy  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

# Shared with the script that writes the folders read here (its directory is on sys.path).
from gen_quant_fixtures import keep_only, next_token_loss, no_bf16_repack  # noqa: E402
from gen_quant_fixtures import peft_batch as batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUANT = ROOT / "tests" / "fixtures" / "quant"
OUT = QUANT / "qlora"
PREQ = QUANT / "tiny_llama_bnb_nf4"

torch.set_num_threads(1)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 8


def dense_tiny_llama() -> transformers.LlamaForCausalLM:
    """gen_quant_fixtures.py's tiny_llama(), before quantisation (same config, seed and draws)."""
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    return model


def step(model, ids, mask) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, loss, backward on a PEFT model; gradients under PEFT's saved names."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask)
    loss = next_token_loss(out.logits, ids, mask)
    labels = ids.masked_fill(mask == 0, -100)
    hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(hf, loss, rtol=1e-6, atol=0), (float(hf), float(loss))
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().max() > 0, name
            grads[name.replace(".default.", ".")] = p.grad.detach().clone().contiguous()
        else:
            assert p.grad is None, name
    return out.logits.detach().float().contiguous(), loss.detach().reshape(1), grads


def dequantised_weight(mod) -> torch.Tensor:
    if isinstance(mod, bnb.nn.Linear4bit):
        return F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
    assert isinstance(mod, bnb.nn.Linear8bitLt)
    st = mod.state
    return st.CB.to(torch.float32).mul_(st.SCB.unsqueeze(1).mul(1.0 / 127.0))


def merged_dense_logits(peft_model, dense_folder: Path, ids, mask) -> torch.Tensor:
    """A dense f32 model holding the quantised model's dequantised weights + s B A: the same logits."""
    ref = transformers.LlamaForCausalLM.from_pretrained(dense_folder, dtype=torch.float32).eval()
    sd = ref.state_dict()
    scale = ALPHA / R
    with torch.no_grad():
        for name, mod in peft_model.named_modules():
            if isinstance(mod, peft.tuners.lora.LoraLayer):
                base = mod.get_base_layer()
                w = dequantised_weight(base)
                delta = mod.lora_B["default"].weight @ mod.lora_A["default"].weight * scale
                key = name.removeprefix("base_model.model.") + ".weight"
                sd[key].copy_(w + delta)
        return ref(input_ids=ids, attention_mask=mask).logits.float()


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    ids, mask = batch()
    tensors: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    meta: dict = {
        "generator": "tests/reference/gen_qlora_fixtures.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "bitsandbytes": bnb.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "safetensors": safetensors.__version__,
            "numpy": numpy.__version__,
        },
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "loss": "mean over (b, t < T-1) with attention_mask[b, t+1] = 1 of "
        "-log_softmax(logits[b, t])[input_ids[b, t+1]] (= transformers' labels loss, labels = ids, -100 on padding)",
        "lora": {
            "r": R,
            "lora_alpha": ALPHA,
            "lora_dropout": 0.0,
            "target_modules": TARGETS,
            "init": "A: PEFT default (kaiming uniform) after torch.manual_seed(1); B: N(0, 0.05^2), generator seed 2",
        },
        "cases": {},
    }

    # 1. the dense model, and proof that it is the original of the pre-quantised folder
    dense = dense_tiny_llama()
    dense_dir = OUT / "tiny_llama_dense"
    dense.save_pretrained(dense_dir, safe_serialization=True)
    keep_only(dense_dir, {"config.json", "model.safetensors"})
    dense_sd = load_file(str(dense_dir / "model.safetensors"))
    preq = load_file(str(PREQ / "model.safetensors"))
    n_checked = 0
    for key, w in dense_sd.items():
        if any(f".{t}." in key for t in TARGETS):
            mod = key.removesuffix(".weight")
            packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            assert torch.equal(preq[key], packed), key
            for k, v in st.as_dict(packed=True).items():
                assert torch.equal(preq[f"{mod}.weight.{k}"], v), (key, k)
            n_checked += 1
        else:
            assert torch.equal(preq[key], w), key
    assert n_checked == 14
    meta["dense_folder"] = {
        "folder": "tiny_llama_dense",
        "dtype": "float32",
        "is_original_of": "../tiny_llama_bnb_nf4 (quantize_4bit of every projection equals its tensors byte for byte)",
    }

    # 2. the pre-quantised nf4 folder + a new PEFT adapter
    q4 = transformers.LlamaForCausalLM.from_pretrained(PREQ, dtype=torch.float32, device_map="cpu")
    no_bf16_repack(q4)
    torch.manual_seed(1)
    lcfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    pm = peft.get_peft_model(q4, lcfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adir = OUT / "adapter"
    pm.save_pretrained(adir)
    keep_only(adir, {"adapter_config.json", "adapter_model.safetensors"})
    acfg = json.loads((adir / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = "tiny_llama_bnb_nf4"  # not this machine's path
    acfg["target_modules"] = sorted(acfg["target_modules"])  # a Python set: order varies per run
    (adir / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")

    logits, loss, grads = step(pm, ids, mask)
    cross = merged_dense_logits(pm, dense_dir, ids, mask)
    nf4 = {"logits": logits, "loss": loss, "grads": grads}
    tensors["nf4.logits"] = logits
    tensors["nf4.loss"] = loss
    for k, v in grads.items():
        tensors[f"nf4.grad.{k}"] = v
    meta["cases"]["nf4"] = {
        "model": "../tiny_llama_bnb_nf4 (pre-quantised, read as it is)",
        "quantization": {"quant_type": "nf4", "double_quant": True, "blocksize": 64},
        "loss": float(loss),
        "n_lora_params": len(grads),
        "max_abs_logit_diff_vs_dense_dequantised_merged": float((logits - cross).abs().max()),
        "max_abs_logit": float(logits.abs().max()),
    }
    saved_adapter = load_file(str(adir / "adapter_model.safetensors"))
    assert sorted(saved_adapter) == sorted(grads), "adapter and gradient names differ"

    # 3. load-time cases from the dense folder, same adapter
    cases = {
        "int8": transformers.BitsAndBytesConfig(load_in_8bit=True),
        "nf4_at_load": transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    }
    for case, qcfg in cases.items():
        qm = transformers.LlamaForCausalLM.from_pretrained(
            dense_dir, quantization_config=qcfg, dtype=torch.float32, device_map="cpu"
        )
        no_bf16_repack(qm)
        n_quant = sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in qm.modules())
        assert n_quant == 14, (case, n_quant)
        if case == "nf4_at_load":
            with tempfile.TemporaryDirectory() as tmp:
                qm.save_pretrained(tmp, safe_serialization=True)
                again = load_file(str(Path(tmp) / "model.safetensors"))
            assert sorted(again) == sorted(preq), case
            for k, v in preq.items():
                assert torch.equal(again[k], v), (case, k)
        pmq = peft.PeftModel.from_pretrained(qm, adir, is_trainable=True)
        logits_c, loss_c, grads_c = step(pmq, ids, mask)
        cross_c = merged_dense_logits(pmq, dense_dir, ids, mask)
        if case == "nf4_at_load":
            same = torch.equal(logits_c, nf4["logits"]) and torch.equal(loss_c, nf4["loss"])
            same = same and all(torch.equal(grads_c[k], v) for k, v in nf4["grads"].items())
            assert same, "nf4 quantised at load differs from the pre-quantised folder"
            meta["nf4_at_load_equals_nf4"] = {
                "model": "tiny_llama_dense quantised by from_pretrained(quantization_config=BitsAndBytesConfig("
                "load_in_4bit=True, nf4, double quant, compute float32))",
                "saved_tensors_equal_prequantised_folder": True,
                "logits_loss_grads_equal_nf4_case": True,
            }
            continue
        tensors[f"{case}.logits"] = logits_c
        tensors[f"{case}.loss"] = loss_c
        for k, v in grads_c.items():
            tensors[f"{case}.grad.{k}"] = v
        meta["cases"][case] = {
            "model": "tiny_llama_dense quantised at load: from_pretrained(quantization_config="
            "BitsAndBytesConfig(load_in_8bit=True)) (Int8Params: f16 cast, row-wise absmax SCB)",
            "quantization": {"quant_type": "int8"},
            "forward": "Linear8bitLt in train mode -> MatMul8bitFp (dequantise, f32 linear)",
            "loss": float(loss_c),
            "n_lora_params": len(grads_c),
            "max_abs_logit_diff_vs_dense_dequantised_merged": float((logits_c - cross_c).abs().max()),
            "max_abs_logit_diff_vs_nf4": float((logits_c - nf4["logits"]).abs().max()),
        }

    save_file(tensors, str(OUT / "qlora.safetensors"))
    (OUT / "qlora.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)", file=sys.stderr)
    print(json.dumps(meta["cases"], indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
