"""Writes tests/fixtures/losses/reprpo.{safetensors,json}: inputs, losses, diagnostics and gradients of
the ReprPO family of losses, for crates/reprpo-losses/tests/all/reprpo_reference.rs.

An independent plain-PyTorch implementation of the formulas of issue 4 ("ReprPO family", points 1-3)
with the choices documented in crates/reprpo-losses/src/reprpo.rs where the issue leaves them open
(default parameters, the circuit-breakers loss without a second alpha, weighted means, cka, the
masks of ldr and of token pooling). It is written from those formulas, not from the Rust code: e.g.
CKA here uses the feature form ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with explicit loops,
top-k uses torch.topk, norms use torch.linalg.vector_norm (gradient 0 at 0).

Inputs are float32 values; everything is computed in float64 from them, so the fixture holds the
exact values that a float32 implementation should approach (losses, per-example losses and metrics
stored in float64, gradients rounded to float32). Environment: requirements-reprpo.txt.

    /work/venvs/models/bin/python tests/reference/gen_reprpo_fixtures.py
"""

import json
import math
import os

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "losses")

L, B, T, H = 3, 4, 12, 16

DEFAULTS = dict(
    variant="original",
    alpha=10.0,
    schedule="reprpo",
    example_weights=False,
    weight_scale=30.0,
    token_reduction="per-position",
    direction_weight=0.5,
    topk_fraction=0.005,
    adaptive_threshold=0.9,
    ldr_eps=1e-6,
)


# ----------------------------------------------------------------------------------------------
# inputs


def make_inputs(gen, kind):
    ref_c = torch.randn(L, B, T, H, generator=gen)
    ref_r = 0.6 * ref_c + 0.8 * torch.randn(L, B, T, H, generator=gen)
    scale = 0.1 + 0.6 * torch.rand(L, B, T, 1, generator=gen)
    pi_c = ref_c + scale * torch.randn(L, B, T, H, generator=gen)
    pi_r = ref_r + 0.3 * torch.randn(L, B, T, H, generator=gen)
    m_c = torch.zeros(B, T)
    m_r = torch.zeros(B, T)
    for b, n in enumerate([12, 9, 5, 7]):
        m_c[b, :n] = 1
    for b, n in enumerate([10, 12, 3]):
        m_r[b, :n] = 1
    m_r[3, 2:] = 1  # left-padded rejected sequence
    if kind == "masked_row":
        m_c[1] = 0  # example 1: nothing counted at all
        m_r[2] = 0  # example 2: no reroute positions, retain still counted
    if kind == "at_reference":
        pi_c = ref_c.clone()  # retain distance exactly 0 (first step of adapter training)
    z = (torch.rand(B, generator=gen) - 0.5) * 0.4
    return dict(
        policy_chosen=pi_c.float(),
        policy_rejected=pi_r.float(),
        reference_chosen=ref_c.float(),
        reference_rejected=ref_r.float(),
        chosen_mask=m_c.float(),
        rejected_mask=m_r.float(),
        dpo_z=z.float(),
    )


# ----------------------------------------------------------------------------------------------
# formulas (float64)


def vnorm(x):
    return torch.linalg.vector_norm(x, dim=-1)


def cos(x, y):
    return (x * y).sum(-1) / torch.clamp(vnorm(x) * vnorm(y), min=1e-8)


def dist(cfg, x, y):
    v = cfg["variant"]
    if v in ("original", "rr-only"):
        return vnorm(x - y)
    if v == "direction":
        a = cfg["direction_weight"]
        return a * (1 - cos(x, y)) + (1 - a) * torch.abs(vnorm(x) - vnorm(y))
    if v == "normalized-mse":
        nx = torch.nn.functional.normalize(x, dim=-1, eps=1e-12)
        ny = torch.nn.functional.normalize(y, dim=-1, eps=1e-12)
        return ((nx - ny) ** 2).mean(-1)
    if v == "topk":
        k = min(max(math.ceil(cfg["topk_fraction"] * x.shape[-1]), 1), x.shape[-1])
        return torch.topk((x - y) ** 2, k, dim=-1).values.mean(-1)
    if v == "symlog":
        s = lambda t: torch.sign(t) * torch.log(torch.abs(t) + 1e-6)  # noqa: E731
        return ((s(x) - s(y)) ** 2).mean(-1)
    if v == "adaptive":
        c = cos(x, y)
        return torch.where(c.detach() > cfg["adaptive_threshold"], ((x - y) ** 2).mean(-1), 1 - c)
    raise ValueError(v)


def ldr(a, b, a2, b2, eps):
    return torch.log(vnorm(a - b) + eps) - torch.log(vnorm(a2 - b2) + eps).detach()


def cka_dist(x, y, m):
    """1 - linear CKA per (l, b) over the rows t with m[b, t] = 1; validity = at least 2 rows."""
    d = torch.zeros(L, B, dtype=x.dtype)
    valid = torch.zeros(1, B, dtype=x.dtype)
    for b in range(B):
        rows = m[b] > 0
        if int(rows.sum()) < 2:
            continue
        valid[0, b] = 1
        for l in range(L):
            X = x[l, b][rows]
            Y = y[l, b][rows]
            Xc = X - X.mean(0, keepdim=True)
            Yc = Y - Y.mean(0, keepdim=True)
            num = torch.linalg.matrix_norm(Yc.T @ Xc) ** 2
            den = torch.linalg.matrix_norm(Xc.T @ Xc) * torch.linalg.matrix_norm(Yc.T @ Yc)
            d[l, b] = 1 - num / torch.clamp(den, min=1e-12)
    return d, valid


def pool(x, m):
    return (x * m[None, :, :, None]).sum(2) / torch.clamp(m.sum(-1), min=1)[None, :, None]


def parts(d, em, v):
    """part[b] = sum over b's entries of v_b M d, divided by sum of v M over all entries."""
    em = em.expand_as(d)
    vb = torch.ones(B, dtype=d.dtype) if v is None else v
    vm = em * (vb.view(1, B, 1) if d.dim() == 3 else vb.view(1, B))
    den = vm.sum()
    contrib = torch.where(em > 0, d, torch.zeros_like(d)) * vm
    per_b = contrib.sum(0) if d.dim() == 2 else contrib.sum(0).sum(-1)
    if float(den) == 0.0:
        return per_b * 0
    return per_b / den


def reprpo(inp, cfg, p):
    pi_c, pi_r = inp["policy_chosen"], inp["policy_rejected"]
    ref_c, ref_r = inp["reference_chosen"].detach(), inp["reference_rejected"].detach()
    m_c, m_r = inp["chosen_mask"], inp["rejected_mask"]
    m_b = m_c * m_r
    v = cfg["variant"]
    if cfg["example_weights"]:
        w = torch.softmax(-cfg["weight_scale"] * inp["dpo_z"], dim=0).detach()
        v_rr, v_ret = 1 - w, w
    else:
        v_rr = v_ret = None
    if v == "cka":
        d_rr, em_rr = cka_dist(pi_r, ref_c, m_b)
        d_ret, em_ret = cka_dist(pi_c, ref_c, m_c)
    elif cfg["token_reduction"] == "per-position":
        if v == "ldr":
            d_rr = ldr(ref_c, pi_r, ref_c, ref_r, cfg["ldr_eps"])
            d_ret = ldr(ref_c, pi_c, ref_c, ref_r, cfg["ldr_eps"])
        else:
            d_rr, d_ret = dist(cfg, pi_r, ref_c), dist(cfg, pi_c, ref_c)
        em_rr = m_b[None]
        em_ret = (m_b if v == "ldr" else m_c)[None]
    else:
        pc, pr, rc, rj = pool(pi_c, m_c), pool(pi_r, m_r), pool(ref_c, m_c), pool(ref_r, m_r)
        if v == "ldr":
            d_rr = ldr(rc, pr, rc, rj, cfg["ldr_eps"])
            d_ret = ldr(rc, pc, rc, rj, cfg["ldr_eps"])
        else:
            d_rr, d_ret = dist(cfg, pr, rc), dist(cfg, pc, rc)
        has_c = (m_c.sum(-1) > 0).to(d_rr.dtype)
        has_r = (m_r.sum(-1) > 0).to(d_rr.dtype)
        em_rr = (has_c * has_r)[None]
        em_ret = (has_c * has_r if v == "ldr" else has_c)[None]
    part_rr = parts(d_rr, em_rr, v_rr)
    part_ret = parts(d_ret, em_ret, v_ret)
    L_rr, L_ret = part_rr.sum(), part_ret.sum()
    alpha = cfg["alpha"]
    if cfg["schedule"] == "reprpo":
        c_rr, c_ret = 1 - p / 2, p / 2
        k_ret = alpha * c_ret
    else:
        c_rr, c_ret = alpha * (1 - p), alpha * p
        k_ret = c_ret
    if v == "rr-only":
        c_ret = k_ret = 0.0
    loss = c_rr * L_rr + k_ret * L_ret
    per_example = B * (c_rr * part_rr + k_ret * part_ret)

    def mmean(c, m):
        mm = m[None].expand_as(c)
        n = mm.sum()
        return (c * mm).sum() / n if float(n) > 0 else torch.zeros((), dtype=c.dtype)

    metrics = {
        "loss_rr": float(L_rr.detach()),
        "loss_retain": float(L_ret.detach()),
        "coef_rr": float(c_rr),
        "coef_retain": float(c_ret),
        "cosine/chosen": float(mmean(cos(pi_c, ref_c).detach(), m_c)),
        "cosine/rejected": float(mmean(cos(pi_r, ref_c).detach(), m_b)),
    }
    return loss, per_example, metrics


# ----------------------------------------------------------------------------------------------
# cases

CASES = [
    # (name, input set, config overrides, progress)
    ("original_p0", "base", {}, 0.0),
    ("original_p03", "base", {}, 0.3),
    ("original_p1_alpha2", "base", {"alpha": 2.0}, 1.0),
    ("circuit_breakers", "base", {"schedule": "circuit-breakers"}, 0.4),
    ("weights", "base", {"example_weights": True}, 0.5),
    ("weights_cb", "base", {"example_weights": True, "schedule": "circuit-breakers"}, 0.25),
    ("mean_tokens", "base", {"token_reduction": "mean"}, 0.5),
    ("mean_tokens_weights", "base", {"token_reduction": "mean", "example_weights": True}, 0.7),
    ("direction", "base", {"variant": "direction"}, 0.5),
    ("direction_a08_mean", "base", {"variant": "direction", "direction_weight": 0.8, "token_reduction": "mean"}, 0.5),
    ("normalized_mse", "base", {"variant": "normalized-mse"}, 0.5),
    ("topk_default", "base", {"variant": "topk"}, 0.5),
    ("topk_f02", "base", {"variant": "topk", "topk_fraction": 0.2}, 0.5),
    ("symlog", "base", {"variant": "symlog"}, 0.5),
    ("cka", "base", {"variant": "cka"}, 0.5),
    ("cka_weights", "base", {"variant": "cka", "example_weights": True}, 0.5),
    ("adaptive", "base", {"variant": "adaptive"}, 0.5),
    ("adaptive_t075", "base", {"variant": "adaptive", "adaptive_threshold": 0.75}, 0.5),
    ("rr_only", "base", {"variant": "rr-only"}, 0.5),
    ("ldr", "base", {"variant": "ldr"}, 0.5),
    ("ldr_mean_weights", "base", {"variant": "ldr", "token_reduction": "mean", "example_weights": True}, 0.5),
    ("masked_row_original", "masked_row", {}, 0.5),
    ("masked_row_weights", "masked_row", {"example_weights": True}, 0.5),
    ("masked_row_mean", "masked_row", {"token_reduction": "mean"}, 0.5),
    ("masked_row_cka", "masked_row", {"variant": "cka"}, 0.5),
    ("masked_row_ldr", "masked_row", {"variant": "ldr"}, 0.5),
    ("masked_row_topk", "masked_row", {"variant": "topk", "topk_fraction": 0.2}, 0.5),
    ("at_reference_original", "at_reference", {}, 0.5),
    ("at_reference_direction", "at_reference", {"variant": "direction"}, 0.5),
    ("at_reference_ldr", "at_reference", {"variant": "ldr"}, 0.5),
    ("at_reference_normalized_mse", "at_reference", {"variant": "normalized-mse"}, 0.5),
    ("at_reference_mean", "at_reference", {"token_reduction": "mean"}, 0.5),
]


def main():
    gen = torch.Generator().manual_seed(20240604)
    sets = {k: make_inputs(gen, k) for k in ("base", "masked_row", "at_reference")}
    tensors = {}
    for k, inp in sets.items():
        for n, t in inp.items():
            tensors[f"{k}.{n}"] = t.contiguous()
    cases = []
    for name, kind, over, p in CASES:
        cfg = dict(DEFAULTS, **over)
        inp = {n: t.double() for n, t in sets[kind].items()}
        inp["policy_chosen"].requires_grad_(True)
        inp["policy_rejected"].requires_grad_(True)
        if cfg["variant"] == "adaptive":
            # the branch switch must not sit within float32 rounding of the threshold
            for x in (inp["policy_chosen"], inp["policy_rejected"]):
                c = cos(x, inp["reference_chosen"]).detach()
                margin = float((c - cfg["adaptive_threshold"]).abs().min())
                assert margin > 1e-4, (name, margin)
        loss, per_example, metrics = reprpo(inp, cfg, p)
        assert torch.isfinite(loss), name
        assert abs(float(per_example.mean()) - float(loss)) < 1e-12, name
        loss.backward()
        g_c, g_r = inp["policy_chosen"].grad, inp["policy_rejected"].grad
        assert torch.isfinite(g_c).all() and torch.isfinite(g_r).all(), name
        tensors[f"{name}.per_example"] = per_example.detach().contiguous()
        # gradients are compared at 1e-4 relative: float32 storage keeps the fixture small
        tensors[f"{name}.grad_policy_chosen"] = g_c.float().contiguous()
        tensors[f"{name}.grad_policy_rejected"] = g_r.float().contiguous()
        cfg_json = {k: v for k, v in cfg.items() if DEFAULTS.get(k) != v or k == "variant"}
        cases.append(
            dict(name=name, inputs=kind, config=cfg_json, progress=p, loss=float(loss.detach()), metrics=metrics)
        )
        print(f"{name:32s} loss {float(loss): .6f}  L_rr {metrics['loss_rr']: .5f}  L_ret {metrics['loss_retain']: .5f}")
    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, "reprpo.safetensors"))
    meta = dict(
        generator="tests/reference/gen_reprpo_fixtures.py",
        torch=torch.__version__,
        shape=dict(layers=L, batch=B, tokens=T, hidden=H),
        defaults=DEFAULTS,
        cases=cases,
    )
    with open(os.path.join(OUT, "reprpo.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
