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


def tiny_llama(meta: dict) -> None:
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

    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 2], [3, 3, 40, 80, 100, 7, 0, 64]])
    for mod in q.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False  # dequantise + f32 linear (bnb's generic CPU path)
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


def main() -> None:
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
    (OUT / "quant.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
