"""PyTorch + PEFT side of the forward + backward benchmark (docs/perf.md): a randomly initialised
Llama of the anchor's `tiny` / `small` shape (../shared/anchors/pytorch_anchor.py), LoRA r=16,
alpha=16 on all seven projections (B set non-zero), objective sum(logits * W), backward; the
median step time after 2 warm-ups, and the process's peak RSS. f32, eager attention, CPU.

    python bench_step.py --preset tiny --batch 4 --seq 64 --steps 10
"""

import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
}

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="tiny")
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--seq", type=int, default=64)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--attn", default="eager")
a = ap.parse_args()
torch.manual_seed(0)
cfg = LlamaConfig(max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True, attn_implementation=a.attn, **PRESETS[a.preset])
model = LlamaForCausalLM(cfg)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.02)
params = [p for p in model.parameters() if p.requires_grad]
V = cfg.vocab_size
ids = torch.randint(0, V, (a.batch, a.seq))
W = torch.randn(a.batch, a.seq, V)
times, fwd_times = [], []
for i in range(a.steps + 2):
    t0 = time.perf_counter()
    logits = model(input_ids=ids).logits
    s = (logits * W).sum()
    t_fwd = time.perf_counter() - t0
    s.backward()
    assert all(p.grad is not None for p in params)
    for p in params:
        p.grad = None
    if i >= 2:
        times.append(time.perf_counter() - t0)
        fwd_times.append(t_fwd)
times.sort()
fwd_times.sort()
med = times[len(times) // 2]
print(json.dumps({"preset": a.preset, "batch": a.batch, "seq": a.seq, "median_s": med, "forward_median_s": fwd_times[len(fwd_times) // 2], "tokens_per_s": a.batch * a.seq / med,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "torch": torch.__version__, "threads": torch.get_num_threads()}))
