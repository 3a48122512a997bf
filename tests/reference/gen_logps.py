"""Reference values for `reprpo_models::logps` (tests/all/logps.rs): torch's log_softmax + gather, the
way TRL computes per-token log-probabilities, and the gradient of a weighted sum of them.

Run with the pinned models venv (torch 2.15.0, tests/reference/requirements-models.txt at the
repository root):

    /work/venvs/models/bin/python tests/reference/gen_logps.py

Writes crates/reprpo-models/tests/fixtures/logps.safetensors. Per case `<c>` (`f32_v37`,
`f32_v130`, `bf16_v130`):
- `<c>.logits` [B, T, V] (f32 or bf16), `<c>.ids` [B, T] (int64), `<c>.mask` [B, T] (f32, left
  padding plus a prompt part that is not counted), `<c>.weight` [B, T-1] (f32);
- `<c>.per_token` [B, T-1] = mask[:, 1:] * log_softmax(logits[:, :-1].float())[ids[:, 1:]],
  `<c>.sum` [B], `<c>.count` [B];
- `<c>.grad` [B, T, V] (f32): d/dlogits of sum(per_token * weight), computed on logits.float().
"""

import pathlib

import torch
from safetensors.torch import save_file

torch.manual_seed(20261205)
out = {}


def case(name, b, t, v, dtype):
    logits = torch.randn(b, t, v) * 3.0
    logits[0, 2] += 50.0  # a large offset: logsumexp must subtract the maximum
    logits[1, 3, 5] = 30.0  # one dominant logit
    logits = logits.to(dtype)
    ids = torch.randint(0, v, (b, t))
    mask = torch.ones(b, t)
    for row in range(b):
        pad = row * 2  # left padding
        mask[row, : pad + 2] = 0.0  # padding and a 2-token prompt are not counted
    weight = torch.randn(b, t - 1)
    x = logits.float().detach().requires_grad_(True)
    logp = torch.log_softmax(x[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    per_token = logp * mask[:, 1:]
    (per_token * weight).sum().backward()
    out[f"{name}.logits"] = logits.contiguous()
    out[f"{name}.ids"] = ids
    out[f"{name}.mask"] = mask
    out[f"{name}.weight"] = weight
    out[f"{name}.per_token"] = per_token.detach()
    out[f"{name}.sum"] = per_token.detach().sum(-1)
    out[f"{name}.count"] = mask[:, 1:].sum(-1)
    out[f"{name}.grad"] = x.grad


case("f32_v37", 3, 9, 37, torch.float32)
case("f32_v130", 2, 7, 130, torch.float32)
case("bf16_v130", 2, 7, 130, torch.bfloat16)
path = pathlib.Path(__file__).resolve().parents[2] / "crates" / "reprpo-models" / "tests" / "fixtures" / "logps.safetensors"
save_file(out, str(path), metadata={"torch": torch.__version__})
print(path, sorted(out))
