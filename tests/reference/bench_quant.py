"""PyTorch side of the quantised-base memory / speed table (issue 19, docs/perf.md): the anchor's LoRA DPO /
ReprPO step (../shared/anchors/pytorch_anchor.py) on a base quantised by bitsandbytes on the CPU, with
torch AdamW or bitsandbytes' AdamW8bit. One configuration per process; prints one JSON line.

    /work/venvs/bnb/bin/python tests/reference/bench_quant.py --preset small --loss dpo --quantize nf4 \
        [--double-quant] [--optim adamw|adamw_8bit] [--bnb-mode train|default] [--json F]

What one step is (the anchor's `dpo_step` / `reprpo_step`, repeated below verbatim: they are closures inside
the anchor's `main()`, so only `PRESETS` and `seq_logps` can be imported from it, by path): reference forward
with the adapter off (no_grad), policy forward, DPO sigmoid (beta 0.1) on summed completion log-probs or the
anchor's ReprPO hidden-state loss (layers L/2 and 3L/4), backward, optimizer step (lr 1e-4), zero_grad.
Batch: 2 x pairs random ids of length seq, every token attended, the first half of each row carries no label.

Base:
* `--quantize none`: exactly the anchor: `LlamaForCausalLM(cfg)` built in this process in f32.
* `--quantize nf4|fp4|int8`: the same random model is built and saved (safetensors, f32) by a child process
  (so that its dense copy does not count towards this process's peak RSS), then this process loads it with
  `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=...,
  bnb_4bit_use_double_quant=..., bnb_4bit_compute_dtype=float32)` or `load_in_8bit=True`, device_map cpu).
  The seven projections become Linear4bit / Linear8bitLt; embeddings, norms and the (tied) head stay f32.
* `--tensorwise` (used for the 8B shape, whose f32 or bf16 checkpoint fits neither this machine's memory nor
  comfortably its disk): the model is built on the meta device, each projection replaced by a Linear4bit whose
  weight is drawn (N(0, 0.02^2), f32) and quantised one tensor at a time (`Params4bit._quantize`), the
  embeddings and head drawn in f32; the full-precision model never exists.

`prepare_model_for_kbit_training` is NOT called: with its defaults it turns on gradient checkpointing (the
anchor's rows here are without; `--grad-ckpt` turns it on the way that function does,
`gradient_checkpointing_enable(use_reentrant=False)`, which needs no input-grad hook) and input-grad hooks,
and its remaining effect (cast non-quantised parameters to f32) is a no-op for an f32 base. PEFT: LoRA r 16, alpha 16, dropout 0 on the seven projections.

`--bnb-mode` (how bitsandbytes computes on this CPU):
* `train` (default): `model.train()` after PEFT, as the anchor's directly-built model is (nn.Module's default).
  Linear4bit -> `MatMul4Bit`: gemm_4bit = dequantize_4bit (CPU kernel) + f32 linear; backward
  grad @ dequantize_4bit(W). Linear8bitLt (train) -> `MatMul8bitFp`: CB * SCB / 127 in f32, then f32 linear.
  This is the same computation as ours (dequantise per forward and per backward).
* `default`: the modules as `from_pretrained` leaves them: eval mode (PEFT only flips the top-level flag).
  On an AVX-512-BF16 CPU the first Linear4bit forward on an input without grad (the reference forward)
  repacks the weight (`_convert_weight_packed_for_cpu`) and every later forward, the policy's included, runs
  `gemv_4bit` (bf16 kernel) which has NO autograd: nothing flows back through the base projections, so the
  LoRA gradients are wrong (only o_proj / down_proj lora_B of a layer get one at B = 0). Linear8bitLt in eval
  mode runs `MatMul8bitLt` (LLM.int8: activations quantised to int8 too). Measured because it is what a user
  gets by default; recorded in the JSON ("path").

Peak RSS: VmHWM of this process (/proc/self/status), the child's build excluded. Optimizer state bytes: the
nbytes of every tensor in `opt.state` (shared tensors such as AdamW8bit's quantisation maps counted once).
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_anchor(path):
    spec = importlib.util.spec_from_file_location("pytorch_anchor", path)
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    return anchor


def vm(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    return None


def llama_config(cfgd):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=4096, attn_implementation="sdpa", **cfgd)


def build_and_save(a, cfgd, out_dir):
    """Child process: the anchor's random model (same seed), saved in f32."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(cfgd))
    model.save_pretrained(out_dir, safe_serialization=True)


def tensorwise_4bit(a, cfgd):
    """Meta-device Llama whose projections are Linear4bit, drawn and quantised one tensor at a time."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = llama_config(cfgd)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in TARGETS and isinstance(child, torch.nn.Linear):
                lin = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                        compute_dtype=torch.float32, compress_statistics=a.double_quant,
                                        quant_type=a.quantize, device="meta")
                w = torch.empty(child.out_features, child.in_features).normal_(0.0, 0.02, generator=g)
                p = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=a.double_quant,
                                      quant_type=a.quantize, module=lin)
                p._quantize("cpu")
                del w
                lin.weight = p
                setattr(mod, child_name, lin)
    for name, p in list(model.named_parameters()):
        if p.device.type != "meta":
            continue
        mod_name, pname = name.rsplit(".", 1)
        mod = model.get_submodule(mod_name)
        if "norm" in name:
            new = torch.ones(p.shape)
        else:  # embed_tokens, lm_head
            new = torch.empty(p.shape).normal_(0.0, 0.02, generator=g)
        setattr(mod, pname, torch.nn.Parameter(new, requires_grad=False))
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    for name, b in model.named_buffers():
        assert b.device.type != "meta", name
    return model


def opt_state_bytes(opt):
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


def which_path(model):
    import bitsandbytes as bnb

    out = {}
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            packed = getattr(m.weight.quant_state, "packing_format_for_cpu", False)
            k = ("Linear4bit: " + ("packed -> gemv_4bit (bf16, no autograd)" if packed
                                   else "MatMul4Bit (dequantize_4bit + f32 linear)")
                 + f", training={m.training}")
        elif isinstance(m, bnb.nn.Linear8bitLt):
            k = "Linear8bitLt: " + ("MatMul8bitFp (dequantise + f32 linear)" if m.training
                                    else "MatMul8bitLt (int8 activations)") + f", training={m.training}"
        else:
            continue
        out[k] = out.get(k, 0) + 1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--loss", choices=["dpo", "reprpo"], default="dpo")
    ap.add_argument("--quantize", choices=["none", "nf4", "fp4", "int8"], default="none")
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--optim", choices=["adamw", "adamw_8bit"], default="adamw")
    ap.add_argument("--bnb-mode", choices=["train", "default"], default="train")
    ap.add_argument("--tensorwise", action="store_true")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--anchor", default=os.path.join(ROOT, "..", "shared", "anchors", "pytorch_anchor.py"))
    ap.add_argument("--save-only", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    anchor = load_anchor(a.anchor)
    cfgd = anchor.PRESETS[a.preset]
    if a.save_only:
        build_and_save(a, cfgd, a.save_only)
        return

    import bitsandbytes as bnb
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    t_build = time.perf_counter()
    tmp = None
    if a.quantize == "none":
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(cfgd))  # the anchor's build, f32
    elif a.tensorwise:
        assert a.quantize in ("nf4", "fp4"), "--tensorwise: 4-bit only"
        model = tensorwise_4bit(a, cfgd)
    else:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        tmp = tempfile.TemporaryDirectory(prefix="bench_quant_", dir=base)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--preset", a.preset, "--anchor", a.anchor,
                        "--threads", str(a.threads), "--save-only", tmp.name], check=True)
        if a.quantize == "int8":
            q = BitsAndBytesConfig(load_in_8bit=True)
        else:
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=a.quantize,
                                   bnb_4bit_use_double_quant=a.double_quant,
                                   bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(tmp.name, quantization_config=q, dtype=torch.float32,
                                                 device_map="cpu")
    if a.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(model, lcfg)
    if a.bnb_mode == "train":
        model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if a.optim == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4)
    else:
        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    build_s = time.perf_counter() - t_build
    rss_after_build = vm("VmHWM")
    if tmp is not None:
        tmp.cleanup()

    # --- the anchor's batch and steps (pytorch_anchor.py main(), CPU: f32) ---
    seq_logps = anchor.seq_logps
    dtype = torch.float32
    B, T = a.pairs, a.seq
    V = cfgd["vocab_size"]
    L = cfgd["num_hidden_layers"]
    layers = [L // 2, (3 * L) // 4]
    ids = torch.randint(0, V, (2 * B, T))
    mask = torch.ones(2 * B, T, dtype=dtype)
    mask[:, : T // 2] = 0  # prompt half carries no label
    attn = torch.ones(2 * B, T, dtype=torch.long)

    def dpo_step():
        with torch.no_grad(), model.disable_adapter():
            ref = seq_logps(model(input_ids=ids, attention_mask=attn).logits, ids, mask)
        out = model(input_ids=ids, attention_mask=attn)
        pol = seq_logps(out.logits, ids, mask)
        logits = (pol[:B] - pol[B:]) - (ref[:B] - ref[B:])
        loss = -F.logsigmoid(0.1 * logits).mean()
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss

    def reprpo_step():
        with torch.no_grad(), model.disable_adapter():
            rhs = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
            ref_hs = torch.stack([rhs[l] for l in layers])
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        hs = torch.stack([out.hidden_states[l] for l in layers])  # [l, 2B, T, H]
        m = mask[None, :, :, None]
        retain = (torch.norm((hs[:, :B] - ref_hs[:, :B]).float() * m[:, :B], dim=-1)).mean()
        rr = (torch.norm((hs[:, B:] - ref_hs[:, :B]).float() * m[:, B:], dim=-1)).mean()
        loss = retain + rr
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss

    fn = dpo_step if a.loss == "dpo" else reprpo_step
    ts, loss = [], None
    total = a.warmup + a.steps
    for i in range(total):
        t0 = time.perf_counter()
        loss = fn()
        dt = time.perf_counter() - t0
        print(f"step {i + 1}/{total}{' (warm-up)' if i < a.warmup else ''}: {dt:.3f} s", file=sys.stderr,
              flush=True)
        if i >= a.warmup:
            ts.append(dt)
    out = {
        "bench": "quant-step", "preset": a.preset, "pairs": B, "seq": T, "loss_type": a.loss,
        "quantize": a.quantize, "double_quant": a.double_quant, "optim": a.optim, "bnb_mode": a.bnb_mode,
        "tensorwise": a.tensorwise, "grad_ckpt": a.grad_ckpt, "steps": a.steps, "warmup": a.warmup,
        "step_s_median": statistics.median(ts), "step_s_min": min(ts), "step_s_max": max(ts),
        "loss": float(loss.detach()), "peak_rss_mib": vm("VmHWM"), "peak_rss_after_build_mib": rss_after_build,
        "model_build_s": build_s, "optimizer_state_bytes": opt_state_bytes(opt),
        "trainable_params": sum(p.numel() for p in params), "threads": torch.get_num_threads(),
        "path": which_path(model), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "bitsandbytes": bnb.__version__,
    }
    print(json.dumps(out), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
