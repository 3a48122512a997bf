r"""Writes tests/fixtures/models/: tiny random Llama / Phi-3 checkpoints, PEFT adapters on them, and the
reference tensors (logits, hidden states, adapter gradients) that transformers + PEFT compute for them, for
the Rust model tests (reprpo-models on candle). tests/fixtures/models/README.md lists every file and key.

    python3 -m venv /work/venvs/models
    /work/venvs/models/bin/pip install -r tests/reference/requirements-models.txt
    /work/venvs/models/bin/python tests/reference/gen_model_fixtures.py

Pins: torch 2.15.0, transformers 5.23.0, peft 0.21.2, safetensors 0.8.0, numpy 2.4.6 (they resolve together;
pip also pulls accelerate, huggingface_hub and torch's CUDA wheels, unused here). Nothing is downloaded at run
time (HF_HUB_OFFLINE=1): every weight is drawn from fixed seeds. The script wipes and rewrites the folder
(keeping README.md); two runs give byte-identical files (the last line prints a sha256 of the folder; checked
with different PYTHONHASHSEEDs). It ends with an INDEPENDENT plain-torch re-implementation of every model and
adapter, written from the formulas below, that must reproduce the saved logits, hidden states and gradients.

Conventions
-----------
* dtype / device: float tensors float32, integer tensors int64; CPU, torch.set_num_threads(1).
* attention: ``attn_implementation="eager"``. Its mask ADDS ``torch.finfo(float32).min`` (not -inf) to masked
  scores (causal AND key padding). A query whose keys are all masked (a pad position of a LEFT-padded row)
  gets scores that all round to exactly finfo.min, so softmax is UNIFORM over all T keys, future ones
  included; the tensors at left-pad positions are exactly that. Valid positions never attend to pads, so they
  do not depend on it: compare where ``attention_mask == 1`` unless you reproduce it. Right-pad positions are
  ordinary causal queries over the valid prefix.
* padding: B=4, T=20. Row 0 full; row 1 LEFT-padded by 5 (mask 0 at 0..4); row 2 RIGHT-padded by 7 (mask 0 at
  13..19); row 3 RIGHT-padded by 2 (mask 0 at 18..19). Pad positions hold token id 0 (no pad_token_id is
  configured, so embedding row 0 is an ordinary random row); valid tokens are uniform in [1, 96).
* position ids, plain forward: in transformers 5.23 ``LlamaModel.forward`` / ``Phi3Model.forward`` do, when
  ``position_ids is None``, ``position_ids = torch.arange(seq_len) + past_seen_tokens`` ([1, T]); the
  attention_mask is NOT used for positions, so ``model(input_ids, attention_mask)`` uses 0..T-1 in every
  row, padded or not. Saved as ``position_ids`` [4, 20] (passing it explicitly gives bit-identical output).
* position ids, cumsum: a second set uses ``(attention_mask.cumsum(-1) - 1).clamp(min=0)``
  (``position_ids_cumsum``). transformers' ``generate`` (5.23 generation/utils.py) uses ``cumsum - 1`` then
  ``masked_fill(attention_mask == 0, 0)``: the same at valid positions and left pads, different only at
  right pads. Because RoPE scores depend only on position DIFFERENCES, the two sets agree at valid positions
  to ~1.5e-6 for these models; they differ at pad positions, and for longrope when the batch's max position
  crosses original_max_position_embeddings (the ``allleft_*`` batch of phi3_longrope shows that).
* hidden states: ``output_hidden_states=True`` stacked [L+1, B, T, H]: index 0 = token embeddings; index i,
  1 <= i < L, = output of decoder layer i (residual stream, un-normed); index L = output of the last layer
  AFTER the final RMSNorm (transformers overwrites the last entry with last_hidden_state).
* weights: every parameter overwritten in sorted-name order from a torch.Generator: RMSNorm weights ~ 1 + 0.1
  N(0,1), every other weight ~ 0.1 N(0,1). Saved with ``save_pretrained(..., safe_serialization=True)`` (5.23
  always writes safetensors; the flag is accepted and ignored); generation_config.json is deleted. Expected
  tensors come from the model RELOADED from disk.
* config.json is what transformers 5.23 writes: RoPE settings in ``rope_parameters`` (``rope_theta``
  inside it; no top-level ``rope_theta`` / ``rope_scaling``). ``config_legacy.json`` is the same model in the
  transformers-4.x / Hub layout (top-level ``rope_theta`` and ``rope_scaling``), derived here; the script
  checks that transformers 5.23 loads it to bit-identical logits.

Models (vocab 96, hidden 64, intermediate 96, rms_norm_eps 1e-5, rope_theta 1e4, max_position_embeddings 64)
------
llama_gqa_rope3  LlamaForCausalLM, 3 layers, 8 heads (head_dim 8), 2 kv heads (GQA, groups of 4 q heads per
                 kv head: q head h uses kv head h // 4), untied lm_head, llama3 rope scaling {factor 8,
                 low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 16}. Base inverse
                 frequencies 1, .1, .01, .001 (wavelengths 6.3, 63, 628, 6283 vs. 16/4): the first is smoothly
                 interpolated (-> 0.5761), the other three divided by 8.
llama_tied       LlamaForCausalLM, 2 layers, 4 heads / 4 kv heads (head_dim 16), default RoPE,
                 tie_word_embeddings (model.safetensors has no lm_head.weight).
phi3_mini        Phi3ForCausalLM, 2 layers, 4 heads / 4 kv heads (head_dim 16), fused qkv_proj [192, 64] (rows
                 q 0..63 | k 64..127 | v 128..191) and gate_up_proj [192, 64] (rows gate 0..95 | up 96..191;
                 mlp = down(silu(gate) * up)), default RoPE, untied.
phi3_longrope    phi3_mini + rope_scaling {"type": "longrope", short_factor, long_factor (8 values each)},
                 original_max_position_embeddings 16. Rule (modeling_rope_utils.dynamic_rope_update):
                 seq_len = max(position_ids) + 1 over the WHOLE BATCH; long factors for every row if seq_len >
                 16, else short. inv_freq[i] = 1 / (factor[i] * theta^(2i/head_dim)). cos AND sin are multiplied
                 by attention_factor = sqrt(1 + ln(64/16) / ln 16) = sqrt(1.5) with short and long factors
                 alike. The main batch (max position 19) uses the long factors; ``short_*`` (T=12) the short
                 ones; ``allleft_*`` (T=20, rows left-padded 4 and 6) uses long with plain positions and short
                 with cumsum positions (max 15).

phi3_mini variants (phi3_mini/variants.safetensors): the phi3_mini weights with an edited config.json, loaded
by transformers from a temporary folder, on the base batch (plain positions):
  sliding_window_5     ``sliding_window = 5``: position q attends to keys k with q - 5 < k <= q
                       (masking_utils.sliding_window_overlay: kv_idx > q_idx - sliding_window).
  partial_rotary_half  ``rope_parameters.partial_rotary_factor = 0.5``: RoPE on the first 8 of the 16 features
                       of each head (inv_freq = 1 / theta^(2i/8), i < 4); features 8..15 pass unrotated.
Each saves ``<variant>_logits`` [4,20,96] and ``<variant>_hidden_states`` [3,4,20,64]; the script asserts they
differ from the plain phi3_mini ones at valid positions. Written after the adapters, with the global RNG
state restored, so no other file depends on them.

Adapters (peft 0.21.2, task_type CAUSAL_LM, all dropouts 0)
--------
``get_peft_model`` on the reloaded base, then EVERY trainable adapter parameter is overwritten in sorted-name
order from a generator seeded per adapter: lora_A, lora_B ~ 0.1 N; lora_magnitude_vector = its initial
value (row norms of W + s B A) * (1 + 0.1 N); boft_R ~ 0.1 N; boft_s ~ 1 + 0.1 N; OFT weight ~ 0.1 N; hra_u ~
N(0, 1). ``save_pretrained`` (adapter_config.json with target_modules sorted and base_model_name_or_path =
the base folder name, adapter_model.safetensors; peft's empty README model card deleted), reloaded with
``PeftModel.from_pretrained`` on a fresh base, eval mode. Inputs: rows 2 and 3 of the base batch (the
right-padded ones), plain forward. Objective s = sum(logits * grad_weight), grad_weight ~ N(0,1) fixed and
ZERO at pad positions; ``s.backward()``; the gradient of every adapter parameter is saved under the key it
has in adapter_model.safetensors. ``with model.disable_adapter():`` logits are asserted bit-identical to the
base model's logits (``logits_base``) for every adapter. Layer formulas (x: [.., in], W: [out, in]):

  LoRA        y = x W^T + s (x A^T) B^T, s = alpha / r (rsLoRA: alpha / sqrt(r)).
  DoRA        n = ||W + s B A||_2 per output row, DETACHED (no gradient, DoRA paper sec. 4.3);
              y = xW^T + (m/n - 1) xW^T + (m/n) s (x A^T) B^T.
  BOFT        R_k = cayley(boft_R[k, j]) = (I - S)(I + S)^-1, S = (R - R^T)/2 per block; B_k = block_diag_j(R_k);
              M = prod over k (k = N-1 leftmost) of P_k B_k P_k^T, P_k = perm2mat(block_butterfly_perm(in,
              block_num / 2^k, block_size / 2, N - 1)) (identity when N = 1); y = ((x M) W^T) * boft_s[:, 0].
  OFT         per block of oft_block_size input features: Q = skew from the strict upper triangle (row-major,
              torch.triu_indices order) of weight[j]; rotation with use_cayley_neumann=True (default):
              R = I + 2Q + 2Q^2 + 2Q^3 + Q^4 (5 terms; last coefficient 1), else R = (I - Q)(I + Q)^-1;
              y = (x_blocks @ R_j) W^T.
  HRA         u_i = column i of hra_u / its norm; H = prod_{i=0..r-1} (I - 2 u_i u_i^T) (left to right);
              apply_GS: Gram-Schmidt on the columns, H = I - 2 U U^T. y = x (W H)^T.

On llama_gqa_rope3:
  lora_r4              r=4, lora_alpha=8, target q,k,v,o,gate,up,down_proj (s = 2)
  rslora_r4            same + use_rslora=True (s = 4)
  lora_layers          r=4, alpha=8, target ["q_proj", "v_proj"], layers_to_transform=[0, 2]
  lora_regex           r=4, alpha=8, target_modules=r".*\.layers\.(0|2)\.self_attn\.(q_proj|v_proj)" (a str is a
                       full-match regex; peft 0.21.2 raises ValueError when layers_to_transform is combined with
                       a str target, so "layers [0, 2] + regex" is split into these two fixtures, which select
                       the same 4 modules)
  dora_r4              lora_r4 + use_dora=True
  boft                 BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target q,v,up_proj). peft's CPU
                       behaviour: BOFTLayer.update_layer calls get_fbd_cuda(), which JIT-builds the CUDA extension
                       fbd_cuda; on failure (no ninja / nvcc / GPU) it warns "Setting boft_n_butterfly_factor to
                       1" and silently uses factor 1: boft_R [1, 16, 4, 4], no permutation, while
                       adapter_config.json still says 2. This fixture is that behaviour (forced, so a machine that
                       could build the extension gives the same files).
  boft_nbf2_reference  OUR OWN reference for the intended factor 2: same config, built on peft's CUDA code path
                       with the fbd_cuda kernel replaced by an exact torch equivalent (out[z, n*b+i, n*b+j] =
                       in[z, n, i, j] as in fbd_cuda_kernel.cu; gradcheck'ed). boft_R [2, 16, 4, 4]. Not what
                       an unmodified peft produces on CPU.
  boft_factor1         BOFTConfig(boft_block_num=8, boft_block_size=0, boft_n_butterfly_factor=1, target
                       q,v,up_proj): blocks of 8
  oft                  OFTConfig(r=0, oft_block_size=8, target q,v_proj); peft 0.21.2 defaults otherwise:
                       use_cayley_neumann=True, num_cayley_neumann_terms=5, coft=False, eps=6e-5,
                       block_share=False, module_dropout=0.0, bias="none" (default oft_block_size is 32)
  oft_cayley           same + use_cayley_neumann=False (exact Cayley)
  hra                  HRAConfig(r=4, target q,v_proj), apply_GS=False
  hra_gs               same + apply_GS=True
On phi3_mini (fused layers; targets qkv_proj, o_proj, gate_up_proj, down_proj):
  lora_r4              r=4, alpha=8
  boft_factor1         boft_block_num=8, n_butterfly_factor=1 (blocks of 8; down_proj, in 96: blocks of 12)
"""

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched; keeps peft from probing the Hub

import torch
from safetensors.torch import load_file, save_file

import peft
import transformers
from peft import BOFTConfig, HRAConfig, LoraConfig, OFTConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "fixtures", "models"))

EXPECTED_VERSIONS = {"torch": "2.15.0", "transformers": "5.23.0", "peft": "0.21.2"}

VOCAB = 96
BATCH = 4
SEQ = 20
SHORT_SEQ = 12
# (left_pad, right_pad) per row
PADDING = [(0, 0), (5, 0), (0, 7), (0, 2)]
SHORT_PADDING = [(0, 0), (3, 0), (0, 4), (0, 1)]
# every row left-padded by >= 4: max cumsum position 15 -> seq_len 16 -> SHORT longrope factors, while the
# plain forward (positions 0..19) uses the LONG ones
ALLLEFT_PADDING = [(4, 0), (6, 0)]
ADAPTER_ROWS = [2, 3]  # the right-padded rows

# phi3_mini config edits -> phi3_mini/variants.safetensors (see the docstring)
PHI3_VARIANTS = {
    "sliding_window_5": lambda c: c.update(sliding_window=5),
    "partial_rotary_half": lambda c: c["rope_parameters"].update(partial_rotary_factor=0.5),
}

PHI3_SHORT_FACTOR = [1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 1.1]
PHI3_LONG_FACTOR = [1.5, 2.5, 1.2, 2.0, 1.0, 2.2, 1.8, 2.4]

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
    use_cache=False,
)

MODELS = {
    "llama_gqa_rope3": dict(
        cls=LlamaForCausalLM,
        cfg_cls=LlamaConfig,
        seed=1001,
        kwargs=dict(
            COMMON,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=10000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=False,
        ),
    ),
    "llama_tied": dict(
        cls=LlamaForCausalLM,
        cfg_cls=LlamaConfig,
        seed=1002,
        kwargs=dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_theta=10000.0,
            tie_word_embeddings=True,
        ),
    ),
    "phi3_mini": dict(
        cls=Phi3ForCausalLM,
        cfg_cls=Phi3Config,
        seed=1003,
        kwargs=dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_theta=10000.0,
            original_max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
    ),
    "phi3_longrope": dict(
        cls=Phi3ForCausalLM,
        cfg_cls=Phi3Config,
        seed=1004,
        kwargs=dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_theta=10000.0,
            original_max_position_embeddings=16,
            rope_scaling={"type": "longrope", "short_factor": PHI3_SHORT_FACTOR, "long_factor": PHI3_LONG_FACTOR},
            tie_word_embeddings=False,
        ),
    ),
}

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_ALL = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

# name -> (base model, config factory, seed, boft mode)
#   boft mode: None (not BOFT), "cpu" (force PEFT's no-extension fallback), "emulated" (torch fbd kernel)
ADAPTERS = [
    ("llama_gqa_rope3", "lora_r4", lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_ALL), 2001, None),
    (
        "llama_gqa_rope3",
        "rslora_r4",
        lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_ALL, use_rslora=True),
        2002,
        None,
    ),
    (
        "llama_gqa_rope3",
        "lora_layers",
        lambda: LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]
        ),
        2003,
        None,
    ),
    (
        "llama_gqa_rope3",
        "lora_regex",
        lambda: LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r".*\.layers\.(0|2)\.self_attn\.(q_proj|v_proj)"
        ),
        2004,
        None,
    ),
    (
        "llama_gqa_rope3",
        "dora_r4",
        lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_ALL, use_dora=True),
        2005,
        None,
    ),
    (
        "llama_gqa_rope3",
        "boft",
        lambda: BOFTConfig(
            boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]
        ),
        2006,
        "cpu",
    ),
    (
        "llama_gqa_rope3",
        "boft_nbf2_reference",
        lambda: BOFTConfig(
            boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]
        ),
        2006,
        "emulated",
    ),
    (
        "llama_gqa_rope3",
        "boft_factor1",
        lambda: BOFTConfig(
            boft_block_size=0,
            boft_block_num=8,
            boft_n_butterfly_factor=1,
            boft_dropout=0.0,
            target_modules=["q_proj", "v_proj", "up_proj"],
        ),
        2007,
        "cpu",
    ),
    ("llama_gqa_rope3", "oft", lambda: OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"]), 2008, None),
    (
        "llama_gqa_rope3",
        "oft_cayley",
        lambda: OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"], use_cayley_neumann=False),
        2009,
        None,
    ),
    ("llama_gqa_rope3", "hra", lambda: HRAConfig(r=4, target_modules=["q_proj", "v_proj"]), 2010, None),
    ("llama_gqa_rope3", "hra_gs", lambda: HRAConfig(r=4, target_modules=["q_proj", "v_proj"], apply_GS=True), 2011, None),
    ("phi3_mini", "lora_r4", lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PHI3_ALL), 2101, None),
    (
        "phi3_mini",
        "boft_factor1",
        lambda: BOFTConfig(
            boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=1, boft_dropout=0.0, target_modules=PHI3_ALL
        ),
        2102,
        "cpu",
    ),
]


# ----------------------------------------------------------------------------------------------------------
# BOFT extension control
# ----------------------------------------------------------------------------------------------------------
import peft.tuners.boft.layer as boft_layer  # noqa: E402


class _TorchFbd:
    """Exact torch stand-in for peft's fbd_cuda extension (fbd_cuda_kernel.cu):
    forward  out[z, n*b+i, n*b+j] = in[z, n, i, j] (zeros elsewhere); backward is its adjoint."""

    @staticmethod
    def forward(inp):
        z, n, b, _ = inp.shape
        out = torch.zeros(z, n * b, n * b, dtype=inp.dtype, device=inp.device)
        for k in range(n):
            out[:, k * b : (k + 1) * b, k * b : (k + 1) * b] = inp[:, k]
        return [out]

    @staticmethod
    def backward(grad_out, inp):
        z, n, b, _ = inp.shape
        g = torch.zeros_like(inp)
        for k in range(n):
            g[:, k] = grad_out[:, k * b : (k + 1) * b, k * b : (k + 1) * b]
        return [g]


_ORIG_GET_FBD = boft_layer.get_fbd_cuda


def set_boft_mode(mode):
    """'cpu': PEFT's fallback when the CUDA extension cannot be built (what happens on a CPU-only machine;
    forced so that a machine where it *could* build gives the same fixture). 'emulated': the CUDA code path with
    the torch kernel above."""
    if mode == "cpu":
        boft_layer.get_fbd_cuda = lambda: None
    elif mode == "emulated":
        fake = _TorchFbd()
        boft_layer.get_fbd_cuda = lambda: fake
    else:
        boft_layer.get_fbd_cuda = _ORIG_GET_FBD


def check_fbd_emulation():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(7))
    set_boft_mode("emulated")
    try:
        ok = torch.autograd.gradcheck(boft_layer.FastBlockDiag.apply, (x,))
        ref = torch.stack([torch.block_diag(*torch.unbind(x[z])) for z in range(2)])
        assert torch.equal(boft_layer.FastBlockDiag.apply(x), ref)
    finally:
        set_boft_mode(None)
    assert ok


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_inputs(seed, seq, padding):
    g = gen(seed)
    ids = torch.randint(1, VOCAB, (len(padding), seq), generator=g, dtype=torch.int64)
    mask = torch.ones(len(padding), seq, dtype=torch.int64)
    for r, (left, right) in enumerate(padding):
        if left:
            mask[r, :left] = 0
        if right:
            mask[r, seq - right :] = 0
    ids = ids * mask  # pad positions hold token 0
    plain = torch.arange(seq, dtype=torch.int64).unsqueeze(0).expand(len(padding), seq).contiguous()
    cumsum = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, plain, cumsum


def randomize_base(model, seed):
    g = gen(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def randomize_adapter(model, seed):
    g = gen(seed)
    names = []
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.1 * noise)
            elif "lora_magnitude_vector" in name:
                p.copy_(p * (1.0 + 0.1 * noise))
            elif ".boft_R." in name:
                p.copy_(0.1 * noise)
            elif ".boft_s." in name:
                p.copy_(1.0 + 0.1 * noise)
            elif ".oft_R." in name:
                p.copy_(0.1 * noise)
            elif ".hra_u." in name:
                p.copy_(noise)
            else:
                raise RuntimeError(f"unexpected trainable parameter {name}")
            names.append(name)
    assert names, "no adapter parameters"
    return names


def load_base(name):
    spec = MODELS[name]
    return spec["cls"].from_pretrained(
        os.path.join(OUT, name), attn_implementation="eager", dtype=torch.float32
    ).eval()


@torch.no_grad()
def forward(model, ids, mask, position_ids=None):
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True, use_cache=False
    )
    return out.logits.float().contiguous(), torch.stack(out.hidden_states).float().contiguous()


def rope_tables(model, seq, position_ids):
    """inv_freq actually used, and the cos/sin (attention scaling included) for row 0's positions."""
    rot = model.model.rotary_emb
    dummy = torch.zeros(1, seq, 1)
    cos, sin = rot(dummy, position_ids[:1])
    return rot.inv_freq.clone().float(), cos[0].float().contiguous(), sin[0].float().contiguous()


def legacy_config(cfg_dict, model_type):
    """transformers-4.x / Hub layout of the same config."""
    d = dict(cfg_dict)
    rp = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rp.pop("rope_theta")
    rp.pop("partial_rotary_factor", None)
    rp.pop("type", None)
    if rp.get("rope_type", "default") == "default":
        d["rope_scaling"] = None
    elif model_type == "phi3":
        # Phi-3 Hub configs: {"type": "longrope", short_factor, long_factor}; original_max at top level
        rp.pop("original_max_position_embeddings", None)
        d["rope_scaling"] = {"type": rp.pop("rope_type"), **rp}
    else:
        d["rope_scaling"] = rp
    d.pop("dtype", None)
    d["torch_dtype"] = "float32"
    d.pop("transformers_version", None)
    return d


def check_legacy_config(name, legacy, ref_logits, ids, mask):
    spec = MODELS[name]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(legacy, f)
        shutil.copy(os.path.join(OUT, name, "model.safetensors"), tmp)
        m = spec["cls"].from_pretrained(tmp, attn_implementation="eager", dtype=torch.float32).eval()
        logits, _ = forward(m, ids, mask)
    assert torch.equal(logits, ref_logits), f"{name}: config_legacy.json does not reproduce the logits"


def save(tensors, path):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


# ----------------------------------------------------------------------------------------------------------
# base models
# ----------------------------------------------------------------------------------------------------------
def build_model(name):
    spec = MODELS[name]
    d = os.path.join(OUT, name)
    cfg = spec["cfg_cls"](**spec["kwargs"], attn_implementation="eager")
    model = spec["cls"](cfg).eval()
    randomize_base(model, spec["seed"])
    model.save_pretrained(d, safe_serialization=True)
    os.remove(os.path.join(d, "generation_config.json"))  # not needed; keep the fixture to config + weights
    with open(os.path.join(d, "config.json")) as f:
        cfg_dict = json.load(f)
    legacy = legacy_config(cfg_dict, cfg_dict["model_type"])
    with open(os.path.join(d, "config_legacy.json"), "w") as f:
        json.dump(legacy, f, indent=2, sort_keys=True)
        f.write("\n")

    mem_logits, _ = forward(model, *make_inputs(3000, SEQ, PADDING)[:2])
    model = load_base(name)
    ids, mask, plain, cumsum = make_inputs(3000, SEQ, PADDING)
    logits, hidden = forward(model, ids, mask)
    assert torch.equal(logits, mem_logits), "reloaded model differs from the in-memory one"
    # plain forward == explicit arange positions
    logits_p, hidden_p = forward(model, ids, mask, plain)
    assert torch.equal(logits, logits_p) and torch.equal(hidden, hidden_p)
    logits_c, hidden_c = forward(model, ids, mask, cumsum)
    L = model.config.num_hidden_layers
    assert hidden.shape == (L + 1, BATCH, SEQ, 64)
    # documented indexing: hidden[i] = output of layer i for i < L, hidden[L] = norm(output of layer L)
    captured = []
    hooks = [lay.register_forward_hook(lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for lay in model.model.layers]
    with torch.no_grad():
        emb = model.model.embed_tokens(ids)
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in hooks:
        h.remove()
    assert torch.equal(hidden[0], emb)
    for i in range(1, L):
        assert torch.equal(hidden[i], captured[i - 1])
    with torch.no_grad():
        assert torch.equal(hidden[L], model.model.norm(captured[L - 1]))
    inv_freq, cos, sin = rope_tables(model, SEQ, plain)

    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": plain, "position_ids_cumsum": cumsum}
    expected = {
        "logits": logits,
        "hidden_states": hidden,
        "logits_cumsum_pos": logits_c,
        "rope_inv_freq": inv_freq,
        "rope_cos": cos,
        "rope_sin": sin,
    }
    # RoPE scores depend only on position differences, so at VALID positions the two position conventions agree
    # up to float rounding (they differ at pad positions, and for longrope when the batch max position changes)
    valid = mask.bool()
    diff = (logits[valid] - logits_c[valid]).abs().max().item()
    assert diff < 1e-4, diff
    if name == "phi3_longrope":
        a_ids, a_mask, a_plain, a_cumsum = make_inputs(3002, SEQ, ALLLEFT_PADDING)
        a_logits, _ = forward(model, a_ids, a_mask)
        a_inv_plain = model.model.rotary_emb.inv_freq.clone()
        a_logits_c, _ = forward(model, a_ids, a_mask, a_cumsum)
        a_inv_cumsum = model.model.rotary_emb.inv_freq.clone()
        assert not torch.equal(a_inv_plain, a_inv_cumsum)
        av = a_mask.bool()
        assert (a_logits[av] - a_logits_c[av]).abs().max() > 1e-3, "long vs short factors should differ"
        inputs.update(
            {
                "allleft_input_ids": a_ids,
                "allleft_attention_mask": a_mask,
                "allleft_position_ids": a_plain,
                "allleft_position_ids_cumsum": a_cumsum,
            }
        )
        expected.update({"allleft_logits": a_logits, "allleft_logits_cumsum_pos": a_logits_c})
        s_ids, s_mask, s_plain, _ = make_inputs(3001, SHORT_SEQ, SHORT_PADDING)
        s_logits, s_hidden = forward(model, s_ids, s_mask)
        s_inv, s_cos, s_sin = rope_tables(model, SHORT_SEQ, s_plain)
        inputs.update({"short_input_ids": s_ids, "short_attention_mask": s_mask, "short_position_ids": s_plain})
        expected.update(
            {
                "short_logits": s_logits,
                "short_hidden_states": s_hidden,
                "short_rope_inv_freq": s_inv,
                "short_rope_cos": s_cos,
                "short_rope_sin": s_sin,
            }
        )
        # sanity: the two regimes really differ and follow the documented formula
        hd = 16
        base = 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
        assert torch.allclose(inv_freq, 1.0 / (torch.tensor(PHI3_LONG_FACTOR) * base))
        assert torch.allclose(s_inv, 1.0 / (torch.tensor(PHI3_SHORT_FACTOR) * base))
        assert abs(model.model.rotary_emb.attention_scaling - math.sqrt(1 + math.log(4) / math.log(16))) < 1e-12
    save(inputs, os.path.join(d, "inputs.safetensors"))
    save(expected, os.path.join(d, "expected.safetensors"))
    check_legacy_config(name, legacy, logits, ids, mask)
    print(f"  {name}: L={L} logits {tuple(logits.shape)} hidden {tuple(hidden.shape)}; "
          f"max |logits - logits_cumsum_pos| at valid positions {diff:.2e}")


def build_phi3_variants():
    """phi3_mini's weights under each config edit of PHI3_VARIANTS -> phi3_mini/variants.safetensors."""
    name = "phi3_mini"
    d = os.path.join(OUT, name)
    with open(os.path.join(d, "config.json")) as f:
        base_cfg = json.load(f)
    ids, mask, plain, _ = make_inputs(3000, SEQ, PADDING)
    base_logits, base_hidden = forward(load_base(name), ids, mask)
    saved = load_file(os.path.join(d, "expected.safetensors"))
    assert torch.equal(base_logits, saved["logits"]) and torch.equal(base_hidden, saved["hidden_states"])
    valid = mask.bool()
    rng = torch.get_rng_state()  # from_pretrained may draw initial weights: leave the global RNG as it was
    tensors = {}
    for variant, edit in PHI3_VARIANTS.items():
        cfg = json.loads(json.dumps(base_cfg))
        edit(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f)
            shutil.copy(os.path.join(d, "model.safetensors"), tmp)
            m = Phi3ForCausalLM.from_pretrained(tmp, attn_implementation="eager", dtype=torch.float32).eval()
        if variant == "sliding_window_5":
            assert m.config.sliding_window == 5
        else:
            assert m.config.rope_parameters["partial_rotary_factor"] == 0.5
            assert m.model.rotary_emb.inv_freq.shape == (4,)
        logits, hidden = forward(m, ids, mask)
        logits_p, hidden_p = forward(m, ids, mask, plain)
        assert torch.equal(logits, logits_p) and torch.equal(hidden, hidden_p)
        apart = (logits[valid] - base_logits[valid]).abs().max().item()
        assert apart > 0.1, f"{variant}: the edit does not change the logits ({apart})"
        tensors[f"{variant}_logits"] = logits
        tensors[f"{variant}_hidden_states"] = hidden
        print(f"  {name}/variants {variant}: max |logits - phi3_mini logits| at valid positions {apart:.2f}")
    torch.set_rng_state(rng)
    save(tensors, os.path.join(d, "variants.safetensors"))


# ----------------------------------------------------------------------------------------------------------
# adapters
# ----------------------------------------------------------------------------------------------------------
def adapter_inputs(base_name):
    ids, mask, plain, _ = make_inputs(3000, SEQ, PADDING)
    rows = torch.tensor(ADAPTER_ROWS, dtype=torch.int64)
    ids, mask, plain = ids[rows].contiguous(), mask[rows].contiguous(), plain[rows].contiguous()
    g = gen(4000 + list(MODELS).index(base_name))
    w = torch.randn(len(ADAPTER_ROWS), SEQ, VOCAB, generator=g, dtype=torch.float32) * mask[..., None].float()
    base = load_base(base_name)
    base_logits, _ = forward(base, ids, mask)
    full = load_file(os.path.join(OUT, base_name, "expected.safetensors"))["logits"][rows]
    m = mask.bool()
    assert torch.allclose(base_logits[m], full[m], atol=1e-5, rtol=0)
    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": plain,
        "source_rows": rows,
        "grad_weight": w,
        "logits_base": base_logits,
    }
    d = os.path.join(OUT, base_name, "adapters")
    os.makedirs(d, exist_ok=True)
    save(tensors, os.path.join(d, "inputs.safetensors"))
    return ids, mask, w, base_logits


def build_adapter(base_name, name, make_cfg, seed, boft_mode, ids, mask, w, base_logits):
    d = os.path.join(OUT, base_name, "adapters", name)
    set_boft_mode(boft_mode)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = make_cfg()
            cfg.task_type = "CAUSAL_LM"  # PeftModelForCausalLM, as for a real causal-LM adapter
            model = get_peft_model(load_base(base_name), cfg)
        model.peft_config["default"].base_model_name_or_path = base_name
        randomize_adapter(model, seed)
        model.eval()
        mem_logits, _ = forward(model, ids, mask)
        model.save_pretrained(d, safe_serialization=True, save_embedding_layers=False)
        os.remove(os.path.join(d, "README.md"))  # peft's empty model card
        # peft stores target_modules as a set, so its JSON list order follows PYTHONHASHSEED: sort it
        cfg_path = os.path.join(d, "adapter_config.json")
        with open(cfg_path) as f:
            cfg_json = json.load(f)
        if isinstance(cfg_json.get("target_modules"), list):
            cfg_json["target_modules"] = sorted(cfg_json["target_modules"])
        with open(cfg_path, "w") as f:
            f.write(json.dumps(cfg_json, indent=2, sort_keys=True))  # peft's own format

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(load_base(base_name), d, is_trainable=True).eval()
        logits, hidden = forward(model, ids, mask)
        assert torch.equal(logits, mem_logits), f"{name}: reloaded adapter differs"
        assert not torch.allclose(logits, base_logits, atol=1e-3), f"{name}: adapter has no effect"
        with model.disable_adapter():
            logits_disabled, _ = forward(model, ids, mask)
        assert torch.equal(logits_disabled, base_logits), f"{name}: disabled adapter != base"

        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        s = (out.logits * w).sum()
        s.backward()
        assert torch.equal(out.logits.detach(), logits)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        grads = get_peft_model_state_dict(model, state_dict=grads, save_embedding_layers=False)
        saved = load_file(os.path.join(d, "adapter_model.safetensors"))
        assert set(grads) == set(saved), f"{name}: gradient keys {sorted(grads)} != {sorted(saved)}"
        for k in saved:
            assert grads[k].shape == saved[k].shape, k
        nonzero = sum(int(g.abs().max() > 0) for g in grads.values())
        assert nonzero == len(grads), f"{name}: some gradients are zero"
        if boft_mode == "emulated":
            # the emulated butterfly really has two factors and is orthogonal
            lay = model.base_model.model.model.layers[0].self_attn.q_proj
            assert lay.boft_R["default"].shape[0] == 2 and lay.fbd_cuda_available
            rot, _ = lay.get_delta_weight("default")
            assert torch.allclose(rot @ rot.T, torch.eye(rot.shape[0]), atol=1e-5)
        if boft_mode == "cpu":
            lay = model.base_model.model.model.layers[0].self_attn
            lay = lay.q_proj if hasattr(lay, "q_proj") else lay.qkv_proj
            assert lay.boft_R["default"].shape[0] == 1 and not lay.fbd_cuda_available
    finally:
        set_boft_mode(None)

    L = model.base_model.model.config.num_hidden_layers
    expected = {
        "logits": logits,
        "hidden_states_1": hidden[1].contiguous(),
        f"hidden_states_{L}": hidden[L].contiguous(),
        "objective": s.detach().reshape(1).float(),
    }
    save(expected, os.path.join(d, "expected.safetensors"))
    save({k: v.contiguous() for k, v in grads.items()}, os.path.join(d, "gradients.safetensors"))
    shapes = sorted({tuple(v.shape) for v in saved.values()})
    print(f"  {base_name}/adapters/{name}: {len(saved)} tensors, shapes {shapes}, s={s.item():.4f}")



# ----------------------------------------------------------------------------------------------------------
# independent check: plain torch, written from the docstring's formulas, reading only the saved files
# ----------------------------------------------------------------------------------------------------------
def rms(x, w, eps): return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

def rotary_dim_of(cfg):
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return int(hd * cfg["rope_parameters"].get("partial_rotary_factor", 1.0))

def inv_freq_of(cfg, seq_len):
    rp = cfg["rope_parameters"]; hd = rotary_dim_of(cfg)
    base = rp["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    inv = 1.0 / base; scale = 1.0
    if rp["rope_type"] == "llama3":
        f, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
        wl = 2 * math.pi / inv
        out = torch.where(wl > old / lo, inv / f, inv)
        sm = (old / wl - lo) / (hi - lo)
        med = (wl >= old / hi) & (wl <= old / lo)
        inv = torch.where(med, (1 - sm) * out / f + sm * out, out)
    elif rp["rope_type"] == "longrope":
        om = rp["original_max_position_embeddings"]
        fac = rp["long_factor"] if seq_len > om else rp["short_factor"]
        inv = 1.0 / (torch.tensor(fac) * base)
        scale = math.sqrt(1 + math.log(cfg["max_position_embeddings"] / om) / math.log(om))
    return inv, scale

def rot(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin

def ref_forward(name, ids, mask, pos, lin=None, edit=None):
    cfg = json.load(open(os.path.join(OUT, name, "config.json"))); W = load_file(os.path.join(OUT, name, "model.safetensors"))
    if edit: edit(cfg)
    rd = rotary_dim_of(cfg)
    lin = lin or (lambda n, x: x @ W[n].T)
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]; hd = H // nh
    B, T = ids.shape
    inv, sc = inv_freq_of(cfg, int(pos.max()) + 1)
    ang = pos[..., None].float() * inv; ang = torch.cat([ang, ang], -1)
    cos, sin = (ang.cos() * sc)[:, None], (ang.sin() * sc)[:, None]
    x = W["model.embed_tokens.weight"][ids]; hs = [x]
    allowed = (torch.arange(T)[None, :] <= torch.arange(T)[:, None])[None] & mask.bool()[:, None, :]
    if cfg.get("sliding_window"):
        allowed = allowed & (torch.arange(T)[None, :] > torch.arange(T)[:, None] - cfg["sliding_window"])[None]
    bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms(x, W[p + "input_layernorm.weight"], cfg["rms_norm_eps"])
        if cfg["model_type"] == "phi3":
            qkv = lin(p + "self_attn.qkv_proj.weight", h); q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
        else:
            q, k, v = (lin(p + f"self_attn.{n}_proj.weight", h) for n in "qkv")
        q = q.view(B, T, nh, hd).transpose(1, 2); k = k.view(B, T, nkv, hd).transpose(1, 2); v = v.view(B, T, nkv, hd).transpose(1, 2)
        q = torch.cat([rot(q[..., :rd], cos, sin), q[..., rd:]], -1)
        k = torch.cat([rot(k[..., :rd], cos, sin), k[..., rd:]], -1)
        k = k.repeat_interleave(nh // nkv, 1); v = v.repeat_interleave(nh // nkv, 1)
        a = ((q @ k.transpose(-1, -2)) * hd ** -0.5 + bias).softmax(-1) @ v
        x = x + lin(p + "self_attn.o_proj.weight", a.transpose(1, 2).reshape(B, T, H))
        h = rms(x, W[p + "post_attention_layernorm.weight"], cfg["rms_norm_eps"])
        if cfg["model_type"] == "phi3":
            g, u = lin(p + "mlp.gate_up_proj.weight", h).chunk(2, -1)
        else:
            g, u = lin(p + "mlp.gate_proj.weight", h), lin(p + "mlp.up_proj.weight", h)
        x = x + lin(p + "mlp.down_proj.weight", torch.nn.functional.silu(g) * u)
        hs.append(x)
    hs[-1] = rms(x, W["model.norm.weight"], cfg["rms_norm_eps"])
    lm = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return hs[-1] @ lm.T, torch.stack(hs)

# adapters: forward + gradient via autograd through our own formulas
def adapter_lin(name, kind, A, cfg):
    W = load_file(os.path.join(OUT, name, "model.safetensors"))
    def key(n): return "base_model.model." + n[:-len(".weight")]
    def lin(n, x):
        k = key(n); w = W[n]
        if kind in ("lora", "rslora", "dora") and k + ".lora_A.weight" in A:
            a, b = A[k + ".lora_A.weight"], A[k + ".lora_B.weight"]
            s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
            if kind == "dora":
                m = A[k + ".lora_magnitude_vector"]
                nrm = (w + s * b @ a).norm(dim=1).detach()
                base = x @ w.T
                return base + (m / nrm - 1) * base + (m / nrm) * s * (x @ a.T @ b.T)
            return x @ w.T + s * (x @ a.T @ b.T)
        if kind == "boft" and k + ".boft_R" in A:
            Rm, sv = A[k + ".boft_R"], A[k + ".boft_s"]
            N, D, b, _ = Rm.shape
            S = 0.5 * (Rm - Rm.transpose(-1, -2)); I = torch.eye(b)
            Q = torch.linalg.solve(I + S, I - S, left=False)  # (I - S)(I + S)^-1
            n = w.shape[1]; tot = torch.eye(n)
            for i in range(N):
                perm = butterfly_perm(n, D // 2 ** i, b // 2, N - 1)
                P = torch.zeros(n, n); P[torch.arange(n), perm] = 1
                tot = (P @ torch.block_diag(*Q[i]) @ P.T) @ tot
            return (x @ tot) @ w.T * sv[:, 0]
        if kind == "oft" and k + ".oft_R.weight" in A:
            U = A[k + ".oft_R.weight"]; r = U.shape[0]; b = int((1 + math.isqrt(1 + 8 * U.shape[1])) // 2)
            Q = torch.zeros(r, b, b); iu = torch.triu_indices(b, b, 1); Q[:, iu[0], iu[1]] = U; Q = Q - Q.transpose(-1, -2)
            I = torch.eye(b)
            if cfg["use_cayley_neumann"]:
                Rr = I + 2 * Q + 2 * Q @ Q + 2 * Q @ Q @ Q + Q @ Q @ Q @ Q
            else:
                Rr = torch.linalg.solve(I + Q, I - Q, left=False)
            xr = torch.einsum("...rk,rkc->...rc", x.reshape(*x.shape[:-1], r, b), Rr).reshape(x.shape)
            return xr @ w.T
        if kind == "hra" and k + ".hra_u" in A:
            U = A[k + ".hra_u"]; n = U.shape[0]
            if cfg["apply_GS"]:
                cols = []
                for i in range(U.shape[1]):
                    u = U[:, i:i + 1]
                    for c in cols: u = u - (c.T @ u) * c
                    cols.append(u / u.norm())
                V = torch.cat(cols, 1); H = torch.eye(n) - 2 * V @ V.T
            else:
                Un = U / U.norm(dim=0); H = torch.eye(n)
                for i in range(U.shape[1]):
                    u = Un[:, i:i + 1]; H = H - 2 * H @ u @ u.T
            return x @ (w @ H).T
        return x @ w.T
    return lin

def butterfly_perm(n, b, r, nbf):
    if nbf == 0: return torch.arange(n)
    bs = n // b; idx = torch.arange(n); step = bs / r
    order = torch.empty(bs, dtype=torch.long)
    seq = torch.cat([torch.arange(0, step, 2), torch.arange(1, step, 2)])
    for i, p in enumerate(seq): order[int(i * r):int(i * r + r)] = torch.arange(bs)[int(p * r):int(p * r + r)]
    for i in range(0, n, bs): idx[i:i + bs] = idx[i:i + bs][order]
    return idx


def independent_check():
    def md(a, b):
        return (a - b).abs().max().item()

    worst = 0.0
    for name in MODELS:
        d = os.path.join(OUT, name)
        inp = load_file(os.path.join(d, "inputs.safetensors"))
        exp = load_file(os.path.join(d, "expected.safetensors"))
        lg, hs = ref_forward(name, inp["input_ids"], inp["attention_mask"], inp["position_ids"])
        lc, _ = ref_forward(name, inp["input_ids"], inp["attention_mask"], inp["position_ids_cumsum"])
        errs = [md(lg, exp["logits"]), md(hs, exp["hidden_states"]), md(lc, exp["logits_cumsum_pos"])]
        if name == "phi3_longrope":
            for pre, pos in [("short_", "short_position_ids"), ("allleft_", "allleft_position_ids")]:
                l2, h2 = ref_forward(name, inp[pre + "input_ids"], inp[pre + "attention_mask"], inp[pos])
                errs.append(md(l2, exp[pre + "logits"]))
            l3, _ = ref_forward(name, inp["allleft_input_ids"], inp["allleft_attention_mask"],
                                inp["allleft_position_ids_cumsum"])
            errs.append(md(l3, exp["allleft_logits_cumsum_pos"]))
            l2, h2 = ref_forward(name, inp["short_input_ids"], inp["short_attention_mask"], inp["short_position_ids"])
            errs.append(md(h2, exp["short_hidden_states"]))
        if name == "phi3_mini":
            var = load_file(os.path.join(d, "variants.safetensors"))
            for variant, edit in PHI3_VARIANTS.items():
                lv, hv = ref_forward(name, inp["input_ids"], inp["attention_mask"], inp["position_ids"], edit=edit)
                errs += [md(lv, var[f"{variant}_logits"]), md(hv, var[f"{variant}_hidden_states"])]
        assert max(errs) < 1e-4, (name, errs)
        worst = max(worst, max(errs))
    gworst = 0.0
    for base in {b for b, *_ in ADAPTERS}:
        inp = load_file(os.path.join(OUT, base, "adapters", "inputs.safetensors"))
        for b2, name, *_ in ADAPTERS:
            if b2 != base:
                continue
            d = os.path.join(OUT, base, "adapters", name)
            with open(os.path.join(d, "adapter_config.json")) as f:
                cfg = json.load(f)
            kind = {"LORA": "dora" if cfg.get("use_dora") else "lora", "BOFT": "boft", "OFT": "oft", "HRA": "hra"}[
                cfg["peft_type"]
            ]
            A = {k: v.requires_grad_() for k, v in load_file(os.path.join(d, "adapter_model.safetensors")).items()}
            exp = load_file(os.path.join(d, "expected.safetensors"))
            grads = load_file(os.path.join(d, "gradients.safetensors"))
            lg, hs = ref_forward(base, inp["input_ids"], inp["attention_mask"], inp["position_ids"],
                                 adapter_lin(base, kind, A, cfg))
            s = (lg * inp["grad_weight"]).sum()
            s.backward()
            L = hs.shape[0] - 1
            errs = [md(lg, exp["logits"]), md(hs[1], exp["hidden_states_1"]), md(hs[L], exp[f"hidden_states_{L}"]),
                    abs(s.item() - exp["objective"].item()) / max(1.0, abs(s.item()))]
            gerr = max(md(A[k].grad, grads[k]) / (grads[k].abs().max().item() + 1e-12) for k in A)
            assert max(errs) < 1e-4 and gerr < 1e-4, (base, name, errs, gerr)
            worst, gworst = max(worst, max(errs)), max(gworst, gerr)
    print(f"independent plain-torch check: max abs diff {worst:.2e}, max relative gradient diff {gworst:.2e}")

# ----------------------------------------------------------------------------------------------------------
def folder_digest(root):
    h = hashlib.sha256()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            rel = os.path.relpath(p, root)
            if rel == "README.md":
                continue
            with open(p, "rb") as f:
                data = f.read()
            total += len(data)
            h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest(), total


def main():
    versions = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__, "peft": peft.__version__}
    if versions != EXPECTED_VERSIONS:
        print(f"WARNING: versions {versions} differ from the pinned {EXPECTED_VERSIONS}", file=sys.stderr)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    check_fbd_emulation()

    readme = os.path.join(OUT, "README.md")
    keep = open(readme).read() if os.path.exists(readme) else None
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    if keep is not None:
        with open(readme, "w") as f:
            f.write(keep)

    print("base models")
    for name in MODELS:
        build_model(name)
    print("adapters")
    shared = {}
    for base_name, name, make_cfg, seed, boft_mode in ADAPTERS:
        if base_name not in shared:
            shared[base_name] = adapter_inputs(base_name)
        build_adapter(base_name, name, make_cfg, seed, boft_mode, *shared[base_name])
    print("phi3_mini variants")
    build_phi3_variants()

    independent_check()
    print("files")
    for dirpath, dirnames, filenames in os.walk(OUT):
        dirnames.sort()
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            print(f"  {os.path.getsize(p):>8}  {os.path.relpath(p, OUT)}")
    digest, total = folder_digest(OUT)
    print(f"total {total} bytes ({total / 2**20:.2f} MiB) excluding README.md; sha256 {digest}")


if __name__ == "__main__":
    main()
