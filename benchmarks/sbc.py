"""Simulation-based calibration of ``fit`` on a small model.

Each replication draws the global parameters from the model's own prior
(``numpyro.infer.Predictive`` on :func:`bayescirc.model.collapsed_model`, whose
likelihood factor does not affect prior draws), then per edge ``log tau``, the
spike/slab indicator, ``mu``, ``delta`` and per-input scores from the
generative model, fits with NUTS (priors on the same fixed scale), and records
the rank of each true value among the posterior draws. If the fit is
calibrated, ranks are uniform: a chi-square test on binned ranks and a KS test
on normalised ranks give the p-values printed per parameter.

    python benchmarks/sbc.py --reps 100            # 13-edge graph, 1 chain x 297 draws thinned to 99 per fit
    python benchmarks/sbc.py --reps 100 --error-pooling method   # the per-method model
    python benchmarks/sbc.py --reps 100 --approx-only full       # approximate-only inputs through the model
    python benchmarks/sbc.py --reps 20 --minutes 15
    python benchmarks/sbc.py --reps 100 --start 60 > b.log   # continue a run stopped after 60 (a.log)
    python benchmarks/sbc.py --combine a.log b.log            # one table from both logs (a later log wins a rep)

A replication is reproducible (seed 1000+rep for its prior draw, rep for its
fit) and the replications are independent draws of the same check, so the logs
of runs with one setting combine.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import time
import warnings
from functools import partial

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def prior_draw(seed: int, n_inputs: int, n_exact: int, scale: float, by_type: bool = True):
    import jax
    import jax.numpy as jnp
    from numpyro.infer import Predictive

    from bayescirc import model as bm
    from bayescirc.fitting import _groups
    from bayescirc.graph import Graph

    graph = Graph(1, 2)
    edges = np.array(graph.edges, dtype=object)
    table, type_idx, layer_idx, types, layers = _groups(edges)
    M = 2
    E = len(edges)
    z = np.zeros(E)
    dummy = bm.EdgeData(n_x=z, sx=z, sxx=z, n_xy=np.zeros((E, M)), sx_m=np.zeros((E, M)), sxx_m=np.zeros((E, M)),
                        sy_m=np.zeros((E, M)), syy_m=np.zeros((E, M)), sxy_m=np.zeros((E, M)), pat_n=(), pat_s=(),
                        pat_c=(), error_group=type_idx if by_type else np.zeros(E, np.int32), pat_idx=(), n_methods=M)
    grid = bm.coarse_grid(E, scale, points=3)
    model = partial(bm.collapsed_model, n_types=len(types), n_layers=len(layers),
                    n_error_groups=len(types) if by_type else 1)
    draw = Predictive(model, num_samples=1)(jax.random.PRNGKey(seed), dummy, grid, jnp.asarray(type_idx),
                                            jnp.asarray(layer_idx), scale)
    g = {k: np.asarray(v[0]) for k, v in draw.items() if k != "edges"}
    rng = np.random.default_rng(seed)
    tm = g["tau_loc"] + g["type_sd"] * g["type_z"][type_idx] + g["layer_sd"] * g["layer_z"][layer_idx]
    tau = np.exp(tm + g["tau_spread"] * rng.normal(size=E))
    slab = rng.uniform(size=E) < g["pi"]
    mu = np.where(slab, rng.normal(size=E) * g["slab_sd"], 0.0)
    par = bm.make_globals(g, M, scale, g["slab_sd"], 0.0, g["pi"])  # (types, M), sigma with its floor
    group = type_idx if by_type else np.zeros(E, int)
    alpha, beta, sigma, omega = (np.asarray(getattr(par, k))[group] for k in ("alpha", "beta", "sigma", "omega"))
    delta = rng.normal(size=(E, M)) * omega
    theta = mu + tau * rng.normal(size=(n_inputs, E))
    rows = []
    names = ["eap", "ig"]
    for i in range(n_inputs):
        if i < n_exact:
            rows.append(pd.DataFrame({"input_id": i, "edge": edges, "method": "exact", "score": theta[i]}))
        for m in range(M):
            y = alpha[:, m] + beta[:, m] * theta[i] + delta[:, m] + sigma[:, m] * rng.normal(size=E)
            rows.append(pd.DataFrame({"input_id": i, "edge": edges, "method": names[m], "score": y}))
    scores = pd.concat(rows, ignore_index=True)
    truth = {"beta[eap]": g["beta"][0], "sigma[eap]": g["sigma"][0]}
    if by_type:
        t0, t1 = types[type_idx[0]], types[type_idx[5]]
        truth.update({"alpha_rel[ig]": g["alpha_rel"][1], "omega_rel[eap]": g["omega_rel"][0],
                      f"beta_type[{t0},eap]": g["beta_type"][type_idx[0], 0],
                      f"sigma_type[{t1},ig]": g["sigma_type"][type_idx[5], 1]})
    else:
        truth["alpha[ig]"] = g["alpha"][1]
    truth.update({"pi": g["pi"], "tau_loc": g["tau_loc"], "mu[0]": mu[0], "mu[5]": mu[5], "tau[3]": tau[3],
                  "slab_sd": g["slab_sd"]})
    return scores, truth, list(edges)


def posterior_of(res, name, edges, thin=1):
    post = res.idata.posterior.isel(draw=slice(thin - 1, None, thin))
    if name.startswith(("mu[", "tau[")):
        var, k = name[:-1].split("[")
        return post[var].values[..., int(k)].reshape(-1)
    if "," in name:
        var, rest = name[:-1].split("[")
        t, m = rest.split(",")
        i = [str(x) for x in post["edge_type"].values].index(t)
        k = [str(x) for x in post["method"].values].index(m)
        return post[var].values[..., i, k].reshape(-1)
    if "[" in name:
        var, m = name[:-1].split("[")
        k = [str(x) for x in post["method"].values].index(m)
        return post[var].values[..., k].reshape(-1)
    return post[name].values.reshape(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--draws", type=int, default=99)
    parser.add_argument("--inputs", type=int, default=40)
    parser.add_argument("--exact-inputs", type=int, default=10)
    parser.add_argument("--thin", type=int, default=3, help="keep every THIN-th draw: SBC needs near-independent draws")
    parser.add_argument("--start", type=int, default=0, help="first replication (seeds 1000+rep): continue an earlier run")
    parser.add_argument("--minutes", type=float, default=None, help="stop early after this many minutes")
    parser.add_argument("--error-pooling", default="type", choices=["type", "method"],
                        help="approximation parameters per method x edge type (default) or per method")
    parser.add_argument("--approx-only", default="auto", choices=["auto", "full", "mean"],
                        help="fit's approx_only: auto (the default, = mean here), full (approximate-only inputs "
                             "through the model) or mean (through their mean)")
    parser.add_argument("--combine", nargs="+", metavar="LOG",
                        help="print the table from earlier runs' logs (same settings) instead of fitting")
    args = parser.parse_args()
    if args.combine:
        ranks, draws = ranks_from_logs(args.combine, args.draws)
        print_table(ranks, draws)
        return

    from bayescirc.fitting import fit

    scale = 1.0
    ranks: dict[str, list[int]] = {}
    started = time.time()
    import jax

    # fit turns on 64-bit mode for the process; on from the start, every replication's prior draw is the
    # same whatever ran before it (the first draw of a process was float32, later ones float64)
    jax.config.update("jax_enable_x64", True)

    settings = {"draws": args.draws, "thin": args.thin, "inputs": args.inputs, "exact_inputs": args.exact_inputs,
                "error_pooling": args.error_pooling, "approx_only": args.approx_only}  # --combine checks them
    for rep in range(args.start, args.reps):
        scores, truth, edges = prior_draw(1000 + rep, args.inputs, args.exact_inputs, scale,
                                          by_type=args.error_pooling == "type")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fit(scores, inference="nuts", chains=1, draws=args.draws * args.thin, warmup=200, seed=rep, progress=False,
                      prior_scale=scale, error_pooling=args.error_pooling, approx_only=args.approx_only)
        for name, value in truth.items():
            draws = posterior_of(res, name, edges, args.thin)
            # ties (a spike draw at exactly 0) broken at random, as SBC prescribes for discrete parts
            below = np.sum(draws < value)
            ties = np.sum(draws == value)
            ranks.setdefault(name, []).append(int(below + np.random.default_rng(rep).integers(0, ties + 1)))
        jax.clear_caches()  # every fit leaves compiled programs mapped; ~50 fits in one process exhaust vm.max_map_count
        print(f"rep {rep + 1}: {time.time() - started:.0f} s; settings {settings}; "
              f"ranks {({k: v[-1] for k, v in ranks.items()})}", flush=True)
        if args.minutes and time.time() - started > 60 * args.minutes:
            break
    print_table(ranks, args.draws)


def ranks_from_logs(paths: list[str], draws: int) -> tuple[dict[str, list[int]], int]:
    """Ranks per parameter and draws per fit from the ``rep N: ... ranks {...}`` lines of earlier runs' logs.

    Lines that record their settings must all agree (the table mixes no runs of different settings);
    lines from logs that predate the settings are taken at ``draws``, and refused if a rank exceeds it.
    """
    by_rep: dict[int, dict[str, int]] = {}
    seen: dict[str, str] = {}
    for path in paths:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                m = re.match(r"rep (\d+): .*?; ranks (\{.*\})\s*$", line)
                if not m:
                    continue
                by_rep[int(m.group(1))] = ast.literal_eval(m.group(2))
                found = re.search(r"; settings (\{.*?\});", line)
                if found:
                    seen.setdefault(found.group(1), f"{path}:{number}")
    if not by_rep:
        raise SystemExit(f"no 'rep N: ... ranks {{...}}' lines in {', '.join(paths)}")
    if len(seen) > 1:
        raise SystemExit("the logs were run with different settings: "
                         + "; ".join(f"{where}: {text}" for text, where in seen.items()))
    if seen:
        draws = int(ast.literal_eval(next(iter(seen)))["draws"])
    ranks: dict[str, list[int]] = {}
    for rep in sorted(by_rep):
        for name, r in by_rep[rep].items():
            ranks.setdefault(name, []).append(int(r))
    top = max(max(r) for r in ranks.values())
    if top > draws:
        raise SystemExit(f"a rank of {top} exceeds --draws {draws}: give the draws those runs used.")
    return ranks, draws


def print_table(ranks: dict[str, list[int]], draws: int) -> None:
    from scipy import stats

    n = len(next(iter(ranks.values())))
    bins = 5
    print(f"\nSBC: {n} replications, {draws} draws each, ranks in 0..{draws}")
    print("| parameter | chi-square p (5 bins) | KS p | rank counts per bin |")
    print("|---|---|---|---|")
    # bins of equal width over the draws + 1 rank values; unless bins divides draws + 1 they hold
    # different numbers of values, and the expected counts follow
    values_per_bin = np.histogram(np.arange(draws + 1), bins=bins, range=(0, draws + 1))[0]
    for name, r in ranks.items():
        r = np.asarray(r)
        counts = np.histogram(r, bins=bins, range=(0, draws + 1))[0]
        chi = stats.chisquare(counts, f_exp=n * values_per_bin / (draws + 1)).pvalue
        ks = stats.kstest((r + np.random.default_rng(0).uniform(size=n)) / (draws + 1), "uniform").pvalue
        print(f"| {name} | {chi:.3f} | {ks:.3f} | {', '.join(str(c) for c in counts)} |")


if __name__ == "__main__":
    main()
