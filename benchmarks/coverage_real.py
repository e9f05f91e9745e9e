"""Do the fit's HDIs cover the exact all-input means on real scores? (issue 5's real-scores check)

Scores every edge of the shipped ioi-toy model exactly on all N inputs (plus
EAP and EAP-IG), then fits with the exact scores kept on the first 20% of the
inputs only and the approximations on all, and compares each edge's HDI with
its exact N-input mean (the "target"). The target is itself an estimate with
standard error ``se = sd / sqrt(N)``, so beside raw coverage it prints *fair*
coverage: the HDI misses by at most 2 SE of the target. It prints the figures
for the HDI of mu (``effect_hdi_*``, with its point mass at 0) and the
slab-conditional one (``slab_hdi_*``: the effect if the edge matters), over all
edges and over the edges whose target is more than 2 SE from 0.

    python benchmarks/coverage_real.py                         # collects 200 inputs (minutes), NUTS fit
    python benchmarks/coverage_real.py --scores all-exact.parquet --inference svi
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd


def coverage(frame: pd.DataFrame, low: str, high: str) -> dict:
    """Raw and fair (within 2 SE of the target) coverage of the interval columns ``low``/``high``."""
    lo, hi, t, se = frame[low], frame[high], frame["target"], frame["se"]
    covered = (lo <= t) & (t <= hi)
    fair = np.maximum(0, np.maximum(lo - t, t - hi)) <= 2 * se
    big = t.abs() > 2 * se
    return {"covered": covered.mean(), "fair": fair.mean(), "covered_big": covered[big].mean(),
            "fair_big": fair[big].mean(), "n_big": int(big.sum()), "zero_width": float(((hi - lo) <= 1e-12).mean()),
            "median_width": float(np.median(hi - lo))}


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", help="an existing all-exact scores file (default: collect one)")
    p.add_argument("--n-inputs", type=int, default=200)
    p.add_argument("--exact-fraction", type=float, default=0.2)
    p.add_argument("--inference", default="nuts", choices=["nuts", "svi"])
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--spike-sd", type=float, default=0.0, help="SD of the spike (0, the default: a point mass)")
    p.add_argument("--likelihood", default="gaussian")
    p.add_argument("--error-pooling", default="type", choices=["type", "method"],
                   help="approximation parameters per method x edge type (default) or per method")
    p.add_argument("--approx-only", default="auto", choices=["auto", "full", "mean"],
                   help="fit's approx_only: auto (the default), full (approximate-only inputs through the model) "
                        "or mean (through their mean)")
    a = p.parse_args(argv)

    from bayescirc.bridge import shipped_model
    from bayescirc.fitting import FitWarning, fit
    from bayescirc.scores import read_scores

    with tempfile.TemporaryDirectory() as tmp:
        path = a.scores
        if path is None:
            from bayescirc.collection import collect

            model = shipped_model("ioi-toy")
            path = Path(tmp) / "all.parquet"
            t = time.perf_counter()
            collect(model, Path(model) / "task.jsonl", out=path, n_inputs=a.n_inputs, exact_inputs=a.n_inputs,
                    device="cpu", progress=False, return_table=False)
            print(f"collected {a.n_inputs} inputs, all exact, in {time.perf_counter() - t:.0f} s")
        scores = pd.DataFrame(read_scores(path))
    exact = scores[scores["method"] == "exact"]
    n = exact["input_id"].nunique()
    g = exact.groupby("edge", observed=True)["score"]
    target = pd.DataFrame({"target": g.mean(), "se": g.std() / np.sqrt(g.count())})
    k = max(1, round(a.exact_fraction * n))
    keep_ids = np.sort(exact["input_id"].unique())[:k]
    sub = scores[(scores["method"] != "exact") | scores["input_id"].isin(keep_ids)].reset_index(drop=True)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        res = fit(sub, inference=a.inference, chains=2 if a.inference == "nuts" else 1, draws=a.draws,
                  spike_sd=a.spike_sd, likelihood=a.likelihood, error_pooling=a.error_pooling,
                  approx_only=a.approx_only, progress=False)
    seconds = time.perf_counter() - t
    e = res.edges.merge(target, left_on="edge", right_index=True)
    mean_k = sub[sub["method"] == "exact"].groupby("edge", observed=True)["score"].mean()
    err_post = np.median(np.abs(e["effect_mean"] - e["target"]))
    err_k = np.median(np.abs(e["edge"].map(mean_k) - e["target"]))
    d = res.summary["diagnostics"]
    print(f"fit: {a.inference}, error_pooling={a.error_pooling}, max r_hat {d['max_r_hat']}, min ESS bulk "
          f"{d['min_ess_bulk']}, divergences {d['divergences']}")
    print(f"fit: {a.inference}, spike_sd={a.spike_sd}, exact on {k} of {n} inputs, {len(e)} edges, {seconds:.0f} s")
    print(f"median |error| of the posterior mean {err_post:.4f} vs the exact {k}-input mean {err_k:.4f}")
    big = e["target"].abs() > 2 * e["se"]
    errs = {c: np.median(np.abs(e.loc[big, c] - e.loc[big, "target"])) for c in ("effect_mean", "slab_effect_mean")}
    print(f"on the {int(big.sum())} edges > 2 SE from 0: effect_mean {errs['effect_mean']:.4f}, slab_effect_mean "
          f"{errs['slab_effect_mean']:.4f}, exact {k}-input mean {np.median(np.abs(e.loc[big, 'edge'].map(mean_k) - e.loc[big, 'target'])):.4f}")
    rows = {"mu (effect_hdi)": coverage(e, "effect_hdi_low", "effect_hdi_high"),
            "mu if in the slab (slab_hdi)": coverage(e, "slab_hdi_low", "slab_hdi_high")}
    table = pd.DataFrame(rows).T
    n_big = int(table["n_big"].iloc[0])
    print(f"90% HDI coverage of the exact {n}-input means ({len(e)} edges; 'big': {n_big} edges > 2 SE from 0):")
    print(table.drop(columns="n_big").round(3).to_string())
    return table


if __name__ == "__main__":
    main()
