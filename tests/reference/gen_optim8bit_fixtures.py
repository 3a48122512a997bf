"""Writes tests/fixtures/optim8bit/: five steps of bitsandbytes' 8-bit AdamW (`bnb.optim.AdamW8bit`) on CPU
tensors, for crates/reprpo-train/tests/all/optim8bit.rs.

    /work/venvs/bnb-optim/bin/python tests/reference/gen_optim8bit_fixtures.py

Environment: requirements-optim8bit.txt (bitsandbytes 0.50.2, torch 2.15.0). bitsandbytes 0.50 runs the 8-bit
optimizers on CPU tensors itself (its `cpu` kernels of `optimizer_update_8bit_blockwise` and
`optimizer_update_32bit`, and the native `quantize_blockwise` CPU routine); no GPU, nothing downloaded.
Deterministic: every number comes from a seeded generator.

The parameters (odd sizes, not multiples of the 256-element block):
  big    [61, 79]  4819 elements >= min_8bit_size 4096: both moments 8-bit, 19 blocks (the last one 211 long);
                   its first block gets zero gradients at every step (an all-zero block: absmax 0, codes 0),
                   and the other blocks gradients scaled by 10^U(-6, 1) each (the dynamic map's range).
  small  [1023]    below the threshold: f32 moments, bitsandbytes' 32-bit Adam formula.
Hyper-parameters: lr 1e-2, betas (0.9, 0.999), eps 1e-8, weight decay 0.1, 5 steps.

optim8bit.safetensors holds
  qmap1, qmap2                      create_dynamic_map(signed=True) and (signed=False), [256] f32
  p0.<name>                         the initial parameters (f32)
  g<t>.<name>                       the gradient of step t = 1..5
  p<t>.<name>                       the parameters after step t
  m<t>.<name>, v<t>.<name>          the state after step t: state1 / state2 (u8 codes for big, f32 for small)
  absmax_m<t>.big, absmax_v<t>.big  absmax1 / absmax2 after step t ([19] f32)
meta.json: the hyper-parameters, the versions, the names and shapes.
"""

import json
import os

import bitsandbytes as bnb
import bitsandbytes.functional as F
import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "fixtures", "optim8bit"))

EXPECTED_VERSIONS = {"bitsandbytes": "0.50.2", "torch": "2.15.0"}
LR, BETAS, EPS, WD, STEPS = 1e-2, (0.9, 0.999), 1e-8, 0.1, 5
SHAPES = {"big": (61, 79), "small": (1023,)}


def main():
    versions = {"bitsandbytes": bnb.__version__, "torch": torch.__version__.split("+")[0]}
    if versions != EXPECTED_VERSIONS:
        print(f"warning: versions {versions}, the fixtures were made with {EXPECTED_VERSIONS}")
    gen = torch.Generator().manual_seed(19)
    params = {k: torch.nn.Parameter(torch.randn(s, generator=gen)) for k, s in SHAPES.items()}
    out = {
        "qmap1": F.create_dynamic_map(signed=True),
        "qmap2": F.create_dynamic_map(signed=False),
    }
    for k, p in params.items():
        out[f"p0.{k}"] = p.detach().clone()
    opt = bnb.optim.AdamW8bit(list(params.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    big_scale = torch.pow(10.0, torch.empty(19).uniform_(-6.0, 1.0, generator=gen))
    big_scale[0] = 0.0
    big_scale = big_scale.repeat_interleave(256)[: params["big"].numel()].reshape(SHAPES["big"])
    for t in range(1, STEPS + 1):
        for k, p in params.items():
            g = torch.randn(SHAPES[k], generator=gen)
            if k == "big":
                g = g * big_scale
            p.grad = g
            out[f"g{t}.{k}"] = g.clone()
        opt.step()
        for k, p in params.items():
            st = opt.state[p]
            out[f"p{t}.{k}"] = p.detach().clone()
            out[f"m{t}.{k}"] = st["state1"].clone()
            out[f"v{t}.{k}"] = st["state2"].clone()
            if "absmax1" in st:
                out[f"absmax_m{t}.{k}"] = st["absmax1"].clone()
                out[f"absmax_v{t}.{k}"] = st["absmax2"].clone()
                assert torch.equal(st["qmap1"], out["qmap1"]) and torch.equal(st["qmap2"], out["qmap2"])
    assert out["m1.big"].dtype == torch.uint8 and out["m1.small"].dtype == torch.float32
    assert bool((out[f"m{STEPS}.big"].reshape(-1)[:256] == 0).all()) and float(out[f"absmax_m{STEPS}.big"][0]) == 0.0
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "optim8bit.safetensors"))
    meta = {
        "reference": "bitsandbytes.optim.AdamW8bit on CPU tensors",
        "versions": versions,
        "lr": LR,
        "betas": list(BETAS),
        "eps": EPS,
        "weight_decay": WD,
        "steps": STEPS,
        "block_size": 256,
        "min_8bit_size": 4096,
        "shapes": {k: list(s) for k, s in SHAPES.items()},
    }
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {OUT} ({size} bytes)")


if __name__ == "__main__":
    main()
