"""Writes tests/fixtures/sweep/stats.json: the statistics of `cargo xtask sweep report`, computed by
SciPy, for crates/reprpo-sweep/tests/all/stats_reference.rs.

    /tmp/sweep-venv/bin/python tests/reference/gen_sweep_stats_fixtures.py

Environment: requirements-sweep.txt (scipy 1.16.3, numpy 2.3.5). Deterministic: fixed inputs, no
randomness. Contents:
  quantiles  Student t quantiles t_{p, df} (scipy.stats.t.ppf) for p in {0.975, 0.995, 0.9} and
             df 1..30, 40, 60, 120, 1000
  means      per sample x (n = 1..10 values, including a constant sample): n, mean, the sample
             standard deviation (ddof 1), the half-width t_{0.975, n-1} sd / sqrt(n) and the 95%
             interval from scipy.stats.ttest_1samp(x).confidence_interval(0.95); n = 1 has none (null)
  paired     per pair of samples (a, b) matched by position: the mean difference a - b and its 95%
             interval from scipy.stats.ttest_rel(a, b).confidence_interval(0.95)
"""

import json
import math
import os

import numpy as np
import scipy
import scipy.stats as st

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "fixtures", "sweep", "stats.json"))
EXPECTED_VERSIONS = {"scipy": "1.16.3", "numpy": "2.3.5"}

SAMPLES = [
    [0.72],
    [0.65, 0.74],
    [0.81, 0.79, 0.86],
    [0.70, 0.70, 0.70],
    [0.5, 0.61, 0.58, 0.66, 0.71],
    [1.37, 1.40, 1.19, 1.09, 1.21, 1.33],
    [-0.02, 0.03, 0.01, -0.05, 0.04, 0.0, 0.02],
    [12.5, 9.75, 11.0, 10.25, 13.5, 8.0, 10.0, 11.75, 9.5, 12.0],
]

PAIRS = [
    ([0.72, 0.74], [0.65, 0.66]),
    ([0.81, 0.79, 0.86], [0.80, 0.75, 0.79]),
    ([0.5, 0.61, 0.58, 0.66, 0.71], [0.52, 0.55, 0.57, 0.60, 0.63]),
    ([0.70, 0.71, 0.72], [0.60, 0.61, 0.62]),
    ([1.37, 1.40, 1.19, 1.09, 1.21, 1.33], [1.41, 1.38, 1.36, 1.29, 1.30, 1.35]),
]


def opt(x):
    return None if x is None or not math.isfinite(x) else float(x)


def mean_case(x):
    n = len(x)
    case = {"x": x, "n": n, "mean": float(np.mean(x))}
    if n < 2:
        case.update(sd=None, half_width=None, lo=None, hi=None)
        return case
    sd = float(np.std(x, ddof=1))
    half = float(st.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    if sd == 0.0:
        # ttest_1samp gives NaN for a constant sample; the interval is the point itself.
        lo = hi = float(np.mean(x))
    else:
        ci = st.ttest_1samp(x, 0.0).confidence_interval(0.95)
        lo, hi = float(ci.low), float(ci.high)
    case.update(sd=sd, half_width=half, lo=opt(lo), hi=opt(hi))
    return case


def paired_case(a, b):
    d = [x - y for x, y in zip(a, b)]
    ci = st.ttest_rel(a, b).confidence_interval(0.95)
    return {"a": a, "b": b, "n": len(d), "mean": float(np.mean(d)), "lo": float(ci.low), "hi": float(ci.high)}


def main():
    versions = {"scipy": scipy.__version__, "numpy": np.__version__}
    if versions != EXPECTED_VERSIONS:
        raise SystemExit(f"expected {EXPECTED_VERSIONS}, have {versions} (see requirements-sweep.txt)")
    dfs = list(range(1, 31)) + [40, 60, 120, 1000]
    quantiles = [
        {"p": p, "df": df, "t": float(st.t.ppf(p, df))} for p in (0.975, 0.995, 0.9) for df in dfs
    ]
    out = {
        "generator": "tests/reference/gen_sweep_stats_fixtures.py",
        "versions": versions,
        "quantiles": quantiles,
        "means": [mean_case(x) for x in SAMPLES],
        "paired": [paired_case(a, b) for a, b in PAIRS],
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    os.replace(tmp, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
