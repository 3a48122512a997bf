"""PyTorch side of the loss-kernel benchmark (docs/perf.md, "Loss kernels"): the same kernels as
crates/reprpo-losses/benches/losses.rs, forward + backward on the CPU, written as plain eager
PyTorch the way a Python implementation would write them (masks applied to the per-position
distances with torch.where; the cosine diagnostics computed under no_grad, as the Rust loss
reports them too).

- dpo_{sigmoid,ipo,hinge}/b{8,2}_{f32,bf16}: TRL 1.16's DPO formulas on [B] summed log-probs
  (IPO on length-averaged log-probs) plus TRL's reward metrics; backward into the policy log-probs.
- reprpo_{variant}/{L}x{B}x{T}x{H}_{f32,bf16}: the ReprPO family at 3x8x512x2048 and 3x2x64x256,
  progress 0.5, alpha 10, the reprpo schedule, no example weights, backward into the two policy
  hidden-state tensors; original-mean is the original distance with token reduction "mean". Masks: example b of B has its chosen sequence left-padded by b*T//(4B)
  positions and its rejected sequence right-padded by b*T//(3B), as in the Rust bench.

Prints one JSON line per kernel: {"id": ..., "median_s": ..., "reps": ...} (median of the timed
repetitions after warm-ups).

    /work/venvs/models/bin/python tests/reference/bench_losses.py --threads 2 [--filter 3x2x64]
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--filter", default="")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
DT = {"f32": torch.float32, "bf16": torch.bfloat16}


def timeit(fn, warm, reps):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


# ------------------------------------------------------------------------------------------------
# DPO (TRL 1.16 DPOTrainer.dpo_loss for these loss types, beta 0.1)


def dpo(kind, pc, pr, rc, rr, nc, nr, beta=0.1):
    if kind == "ipo":
        lc, lr, rlc, rlr = pc / nc, pr / nr, rc / nc, rr / nr
    else:
        lc, lr, rlc, rlr = pc, pr, rc, rr
    logits = (lc - lr) - (rlc - rlr)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    loss = losses.mean()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }
    return loss, losses, metrics


# ------------------------------------------------------------------------------------------------
# ReprPO family


def vnorm(x):
    return torch.linalg.vector_norm(x, dim=-1)


def cos(x, y):
    return (x * y).sum(-1) / torch.clamp(vnorm(x) * vnorm(y), min=1e-8)


def dist(v, x, y, H):
    if v in ("original", "rr-only"):
        return vnorm(x - y)
    if v == "direction":
        return 0.5 * (1 - cos(x, y)) + 0.5 * torch.abs(vnorm(x) - vnorm(y))
    if v == "normalized-mse":
        return ((F.normalize(x, dim=-1, eps=1e-12) - F.normalize(y, dim=-1, eps=1e-12)) ** 2).mean(-1)
    if v == "topk":
        k = min(max(math.ceil(0.005 * H), 1), H)
        return torch.topk((x - y) ** 2, k, dim=-1).values.mean(-1)
    if v == "symlog":
        s = lambda t: torch.sign(t) * torch.log(torch.abs(t) + 1e-6)  # noqa: E731
        return ((s(x) - s(y)) ** 2).mean(-1)
    if v == "adaptive":
        c = cos(x, y)
        return torch.where(c.detach() > 0.9, ((x - y) ** 2).mean(-1), 1 - c)
    raise ValueError(v)


def cka_dist(x, y, m):
    """1 - linear CKA per (l, b) over the rows with m[b, t]; [L, B] and validity [B]."""
    mm = m[None, :, :, None].to(x.dtype)
    cnt = torch.clamp(m.sum(-1), min=1).to(x.dtype)[None, :, None, None]

    def centre(t):
        mean = (t * mm).sum(2, keepdim=True) / cnt
        return (t - mean) * mm

    xc, yc = centre(x), centre(y)
    k = xc @ xc.transpose(-1, -2)
    g = yc @ yc.transpose(-1, -2)
    num = (k * g).sum((-1, -2))
    den = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(g)
    return 1 - num / torch.clamp(den, min=1e-12), m.sum(-1) >= 2


def masked_parts(d, em):
    """per-example parts of the masked mean of d [L, B(, T)] over em (bool, broadcastable)."""
    em = em.expand_as(d)
    num = torch.where(em, d, torch.zeros_like(d))
    per_b = num.sum(0) if d.dim() == 2 else num.sum((0, 2))
    return per_b / torch.clamp(em.sum(), min=1)


def reprpo(v, pi_c, pi_r, ref_c, ref_r, m_c, m_r, p=0.5, alpha=10.0):
    H = pi_c.shape[-1]
    m_b = m_c & m_r
    if v == "original-mean":
        # Token reduction "mean": each sequence pooled over its real tokens, compared per (l, b).
        def pool(x, m):
            mm = m[None, :, :, None].to(x.dtype)
            return (x * mm).sum(2) / torch.clamp(m.sum(-1), min=1).to(x.dtype)[None, :, None]

        pcm, prm, rcm = pool(pi_c, m_c), pool(pi_r, m_r), pool(ref_c, m_c)
        has_c = m_c.sum(-1) > 0
        has_b = has_c & (m_r.sum(-1) > 0)
        part_rr = masked_parts(vnorm(prm - rcm), has_b[None])
        part_ret = masked_parts(vnorm(pcm - rcm), has_c[None])
    elif v == "cka":
        d_rr, val_rr = cka_dist(pi_r, ref_c, m_b)
        d_ret, val_ret = cka_dist(pi_c, ref_c, m_c)
        part_rr, part_ret = masked_parts(d_rr, val_rr[None]), masked_parts(d_ret, val_ret[None])
    else:
        if v == "ldr":
            den = torch.log(vnorm(ref_c - ref_r) + 1e-6).detach()
            d_rr = torch.log(vnorm(ref_c - pi_r) + 1e-6) - den
            d_ret = torch.log(vnorm(ref_c - pi_c) + 1e-6) - den
            em_ret = m_b
        else:
            d_rr, d_ret = dist(v, pi_r, ref_c, H), dist(v, pi_c, ref_c, H)
            em_ret = m_c
        part_rr, part_ret = masked_parts(d_rr, m_b[None]), masked_parts(d_ret, em_ret[None])
    c_rr, c_ret = 1 - p / 2, p / 2
    k_ret = 0.0 if v == "rr-only" else alpha * c_ret
    L_rr, L_ret = part_rr.sum(), part_ret.sum()
    loss = c_rr * L_rr + k_ret * L_ret
    per_example = pi_c.shape[1] * (c_rr * part_rr + k_ret * part_ret)
    with torch.no_grad():
        cc = torch.where(m_c[None], cos(pi_c, ref_c), 0).sum() / torch.clamp(m_c.sum() * pi_c.shape[0], min=1)
        cr = torch.where(m_b[None], cos(pi_r, ref_c), 0).sum() / torch.clamp(m_b.sum() * pi_c.shape[0], min=1)
    metrics = {"loss_rr": L_rr.detach(), "loss_retain": L_ret.detach(), "cosine/chosen": cc, "cosine/rejected": cr}
    return loss, per_example, metrics


VARIANTS = ["original", "direction", "normalized-mse", "topk", "symlog", "cka", "adaptive", "rr-only", "ldr", "original-mean"]


def emit(id_, med, reps):
    print(json.dumps({"id": id_, "median_s": med, "reps": reps, "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)


def main():
    # One untimed pass first: the first autograd call of a process pays for lazy initialisation.
    x = torch.randn(8, requires_grad=True)
    dpo("sigmoid", x, x, x.detach(), x.detach(), 1.0, 1.0)[0].backward()
    for kind in ["sigmoid", "ipo", "hinge"]:
        for b in [8, 2]:
            for dn, dt in DT.items():
                id_ = f"dpo/{kind}/b{b}_{dn}"
                if a.filter not in id_:
                    continue
                pc = (torch.randn(b) * 5 - 100).to(dt).requires_grad_()
                pr = (torch.randn(b) * 5 - 110).to(dt).requires_grad_()
                rc = (torch.randn(b) * 5 - 101).to(dt)
                rr = (torch.randn(b) * 5 - 109).to(dt)
                n = torch.full((b,), 50.0, dtype=dt)

                def step():
                    loss, _, _ = dpo(kind, pc, pr, rc, rr, n, n)
                    loss.backward()
                    pc.grad = None
                    pr.grad = None

                emit(id_, timeit(step, 20, 200), 200)
    for shape, big in [((3, 2, 64, 256), False), ((3, 8, 512, 2048), True)]:
        L, B, T, H = shape
        sname = "x".join(map(str, shape))
        m_c = torch.zeros(B, T, dtype=torch.bool)
        m_r = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):
            m_c[b, b * T // (4 * B):] = True
            m_r[b, : T - b * T // (3 * B)] = True
        for dn, dt in DT.items():
            if not any(a.filter in f"reprpo_{v.replace('-', '_')}/{sname}_{dn}" for v in VARIANTS):
                continue
            rc = torch.randn(L, B, T, H)
            rr = 0.6 * rc + 0.8 * torch.randn(L, B, T, H)
            pc = (rc + 0.3 * torch.randn(L, B, T, H)).to(dt).requires_grad_()
            pr = (rr + 0.3 * torch.randn(L, B, T, H)).to(dt).requires_grad_()
            rc, rr = rc.to(dt), rr.to(dt)
            for v in VARIANTS:
                id_ = f"reprpo_{v.replace('-', '_')}/{sname}_{dn}"
                if a.filter not in id_:
                    continue

                def step():
                    loss, _, _ = reprpo(v, pc, pr, rc, rr, m_c, m_r)
                    loss.backward()
                    pc.grad = None
                    pr.grad = None

                warm, reps = (1, 7) if big else (3, 30)
                emit(id_, timeit(step, warm, reps), reps)


main()
