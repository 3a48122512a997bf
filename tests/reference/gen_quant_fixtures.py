"""Fixtures for bitsandbytes-compatible 4-bit / 8-bit weight quantisation (issue 19).

Writes, under tests/fixtures/quant/:

* ``quant.safetensors`` + ``quant.json``: for a handful of small weights (odd shapes, f32 / bf16 / f16,
  an all-zero block, a large outlier, a last block that is not full), bitsandbytes' own outputs for
  nf4, fp4, nf4 + double quant, fp4 + double quant and LLM.int8 row-wise: the tensors exactly as
  ``Linear4bit`` / ``Linear8bitLt`` save them (``{case}.{variant}.weight``, ``.weight.absmax``,
  ``.weight.quant_map``, ``.weight.nested_absmax``, ``.weight.nested_quant_map``,
  ``.weight.quant_state.bitsandbytes__nf4`` / ``__fp4``; int8: ``.weight``, ``.SCB``, ``.weight_format``)
  and the dequantised weights; plus ``mean.{n}`` vectors with PyTorch's ``mean()`` of each (the
  double-quant offset is ``absmax.mean()``, so the Rust side reproduces PyTorch's CPU summation order).
* ``tiny_llama_bnb_nf4/``: a tiny random Llama quantised by transformers (BitsAndBytesConfig, nf4,
  double quant, compute dtype f32) on the CPU and saved with ``save_pretrained``;
  ``tiny_llama_bnb_nf4_reference.safetensors`` holds its logits on a fixed batch and bnb's dequantised
  f32 weight of every quantised linear.

* ``tiny_llama_bnb_int8/``: the same tiny Llama (same seed and draws) quantised by transformers with
  ``BitsAndBytesConfig(load_in_8bit=True)`` (LLM.int8 row-wise; ``Int8Params`` casts each weight to
  float16, then ``int8_vectorwise_quant``) on the CPU and saved with ``save_pretrained`` (bitsandbytes
  0.50.2 saves int8 on the CPU: ``{module}.weight`` I8, ``{module}.SCB`` F32, ``{module}.weight_format``
  U8 scalar 0; checked equal to ``int8_vectorwise_quant(original.to(float16))``).
  ``tiny_llama_bnb_int8_reference.safetensors`` holds transformers' logits on that folder, reloaded as
  it is (``from_pretrained(folder)``, no re-quantisation) on the nf4 folder's batch:

  - ``logits``: the model in ``train()`` mode under ``no_grad`` (every dropout is 0): ``Linear8bitLt`` ->
    ``MatMul8bitFp`` on the CPU, i.e. ``CB * (SCB / 127)`` in f32 then an f32 ``linear``, the path a
    QLoRA step takes and the one this project computes (checked equal to a dense f32 model holding those
    weights);
  - ``logits_llm_int8_inference``: ``eval()`` mode, bitsandbytes' LLM.int8 inference path
    (``MatMul8bitLt``: the activations quantised to int8 as well, outlier threshold 6.0), which this
    project does not implement; recorded for comparison only (quant.json ``tiny_llama_int8``).
* ``peft_nf4/``: a PEFT LoRA adapter trained by PEFT on the pre-quantised ``tiny_llama_bnb_nf4`` folder
  (read as it is): r=4, alpha=8, dropout 0, task CAUSAL_LM, the seven projections; PEFT's default
  init (``torch.manual_seed(3)``), then 4 steps of ``torch.optim.AdamW(lr=1e-2)`` on the mean
  next-token cross-entropy of the batch below; saved with ``save_pretrained`` (``adapter/``:
  ``adapter_model.safetensors`` + ``adapter_config.json``; ``base_model_name_or_path`` set to
  ``tiny_llama_bnb_nf4`` and ``target_modules`` sorted, PEFT writing a Python set). ``peft_nf4.safetensors``:
  ``input_ids`` / ``attention_mask`` [2, 10] (row 1's last 3 tokens padding), PEFT's ``logits`` of
  base + adapter (``eval()``, ``no_grad``) and ``logits_base`` (``disable_adapter()``); the adapter
  moves the logits by ``adapter_moves_logits`` in quant.json.

Checking an adapter saved by reprpo with PEFT (the "here -> PEFT" direction of ``peft_nf4``):

    REPRPO_EXPORT_DIR=/tmp/rust_qlora cargo test -p reprpo-models --test all peft_prequantised::
    /work/venvs/bnb/bin/python tests/reference/gen_quant_fixtures.py --check-rust-adapters /tmp/rust_qlora

loads every adapter folder under that directory with ``PeftModel.from_pretrained`` on the pre-quantised
nf4 folder, checks that PEFT holds exactly the file's tensors and that its logits on the ``peft_nf4``
batch are within 1e-4 of the ``rust_logits.safetensors`` reprpo wrote beside the adapter. It writes
no fixture.

Which bitsandbytes code path runs on the CPU (bitsandbytes 0.50.2; checked with
``torch._C._dispatch_dump``, recorded in quant.json):

* ``quantize_4bit``: no CPU kernel is registered; bnb's default PyTorch implementation runs
  (``backends/default/ops.py``: absmax per flat block of ``blocksize``, ``A * (1 / absmax)``
  (the last, partial block ``A / absmax``), clamp to [-1, 1], ``torch.bucketize`` on the midpoints of
  the sorted code book, two codes per byte, the first in the high nibble).
* ``quantize_blockwise`` (the 8-bit dynamic quantisation of the absmax for double quant): bnb's CPU
  kernel (``libbitsandbytes_cpu.so``, ``quantize_cpu_impl``: a 65536-entry look-up table of the nearest
  code, indexed by ``trunc(fma((x + 1) * 0.5, 65535, 0.5))``).
* ``dequantize_blockwise`` (the nested absmax): bnb's CPU kernel (``code[q] * absmax`` in f32).
* ``dequantize_4bit``: bnb's CPU kernel. On an AVX-512 CPU it indexes the absmax as
  ``row * (cols / blocksize) + col / blocksize`` whenever ``cols % 16 == 0``, which is wrong when
  ``cols`` is not a multiple of ``blocksize`` (e.g. [32, 96]): the fixture's ``dequant`` is therefore
  bnb's default PyTorch implementation (``_dequantize_4bit_compute``, uncompiled, the one bnb itself
  falls back to for odd shapes: ``code[nibble] * absmax[flat // blocksize]`` in f32, then cast), and
  ``cpu_kernel_matches_default`` in quant.json says per case whether the CPU kernel agrees.
* ``int8_vectorwise_quant`` / ``int8_vectorwise_dequant``: bnb's default PyTorch implementation
  (no CPU kernel). ``Int8Params`` casts the weight to float16 first; so does the fixture.

Run (see requirements-quant.txt for the environment):

    /work/venvs/bnb/bin/python tests/reference/gen_quant_fixtures.py

``gen_qlora_fixtures.py`` reads ``tiny_llama_bnb_nf4/``: regenerate its fixtures after this script
if that folder changed.
"""

from __future__ import annotations

import argparse
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
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "quant"

torch.set_num_threads(1)


def dispatch_path(op: str) -> str:
    dump = torch._C._dispatch_dump(f"bitsandbytes::{op}")
    return "cpu kernel (libbitsandbytes_cpu)" if "\nCPU:" in dump else "default (PyTorch implementation)"


def ref_dequant_4bit(packed: torch.Tensor, absmax_f32: torch.Tensor, qt: str, bs: int, shape, dtype):
    """bnb's default dequantize_4bit, without torch.compile."""
    code = F.get_4bit_type(qt, device="cpu")
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return fn(packed.view(torch.uint8).reshape(-1), absmax_f32, code, bs, list(shape), dtype)


def make_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(19)
    cases = {}
    # Rows (96) not a multiple of the block: blocks straddle rows; an all-zero block; an outlier;
    # values tiny enough for fp4's two zero codes.
    a = torch.randn(32, 96, generator=g)
    a.view(-1)[64:128] = 0.0
    a.view(-1)[200] = 40.0
    a.view(-1)[300:304] = torch.tensor([1e-3, -1e-3, 2e-3, -0.0])
    cases["a"] = a
    cases["b"] = torch.randn(64, 64, generator=g).to(torch.bfloat16)  # bf16 input
    cases["c"] = torch.randn(33, 64, generator=g) * 0.02  # odd row count, weight-like scale
    cases["d"] = torch.randn(16, 40, generator=g)  # rows % 16 != 0: bnb's scalar CPU path
    e = torch.randn(8, 33, generator=g)  # odd row length; last block 8 values
    e[3] = 0.0  # a zero row (int8: row scale 0)
    cases["e"] = e
    # 272 blocks of 32: two nested blocks of 256, the second partial; rows of growing scale
    cases["f"] = (torch.randn(136, 64, generator=g) * torch.linspace(0.1, 3.0, 136).unsqueeze(1)).to(
        torch.bfloat16
    )
    cases["g"] = torch.randn(32, 64, generator=g).to(torch.float16)
    return cases


VARIANTS = {
    "nf4": ("nf4", False, 64),
    "fp4": ("fp4", False, 64),
    "nf4_dq": ("nf4", True, 64),
    "fp4_dq": ("fp4", True, 64),
    "nf4_bs128": ("nf4", False, 128),
    "fp4_dq_bs32": ("fp4", True, 32),
    "nf4_dq_bs32": ("nf4", True, 32),
}
ALL4 = ["nf4", "fp4", "nf4_dq", "fp4_dq"]
CASE_VARIANTS = {
    "a": ALL4 + ["nf4_bs128"],
    "b": ALL4,
    "c": ALL4 + ["fp4_dq_bs32"],
    "d": ["nf4", "fp4_dq"],
    "e": ALL4 + ["nf4_bs128", "fp4_dq_bs32"],
    "f": ["fp4_dq", "nf4_dq_bs32"],
    "g": ["nf4", "fp4_dq"],
}
INT8_DEQUANT = {"a", "b", "d", "e", "g"}
# f32 cases whose bf16 output is also recorded
BF16_OUT = {("a", "nf4"), ("a", "fp4_dq"), ("c", "nf4_dq"), ("e", "fp4")}


def quant_fixtures(tensors: dict, meta: dict) -> None:
    for name, w in make_cases().items():
        tensors[f"{name}.input"] = w.contiguous()
        cmeta = {"shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."), "variants": {}}
        for vname in CASE_VARIANTS[name]:
            qt, dq, bs = VARIANTS[vname]
            packed, st = F.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type=qt)
            prefix = f"{name}.{vname}."
            tensors[prefix + "weight"] = packed
            for k, v in st.as_dict(packed=True).items():
                tensors[prefix + "weight." + k] = v.contiguous()
            # absmax as bnb's dequantize_4bit sees it (nested: dequantize_blockwise + offset, CPU kernel)
            if st.nested:
                absmax = F.dequantize_blockwise(st.absmax, st.state2)
                absmax += st.offset
            else:
                absmax = st.absmax
            ref = ref_dequant_4bit(packed, absmax.float(), qt, bs, w.shape, w.dtype)
            cpu = F.dequantize_4bit(packed, st)
            tensors[prefix + "dequant"] = ref.contiguous()
            if st.nested:
                tensors[prefix + "dequant_absmax"] = absmax.float().contiguous()
            if (name, vname) in BF16_OUT:
                # bf16 output of the same codes (the cast is round-to-nearest-even from the f32 product)
                st_bf = F.QuantState(
                    absmax=absmax.float(), shape=w.shape, code=st.code, blocksize=bs, quant_type=qt,
                    dtype=torch.bfloat16,
                )
                ref_bf = ref_dequant_4bit(packed, absmax.float(), qt, bs, w.shape, torch.bfloat16)
                cpu_bf = F.dequantize_4bit(packed, st_bf)
                tensors[prefix + "dequant_bf16"] = ref_bf.contiguous()
                bf_match = bool(torch.equal(cpu_bf.view(torch.int16), ref_bf.view(torch.int16)))
            else:
                bf_match = None
            cmeta["variants"][vname] = {
                "quant_type": qt,
                "double_quant": dq,
                "blocksize": bs,
                "offset": float(st.offset) if st.nested else None,
                "cpu_kernel_matches_default": bool(
                    torch.equal(cpu.float().view(torch.int32), ref.float().view(torch.int32))
                ),
                "cpu_kernel_matches_default_bf16": bf_match,
                "quant_state_json": bytes(
                    st.as_dict(packed=True)[f"quant_state.bitsandbytes__{qt}"].tolist()
                ).decode(),
            }
        # LLM.int8 row-wise, as Int8Params._quantize does it (weight cast to float16 first)
        cb, scb, _ = F.int8_vectorwise_quant(w.contiguous().to(torch.float16))
        p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
        assert torch.equal(p.CB, cb) and torch.equal(p.SCB, scb)
        tensors[f"{name}.int8.weight"] = cb.contiguous()
        tensors[f"{name}.int8.SCB"] = scb.contiguous()
        tensors[f"{name}.int8.weight_format"] = torch.tensor(0, dtype=torch.uint8)
        if name in INT8_DEQUANT:
            tensors[f"{name}.int8.dequant"] = F.int8_vectorwise_dequant(cb, scb).contiguous()
        meta["cases"][name] = cmeta


def mean_fixtures(tensors: dict, meta: dict) -> None:
    g = torch.Generator().manual_seed(7)
    lengths = [1, 3, 15, 16, 17, 63, 64, 65, 96, 100, 255, 256, 257, 1000, 1031, 4099]
    for n in lengths:
        x = torch.rand(n, generator=g) * 3.0
        tensors[f"mean.{n}.x"] = x
        tensors[f"mean.{n}.mean"] = x.mean().reshape(1)
    meta["mean_lengths"] = lengths


def dense_tiny_llama() -> transformers.LlamaForCausalLM:
    """The tiny random Llama every folder here quantises (f32)."""
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
        for p in model.parameters():  # weights at a scale where 4-bit error is visible but small
            p.normal_(0.0, 0.08) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    return model


def tiny_llama(meta: dict) -> None:
    model = dense_tiny_llama()
    folder = OUT / "tiny_llama_bnb_nf4"
    bnb_cfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        originals = load_file(str(Path(tmp) / "model.safetensors"))
        q = transformers.LlamaForCausalLM.from_pretrained(
            tmp, quantization_config=bnb_cfg, dtype=torch.float32, device_map="cpu"
        ).eval()
    if folder.exists():
        shutil.rmtree(folder)
    # Save before any forward: on an AVX-512-BF16 CPU, Linear4bit.forward repacks the weight for its
    # bf16 CPU GEMV (absmax cast to bf16) and save_pretrained would re-quantise from that.
    q.save_pretrained(folder, safe_serialization=True)
    for f in folder.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    saved = load_file(str(folder / "model.safetensors"))

    ref = {}
    linears = []
    for name, mod in q.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            linears.append(name)
            st = mod.weight.quant_state
            w = F.dequantize_4bit(mod.weight.data, st)  # f32; in % 64 == 0 here, so the CPU kernel is right
            absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
            w_ref = ref_dequant_4bit(mod.weight.data, absmax.float(), "nf4", 64, st.shape, torch.float32)
            assert torch.equal(w, w_ref), name
            ref[f"{name}.weight.dequant"] = w.contiguous()
            # the saved tensors are exactly bnb's functional quantize_4bit of the original weight
            packed, st2 = F.quantize_4bit(
                originals[f"{name}.weight"], blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            assert torch.equal(saved[f"{name}.weight"], packed), name
            for k, v in st2.as_dict(packed=True).items():
                assert torch.equal(saved[f"{name}.weight.{k}"], v), (name, k)

    ids = torch.tensor(NF4_IDS)
    no_bf16_repack(q)
    with torch.no_grad():
        logits = q(input_ids=ids).logits.float()
    with torch.no_grad():
        logits_f32 = model(input_ids=ids).logits.float()
    ref["input_ids"] = ids.to(torch.int64)
    ref["logits"] = logits.contiguous()
    ref["logits_unquantised"] = logits_f32.contiguous()
    save_file(ref, str(OUT / "tiny_llama_bnb_nf4_reference.safetensors"))
    meta["tiny_llama"] = {
        "folder": "tiny_llama_bnb_nf4",
        "quantized_linears": linears,
        "config": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32", "dtype": "float32"},
        "quantized_by": "transformers from_pretrained(quantization_config=BitsAndBytesConfig(...), device_map='cpu')"
        " on the CPU; saved with save_pretrained before any forward; tensors checked equal to "
        "bitsandbytes.functional.quantize_4bit(original, blocksize=64, compress_statistics=True, quant_type='nf4')",
        "logits_path": "Linear4bit with support_avx512bf16_for_cpu=False: bnb.matmul_4bit -> dequantize_4bit "
        "(CPU kernel) -> f32 linear; the default on an AVX-512-BF16 CPU would repack the weight and run a bf16 GEMV",
        "reference_file": "tiny_llama_bnb_nf4_reference.safetensors",
        "max_abs_logit_diff_vs_unquantised": float((logits - logits_f32).abs().max()),
    }


NF4_IDS = [[1, 5, 9, 17, 33, 65, 127, 2], [3, 3, 40, 80, 100, 7, 0, 64]]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def keep_only(folder: Path, names: set[str]) -> None:
    for f in folder.iterdir():
        if f.name not in names:
            f.unlink()


def no_bf16_repack(model) -> None:
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False  # dequantise + f32 linear (bnb's generic CPU path)


def tiny_llama_int8(meta: dict) -> None:
    """``tiny_llama_bnb_int8/`` and its reference logits (module docstring)."""
    model = dense_tiny_llama()
    folder = OUT / "tiny_llama_bnb_int8"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        originals = load_file(str(Path(tmp) / "model.safetensors"))
        q = transformers.LlamaForCausalLM.from_pretrained(
            tmp,
            quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True),
            dtype=torch.float32,
            device_map="cpu",
        ).eval()
    if folder.exists():
        shutil.rmtree(folder)
    q.save_pretrained(folder, safe_serialization=True)  # before any forward
    keep_only(folder, {"config.json", "model.safetensors"})
    saved = load_file(str(folder / "model.safetensors"))

    # The saved tensors are Int8Params' quantisation of the original weights; the rest unchanged.
    linears = sorted(n for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear8bitLt))
    assert len(linears) == 14, linears
    for name in linears:
        cb, scb, _ = F.int8_vectorwise_quant(originals[f"{name}.weight"].to(torch.float16))
        assert saved[f"{name}.weight"].dtype == torch.int8, name
        assert torch.equal(saved[f"{name}.weight"], cb), name
        assert torch.equal(saved[f"{name}.SCB"], scb), name
        wf = saved[f"{name}.weight_format"]
        assert wf.dtype == torch.uint8 and wf.shape == () and int(wf) == 0, name
    quantised = {f"{n}.{k}" for n in linears for k in ("weight", "SCB", "weight_format")}
    assert set(saved) == quantised | (set(originals) - {f"{n}.weight" for n in linears})
    for k, v in originals.items():
        if k not in quantised:
            assert torch.equal(saved[k], v), k

    # transformers reads the folder as it is (no re-quantisation): its modules hold the saved bytes.
    r = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    mods = dict(r.named_modules())
    weights = {}
    for name in linears:
        mod = mods[name]
        assert isinstance(mod, bnb.nn.Linear8bitLt), name
        assert torch.equal(mod.weight.data, saved[f"{name}.weight"]), name
        scb = mod.weight.SCB if getattr(mod.weight, "SCB", None) is not None else mod.state.SCB
        assert torch.equal(scb, saved[f"{name}.SCB"]), name
        # MatMul8bitFp's weight: CB.to(f32).mul_(SCB.unsqueeze(1).mul(1 / 127))
        weights[name] = saved[f"{name}.weight"].to(torch.float32).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))

    ids = torch.tensor(NF4_IDS)
    with torch.no_grad():
        r.train()  # Linear8bitLt on the CPU in train mode: MatMul8bitFp (dequantise, f32 linear)
        logits = r(input_ids=ids).logits.float()
        r.eval()  # LLM.int8 inference (int8 activations); not what reprpo computes
        logits_inference = r(input_ids=ids).logits.float()
        dense = dense_tiny_llama()
        sd = dense.state_dict()
        for name, w in weights.items():
            sd[f"{name}.weight"].copy_(w)
        logits_dense = dense(input_ids=ids).logits.float()
    save_file(
        {
            "input_ids": ids.to(torch.int64),
            "logits": logits.contiguous(),
            "logits_llm_int8_inference": logits_inference.contiguous(),
        },
        str(OUT / "tiny_llama_bnb_int8_reference.safetensors"),
    )
    meta["tiny_llama_int8"] = {
        "folder": "tiny_llama_bnb_int8",
        "quantized_linears": linears,
        "quantized_by": "transformers from_pretrained(quantization_config=BitsAndBytesConfig(load_in_8bit=True), "
        "dtype=float32, device_map='cpu') on the CPU; saved with save_pretrained before any forward; tensors "
        "checked equal to bitsandbytes.functional.int8_vectorwise_quant(original.to(float16))",
        "reloaded_by": "transformers from_pretrained(folder) (pre-quantised, read as saved; checked)",
        "logits_path": "train() under no_grad: Linear8bitLt -> MatMul8bitFp: CB.to(f32) * (SCB / 127), f32 linear",
        "reference_file": "tiny_llama_bnb_int8_reference.safetensors",
        "max_abs_logit_diff_vs_dense_with_dequantised_weights": float((logits - logits_dense).abs().max()),
        "max_abs_logit_diff_llm_int8_inference_vs_logits": float((logits_inference - logits).abs().max()),
        "max_abs_logit": float(logits.abs().max()),
    }


def peft_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(
        [[1, 5, 9, 17, 33, 65, 127, 2, 44, 90], [3, 3, 40, 80, 100, 7, 64, 0, 0, 0]], dtype=torch.int64
    )
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    m = mask[:, 1:].float()
    return (nll * m).sum() / m.sum()


def load_nf4_folder():
    q4 = transformers.LlamaForCausalLM.from_pretrained(
        OUT / "tiny_llama_bnb_nf4", dtype=torch.float32, device_map="cpu"
    )
    no_bf16_repack(q4)
    return q4


def peft_nf4(meta: dict) -> None:
    """``peft_nf4/``: a LoRA adapter trained by PEFT on the pre-quantised nf4 folder (module docstring)."""
    out = OUT / "peft_nf4"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    ids, mask = peft_batch()
    torch.manual_seed(3)
    lcfg = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"
    )
    pm = peft.get_peft_model(load_nf4_folder(), lcfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    assert len(params) == 28 and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    pm.train()
    losses = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        loss = next_token_loss(pm(input_ids=ids, attention_mask=mask).logits, ids, mask)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    pm.eval()
    adir = out / "adapter"
    pm.save_pretrained(adir)
    keep_only(adir, {"adapter_config.json", "adapter_model.safetensors"})
    acfg = json.loads((adir / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = "tiny_llama_bnb_nf4"  # not this machine's path
    acfg["target_modules"] = sorted(acfg["target_modules"])  # a Python set: order varies per run
    (adir / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    saved = load_file(str(adir / "adapter_model.safetensors"))
    held = {k.replace(".default.", "."): v for k, v in pm.named_parameters() if "lora_" in k}
    assert sorted(saved) == sorted(held)
    assert all(torch.equal(saved[k], v) for k, v in held.items())
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=mask).logits.float()
        with pm.disable_adapter():
            logits_base = pm(input_ids=ids, attention_mask=mask).logits.float()
    # PEFT reads the folder back (as the Rust side will) and gives the same logits
    again = peft.PeftModel.from_pretrained(load_nf4_folder(), adir).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits.float(), logits)
    save_file(
        {
            "input_ids": ids,
            "attention_mask": mask,
            "logits": logits.contiguous(),
            "logits_base": logits_base.contiguous(),
        },
        str(out / "peft_nf4.safetensors"),
    )
    meta["peft_nf4"] = {
        "folder": "peft_nf4",
        "base": "tiny_llama_bnb_nf4 (pre-quantised, read as it is; Linear4bit support_avx512bf16_for_cpu=False)",
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS, "task_type": "CAUSAL_LM"},
        "training": "PEFT default init after torch.manual_seed(3); 4 steps of torch.optim.AdamW(lr=1e-2) on the "
        "mean next-token cross-entropy over attended targets of the batch",
        "train_losses": losses,
        "logits": "eval() under no_grad, base + adapter; logits_base: disable_adapter()",
        "adapter_moves_logits": float((logits - logits_base).abs().max()),
        "max_abs_logit": float(logits.abs().max()),
    }


def check_rust_adapters(root: Path) -> None:
    """PEFT loads every adapter reprpo saved under ``root`` on the pre-quantised nf4 folder."""
    from peft.utils import get_peft_model_state_dict

    fx = load_file(str(OUT / "peft_nf4" / "peft_nf4.safetensors"))
    ids, mask = fx["input_ids"], fx["attention_mask"]
    kinds = sorted(d for d in root.iterdir() if (d / "adapter_config.json").exists())
    assert kinds, f"no adapter folders under {root}"
    worst = 0.0
    for d in kinds:
        pm = peft.PeftModel.from_pretrained(load_nf4_folder(), d).eval()
        file = load_file(str(d / "adapter_model.safetensors"))
        held = get_peft_model_state_dict(pm, save_embedding_layers=False)
        assert sorted(held) == sorted(file), (d.name, sorted(set(held) ^ set(file)))
        for k, v in file.items():
            assert held[k].dtype == v.dtype and torch.equal(held[k], v), (d.name, k)
        with torch.no_grad():
            got = pm(input_ids=ids, attention_mask=mask).logits.float()
            with pm.disable_adapter():
                base = pm(input_ids=ids, attention_mask=mask).logits.float()
        want = load_file(str(d / "rust_logits.safetensors"))["logits"]
        err = float((got - want).abs().max())
        moved = float((got - base).abs().max())
        print(f"{d.name:24s} max abs logit diff PEFT vs reprpo {err:.2e} (adapter moves logits by {moved:.2e}; "
              f"{len(file)} tensors equal)")
        assert moved > 1e-3, f"{d.name}: the adapter does nothing, the check proves little"
        worst = max(worst, err)
    print(f"worst max abs logit diff {worst:.2e}")
    assert worst <= 1e-4, "PEFT disagrees with reprpo"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--check-rust-adapters",
        type=Path,
        metavar="DIR",
        help="check adapters reprpo saved (peft_prequantised.rs with REPRPO_EXPORT_DIR) with PEFT; writes nothing",
    )
    args = ap.parse_args()
    if args.check_rust_adapters is not None:
        check_rust_adapters(args.check_rust_adapters)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "generator": "tests/reference/gen_quant_fixtures.py",
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
        "paths": {
            op: dispatch_path(op)
            for op in [
                "quantize_4bit",
                "dequantize_4bit",
                "quantize_blockwise",
                "dequantize_blockwise",
                "int8_vectorwise_quant",
                "int8_vectorwise_dequant",
            ]
        },
        "dequant_reference": "bnb backends/default/ops.py _dequantize_4bit_compute (uncompiled); see docstring",
        "dynamic_map": F.create_dynamic_map().tolist(),
        "cases": {},
    }
    tensors: dict[str, torch.Tensor] = {}
    quant_fixtures(tensors, meta)
    mean_fixtures(tensors, meta)
    save_file(tensors, str(OUT / "quant.safetensors"))
    tiny_llama(meta)
    tiny_llama_int8(meta)
    peft_nf4(meta)
    (OUT / "quant.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
