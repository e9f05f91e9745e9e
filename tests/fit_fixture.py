"""A FitResult built by hand to the fit's output contract (HELPERS.md, "The fit's outputs").

The plots and the report consume a fit; the fit itself is another module. This
builds one directly: a simulation with known truth supplies per-input scores,
and a posterior concentrated around that truth supplies ``mu``, ``inclusion``,
``tau`` (chain, draw, edge), ``alpha``, ``beta``, ``sigma``, ``omega`` (chain,
draw, method), two scalar hyper-parameters and NUTS sample stats. Because the
posterior's spread is set here, tests can check figures and predictive draws
against closed forms.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bayescirc import schema
from bayescirc.graph import edge_table
from bayescirc.posterior import FitResult
from bayescirc.simulation import simulate

METHODS = (schema.EAP, schema.EAP_IG_INPUTS)
METADATA = {"model": "/opt/bayescirc/models/ioi-toy", "task": "/opt/bayescirc/models/ioi-toy/task.jsonl", "metric": "logit-diff",
            "sign_convention": schema.SIGN_CONVENTION, "n_inputs": 40}


def make_simulation(n_layers=2, n_heads=2, n_inputs=40, n_exact=12, seed=3):
    return simulate(n_layers=n_layers, n_heads=n_heads, n_inputs=n_inputs, n_exact=n_exact,
                    circuit_fraction=0.2, seed=seed)


def make_fit(sim=None, chains=2, draws=100, inference="nuts", spread=0.05, divergences=0, seed=0,
             r_hat=1.003, ess=850.0, with_delta=False, by_type=False) -> FitResult:
    """A FitResult whose posterior is centred on ``sim``'s truth with SD ``spread``.

    ``by_type``: also ``alpha_type`` ... ``omega_type`` (edge_type, method), the
    method's values times 1, 2, 3, ... for the sorted edge types (as a fit that
    pools the approximation error by edge type writes them).
    """
    import arviz as az

    sim = sim if sim is not None else make_simulation()
    rng = np.random.default_rng(seed)
    truth = sim.truth
    edges = truth["edge"].tolist()
    E, M = len(edges), len(METHODS)
    shape_e, shape_m = (chains, draws, E), (chains, draws, M)
    mu = truth["effect"].to_numpy() + spread * rng.normal(size=shape_e)
    tau = truth["intrinsic_sd"].to_numpy() * np.exp(spread * rng.normal(size=shape_e))
    # In the planted circuit: inclusion near 0.9; elsewhere near 0.1, rising with |mu|.
    logit = np.where(truth["in_circuit"].to_numpy(), 2.2, -2.2) + np.abs(mu) + spread * rng.normal(size=shape_e)
    inclusion = 1 / (1 + np.exp(-logit))
    errs = [sim.config.methods[m] for m in METHODS]
    alpha = np.array([e.bias for e in errs]) + spread * rng.normal(size=shape_m)
    beta = np.array([e.scale for e in errs]) + spread * rng.normal(size=shape_m)
    sigma = np.array([e.noise_sd for e in errs]) * np.exp(spread * rng.normal(size=shape_m))
    omega = np.array([max(e.edge_sd, 1e-3) for e in errs]) * np.exp(spread * rng.normal(size=shape_m))
    posterior = {"mu": mu, "inclusion": inclusion, "tau": tau, "alpha": alpha, "beta": beta, "sigma": sigma,
                 "omega": omega, "slab_sd": 1.0 + spread * rng.normal(size=(chains, draws)),
                 "tau_scale": 0.5 * np.exp(spread * rng.normal(size=(chains, draws)))}
    dims = {"mu": [schema.DIM_EDGE], "inclusion": [schema.DIM_EDGE], "tau": [schema.DIM_EDGE],
            "alpha": [schema.DIM_METHOD], "beta": [schema.DIM_METHOD], "sigma": [schema.DIM_METHOD],
            "omega": [schema.DIM_METHOD]}
    table, _ = edge_table(edges, n_layers=sim.config.n_layers)
    types = sorted(table["edge_type"].unique())
    if by_type:
        factor = np.arange(1, len(types) + 1, dtype=float)[:, None]
        for k, v in [("alpha", alpha), ("beta", beta), ("sigma", sigma), ("omega", omega)]:
            posterior[f"{k}_type"] = v[:, :, None, :] * factor
            dims[f"{k}_type"] = [schema.DIM_EDGE_TYPE, schema.DIM_METHOD]
    if with_delta:
        true_delta = np.stack([truth[f"error_{m}"].to_numpy() for m in METHODS], axis=-1)
        posterior["delta"] = true_delta + spread * 0.1 * rng.normal(size=(chains, draws, E, M))
        dims["delta"] = [schema.DIM_EDGE, schema.DIM_METHOD]
    sample_stats = None
    if inference == "nuts":
        diverging = np.zeros((chains, draws), bool)
        diverging.flat[rng.choice(chains * draws, divergences, replace=False)] = True
        sample_stats = {"diverging": diverging, "energy": rng.normal(size=(chains, draws)).cumsum(axis=1) * 0.1
                        + rng.normal(size=(chains, draws))}
    idata = az.from_dict(posterior=posterior, sample_stats=sample_stats, dims=dims,
                         coords={schema.DIM_EDGE: edges, schema.DIM_METHOD: list(METHODS), schema.DIM_EDGE_TYPE: types})

    mu_flat = mu.reshape(-1, E)
    lo, hi = np.quantile(mu_flat, [0.05, 0.95], axis=0)
    frame = pd.DataFrame({
        "edge": edges, "inclusion_prob": inclusion.reshape(-1, E).mean(0), "effect_mean": mu_flat.mean(0),
        "effect_sd": mu_flat.std(0), "effect_hdi_low": lo, "effect_hdi_high": hi,
        "intrinsic_sd": tau.reshape(-1, E).mean(0), "layer": table["receiver_layer"].astype("int64"),
        "edge_type": table["edge_type"], "n_inputs": sim.config.n_inputs,
    })
    scores = sim.scores
    for m in [schema.EXACT, *METHODS]:
        frame[f"naive_mean:{m}"] = frame["edge"].map(scores[scores.method == m].groupby("edge", observed=True).score.mean())
    for k, m in enumerate(METHODS):
        frame[f"error_bias:{m}"] = (alpha[..., k].mean() + (beta[..., k].mean() - 1) * frame["effect_mean"]
                                    + truth[f"error_{m}"].to_numpy())
        frame[f"error_sd:{m}"] = float(sigma[..., k].mean())

    shares = {m: {"intrinsic": 0.6 - 0.1 * k, "approximation": 0.3 + 0.1 * k, "aggregation": 0.1}
              for k, m in enumerate(METHODS)}
    shares[schema.EXACT] = {"intrinsic": 0.85, "approximation": 0.0, "aggregation": 0.15}
    per_layer = {str(layer): {m: {"intrinsic": s["intrinsic"] - 0.05 * layer, "approximation": s["approximation"],
                                  "aggregation": s["aggregation"] + 0.05 * layer} for m, s in shares.items()}
                 for layer in range(sim.config.n_layers + 1)}
    nuts = inference == "nuts"
    loss = None if nuts else list(2000 * np.exp(-np.arange(100) / 15) + 150 + rng.normal(size=100))
    summary = {
        "inference": inference, "likelihood": "gaussian", "inclusion_rule": "slab", "hdi_prob": 0.9,
        "n_edges": E, "n_inputs": sim.config.n_inputs, "methods": [schema.EXACT, *METHODS],
        "exact_method": schema.EXACT,
        "settings": {"chains": chains, "draws": draws, "seed": seed, "inference": inference},
        "metadata": dict(METADATA),
        "diagnostics": {"max_r_hat": r_hat if nuts else None, "min_ess_bulk": ess if nuts else None,
                        "min_ess_tail": ess * 0.9 if nuts else None, "divergences": divergences if nuts else None,
                        "svi_loss": loss, "svi_final_loss": None if nuts else float(loss[-1]),
                        "warnings": [f"{divergences} divergent transitions"] if divergences else []},
        "decomposition": {"per_method": shares, "per_layer": per_layer},
        "ppc": {"gaussian": {"coverage": 0.9}, "preferred": "gaussian"},
    }
    return FitResult(idata=idata, edges=frame, summary=summary,
                     metadata={"hdi_prob": 0.9, "inclusion_rule": "slab", "scores": dict(METADATA)})
