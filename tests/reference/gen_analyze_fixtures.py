"""Writes tests/fixtures/analyze/stats.json: the numbers of `cargo xtask analyze` computed by NumPy
and scikit-learn on fixed mean-pooled hidden states, for crates/reprpo-eval/tests/all/analyze_reference.rs.

    python3 -m venv /tmp/analyze-venv && /tmp/analyze-venv/bin/pip install -r tests/reference/requirements-analyze.txt
    /tmp/analyze-venv/bin/python tests/reference/gen_analyze_fixtures.py

Deterministic (numpy.random.default_rng with fixed seeds). Two cases: `narrow` (hidden size 12, 30
pairs: more rows than features) and `wide` (hidden size 80, 24 pairs: the probe has more features
than rows). Each has two layers; per layer the training dataset's chosen / rejected states (a
planted preference direction plus noise, stronger at the second layer), per-pair DPO margins
(correlated with the planted projection), and a transfer dataset (a rotated direction).

Per layer, with p_i = c_i - r_i and, for i < h = n // 2, s_i = c_i - c_{i+h} and t_i = r_i - r_{i+h}:
  consistency / sample_consistency  cosines of every p_i, p_j (s_i, s_j), i < j: count, mean, std
                                     (ddof 0) and numpy.quantile 0.1 / 0.5 / 0.9
  alignment                          cos(p_i, sum_{j != i} p_j), the same summary
  pca / sample_pca                   cumulative sklearn PCA().explained_variance_ratio_ at k = 1, 2, 5, 10
  separation                         mean |p_i| / mean |s_i|
  probe                              make_pipeline(StandardScaler(), LogisticRegression(C=1.0,
                                     solver="newton-cholesky", tol=1e-12)) on chosen (1) vs rejected (0):
                                     its coefficients (standardised space) and intercept, accuracy
                                     (pipeline.score) and pair accuracy (decision(c_i) > decision(r_i))
                                     on the training and the transfer dataset
  alignment_vs_margin / probe_vs_margin   numpy.corrcoef with the margins
  by_h                               mean over pairs of |p_i|, |s_i|, |t_i| per neuron
Per case, `token_pairs`: two pairs' per-token states (5 tokens per completion, per layer: the pair's
pooled state plus noise, drawn from a second generator so that the data above is unchanged) and the
by_token values: with u = sum_i p_i / |sum_i p_i|, a = mean_i c_i.u, b = mean_i r_i.u, each token's
(x.u - (a + b) / 2) / ((a - b) / 2) per layer (-1 at the mean rejected projection, +1 at the chosen).
"""

import json
import os

import numpy as np
import sklearn
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "fixtures", "analyze", "stats.json"))
EXPECTED_VERSIONS = {"numpy": "2.4.6", "sklearn": "1.9.1"}
TOP_K = [1, 2, 5, 10]


def cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def spread(xs):
    xs = np.asarray(xs, dtype=np.float64)
    return {
        "count": int(xs.size),
        "mean": float(xs.mean()),
        "sd": float(xs.std()),
        "q10": float(np.quantile(xs, 0.1)),
        "q50": float(np.quantile(xs, 0.5)),
        "q90": float(np.quantile(xs, 0.9)),
    }


def pairwise(rows):
    n = len(rows)
    return [cos(rows[i], rows[j]) for i in range(n) for j in range(i + 1, n)]


def top(rows):
    ratios = PCA().fit(rows).explained_variance_ratio_
    cum = np.cumsum(ratios)
    return [{"k": k, "fraction": float(cum[k - 1])} for k in TOP_K if k <= len(ratios)]


def make_dataset(rng, n, d, direction, strength):
    base = rng.normal(size=(n, d))
    push = strength * (1.0 + 0.5 * rng.normal(size=(n, 1)))
    chosen = base + push * direction + 0.3 * rng.normal(size=(n, d))
    rejected = base - push * direction + 0.3 * rng.normal(size=(n, d))
    margin = 2.0 * push[:, 0] + 0.5 * rng.normal(size=n)
    return chosen, rejected, margin


def probe_scores(pipe, chosen, rejected):
    x = np.vstack([chosen, rejected])
    y = np.r_[np.ones(len(chosen)), np.zeros(len(rejected))]
    dc, dr = pipe.decision_function(chosen), pipe.decision_function(rejected)
    return float(pipe.score(x, y)), float(np.mean(dc > dr)), dc - dr


def layer(chosen, rejected, margin, t_chosen, t_rejected):
    h = len(chosen) // 2
    p, s = chosen - rejected, chosen[:h] - chosen[h : 2 * h]
    t = rejected[:h] - rejected[h : 2 * h]
    total = p.sum(axis=0)
    align = [cos(p[i], total - p[i]) for i in range(len(p))]
    pipe = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, solver="newton-cholesky", tol=1e-12, max_iter=1000)
    )
    x = np.vstack([chosen, rejected])
    y = np.r_[np.ones(len(chosen)), np.zeros(len(rejected))]
    pipe.fit(x, y)
    acc, pair_acc, margins = probe_scores(pipe, chosen, rejected)
    t_acc, t_pair, _ = probe_scores(pipe, t_chosen, t_rejected)
    lr = pipe[-1]
    return {
        "consistency": spread(pairwise(p)),
        "sample_consistency": spread(pairwise(s)),
        "alignment": spread(align),
        "pca": top(p),
        "sample_pca": top(s),
        "separation": float(np.linalg.norm(p, axis=1).mean() / np.linalg.norm(s, axis=1).mean()),
        "probe": [
            {"dataset": "train", "accuracy": acc, "pair_accuracy": pair_acc},
            {"dataset": "transfer", "accuracy": t_acc, "pair_accuracy": t_pair},
        ],
        "alignment_vs_margin": float(np.corrcoef(align, margin)[0, 1]),
        "probe_vs_margin": float(np.corrcoef(margins, margin)[0, 1]),
        "probe_coef": lr.coef_[0].tolist(),
        "probe_intercept": float(lr.intercept_[0]),
        "by_h": [np.abs(p).mean(axis=0).tolist(), np.abs(s).mean(axis=0).tolist(), np.abs(t).mean(axis=0).tolist()],
    }


def by_token(layer_data, rng, n_pairs=2, n_tokens=5):
    out = []
    for i in range(n_pairs):
        pair = {"id": f"pair{i}", "chosen": [], "rejected": [], "expected": {"chosen": [], "rejected": []}}
        for l in layer_data:
            c, r = np.array(l["train"]["chosen"]), np.array(l["train"]["rejected"])
            total = (c - r).sum(axis=0)
            u = total / np.linalg.norm(total)
            a, b = (c @ u).mean(), (r @ u).mean()
            mid, half = (a + b) / 2, (a - b) / 2
            for side, pooled in (("chosen", c[i]), ("rejected", r[i])):
                toks = pooled + 0.5 * rng.normal(size=(n_tokens, len(u)))
                pair[side].append(toks.tolist())
                pair["expected"][side].append(((toks @ u - mid) / half).tolist())
        out.append(pair)
    return out


def case(seed, n, d, n_transfer):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    other = rng.normal(size=d)
    other -= (other @ direction) * direction
    other /= np.linalg.norm(other)
    layers = []
    for strength in (0.15, 0.6):
        c, r, m = make_dataset(rng, n, d, direction, strength)
        rotated = 0.8 * direction + 0.6 * other
        tc, tr, _ = make_dataset(rng, n_transfer, d, rotated, strength)
        expected = layer(c, r, m, tc, tr)
        layers.append(
            {
                "train": {"chosen": c.tolist(), "rejected": r.tolist()},
                "margin": m.tolist(),
                "transfer": {"chosen": tc.tolist(), "rejected": tr.tolist()},
                "expected": expected,
            }
        )
    token_pairs = by_token(layers, np.random.default_rng(seed + 100))
    return {"pairs": n, "hidden": d, "layers": layers, "token_pairs": token_pairs}


def main():
    versions = {"numpy": np.__version__, "sklearn": sklearn.__version__}
    if versions != EXPECTED_VERSIONS:
        raise SystemExit(f"versions {versions}, expected {EXPECTED_VERSIONS}")
    out = {
        "generator": "tests/reference/gen_analyze_fixtures.py",
        "versions": versions,
        "top_k": TOP_K,
        "probe_c": 1.0,
        "cases": {"narrow": case(1, 30, 12, 20), "wide": case(2, 24, 80, 16)},
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
