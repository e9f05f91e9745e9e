"""What a fit writes: the InferenceData, the edges table, the variance decomposition, diagnostics, PPC.

Pure functions over numpy arrays of posterior draws (ArviZ is reached only
through :mod:`bayescirc.posterior`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from . import schema
from ._fit_engine import still_falling, thin
from .posterior import FitResult, make_idata, sampling_diagnostics

__all__ = ["assemble", "chi2_sf_log", "decomposition", "gaussian_ppc", "edges_frame"]

RHAT_MAX = 1.01
ESS_MIN = 400
MAX_TREE_STEPS = 2**10 - 1  # NumPyro's NUTS default max_tree_depth=10
MAX_TREE_SHARE = 0.1  # warn when more NUTS iterations than this hit it
METHOD_SITES = ("alpha", "beta", "sigma", "omega")
PER_METHOD_SITES = METHOD_SITES + ("alpha_rel", "omega_rel")
SITE_DIMS = {**{k: [schema.DIM_METHOD] for k in PER_METHOD_SITES},
             **{f"{k}_type": [schema.DIM_EDGE_TYPE, schema.DIM_METHOD] for k in METHOD_SITES},
             "type_z": [schema.DIM_EDGE_TYPE], "layer_z": ["layer"]}


def _shares(intr: float, appr: float, agg: float) -> dict:
    total = intr + appr + agg
    if not total > 0:
        return {"intrinsic": float("nan"), "approximation": float("nan"), "aggregation": float("nan")}
    return {"intrinsic": intr / total, "approximation": appr / total, "aggregation": agg / total}


def decomposition(method_names, has_exact, observed, intr, appr, agg, layer) -> dict:
    """Shares of a single observed score's variance around the true mean effect, per method and per layer.

    ``observed[m]`` (E,) marks the edges method ``m`` scored; ``intr[m]``,
    ``appr[m]`` (E,) are per-edge intrinsic (beta^2 tau^2) and approximation
    ((alpha + (beta-1) mu + delta)^2 + sigma^2) variances; ``agg`` (E,) the
    posterior variance of mu; ``layer`` (E,) labels.
    """
    out = {"per_method": {}, "per_layer": {}}
    layer = np.asarray(layer)
    for m in method_names:
        sel = observed[m]
        if sel.any():
            out["per_method"][m] = _shares(intr[m][sel].mean(), appr[m][sel].mean(), agg[sel].mean())
    for lab in sorted(set(layer.tolist()), key=lambda s: (not str(s).isdigit(), int(s) if str(s).isdigit() else 0, str(s))):
        block = {}
        for m in method_names:
            sel = observed[m] & (layer == lab)
            if sel.any():
                block[m] = _shares(intr[m][sel].mean(), appr[m][sel].mean(), agg[sel].mean())
        out["per_layer"][str(lab)] = block
    return out


def chi2_sf_log(log_x: np.ndarray, dof: np.ndarray, points: int = 16385) -> np.ndarray:
    """``chi2.sf(exp(log_x[e, :]), dof[e])``, interpolated in ``log x`` on a fine grid per distinct ``dof``.

    The predictive check needs edges x draws survival probabilities (6.5
    million at GPT-2 scale: ~2 s with ``scipy.stats.chi2.sf``); they share a
    handful of degrees of freedom, and ``sf`` is smooth in ``log x``, so a
    table of ``points`` values per ``dof`` gives them to ~1e-5 in a fifth of
    the time (0.4 s). Small blocks are computed directly.
    """
    out = np.empty_like(log_x)
    for d in np.unique(dof):
        rows = dof == d
        lx = log_x[rows]
        lo, hi = float(lx.min()), float(lx.max())
        if lx.size <= points or hi - lo <= 0:
            out[rows] = sps.chi2.sf(np.exp(lx), d)
            continue
        table = sps.chi2.sf(np.exp(np.linspace(lo, hi, points)), d)
        pos = (lx - lo) * ((points - 1) / (hi - lo))  # a uniform grid: the cell is arithmetic, not a search
        i = np.minimum(pos.astype(np.int64), points - 2)
        frac = pos - i
        out[rows] = table[i] * (1 - frac) + table[i + 1] * frac
    return out


def gaussian_ppc(exact_values, exact_mask, tau_draws, min_inputs: int = 8, reps: int = 2000, seed: int = 0,
                 max_draws: int = 200) -> dict:
    """Posterior predictive check of Gaussian intrinsic variation on the exact scores.

    Per edge with at least ``min_inputs`` exact scores: the sample excess
    kurtosis (its Gaussian predictive does not depend on mu or tau) and the
    sample variance (predictive ``tau^2 chi2_{n-1}/(n-1)`` over the posterior
    draws of tau; at most ``max_draws`` evenly spaced ones, which put the
    p-values within ~0.035 of their all-draw values and cost 4 s fewer at GPT-2
    scale). Heavy tails show as far more than 5% of edges with an upper-tail
    kurtosis p-value below 0.05.
    """
    tau_draws = np.asarray(tau_draws)
    if len(tau_draws) > max_draws:
        tau_draws = tau_draws[np.linspace(0, len(tau_draws) - 1, max_draws).round().astype(int)]
    counts = exact_mask.sum(1)
    ok = counts >= min_inputs
    if not ok.any():
        return {"edges_checked": 0, "note": f"fewer than {min_inputs} exact inputs per edge: nothing to check"}
    E = len(counts)
    n = np.maximum(counts, 1)
    mean = np.where(exact_mask, exact_values, 0.0).sum(1) / n
    c2 = np.where(exact_mask, exact_values - mean[:, None], 0.0) ** 2
    m2 = c2.sum(1) / n
    live = ok & (m2 > 0)
    kurt_obs = np.full(E, np.nan)
    kurt_obs[live] = (c2[live] ** 2).sum(1) / n[live] / m2[live] ** 2 - 3
    # the Gaussian reference distribution of the kurtosis depends only on n: one per distinct count
    rng = np.random.default_rng(seed)
    ref = {}
    for k in dict.fromkeys(int(k) for k in counts[live]):
        z = rng.normal(size=(reps, k))
        zc = z - z.mean(1, keepdims=True)
        ref[k] = np.sort(np.mean(zc**4, 1) / np.mean(zc**2, 1) ** 2 - 3)
    p_kurt = np.full(E, np.nan)
    p_var = np.full(E, np.nan)
    idx = np.flatnonzero(live)
    for k, r in ref.items():
        sel = idx[counts[idx] == k]
        p_kurt[sel] = 1 - np.searchsorted(r, kurt_obs[sel]) / reps
    s2 = c2.sum(1) / np.maximum(counts - 1, 1)
    for s in range(0, len(idx), 1024):  # (edges x draws) blocks bound the memory
        sel = idx[s : s + 1024]
        t2 = np.asarray(tau_draws[:, sel], float).T ** 2
        dof = counts[sel] - 1
        log_x = np.log(dof * s2[sel])[:, None] - np.log(np.maximum(t2, 1e-300))
        p_var[sel] = chi2_sf_log(log_x, dof).mean(1)
    checked = np.isfinite(p_kurt)
    k = int(checked.sum())
    if k == 0:
        return {"edges_checked": 0, "note": "exact scores are constant: nothing to check"}
    share = float(np.mean(p_kurt[checked] < 0.05))
    crit = float(sps.binom.ppf(0.999, k, 0.05) / k)
    return {
        "edges_checked": k,
        "mean_excess_kurtosis": float(np.nanmean(kurt_obs)),
        "expected_excess_kurtosis": float(np.mean([np.mean(r) for r in ref.values()])),
        "share_kurtosis_p_below_0.05": share,
        "expected_share": 0.05,
        "critical_share": crit,
        "share_variance_outside_90": float(np.mean((p_var[checked] < 0.05) | (p_var[checked] > 0.95))),
        "heavy_tailed": share > crit,
    }


def edges_frame(stats, table, approx, has_exact, per_edge, samples, hdi_prob, layers_label) -> pd.DataFrame:
    """One row per edge: the contract columns, groups, and per-method errors and naive means."""
    from .fitting import hdi

    mu = per_edge["mu"].reshape(-1, per_edge["mu"].shape[-1])
    low, high = hdi(mu, hdi_prob)
    frame = pd.DataFrame({
        "edge": stats.edges.astype(str),
        "inclusion_prob": per_edge["inclusion"].reshape(mu.shape).mean(0).astype(float),
        "effect_mean": mu.mean(0).astype(float),
        "effect_sd": mu.std(0).astype(float),
        "effect_hdi_low": low.astype(float),
        "effect_hdi_high": high.astype(float),
        "intrinsic_sd": per_edge["tau"].reshape(mu.shape).mean(0).astype(float),
        **_slab_columns(per_edge["mu_slab"].reshape(mu.shape), hdi_prob),
        "layer": layers_label,
        "edge_type": table["edge_type"].astype(str).to_numpy(),
        "n_inputs": stats.n.sum(1).astype(np.int64),
    })
    per = stats.per_method()
    for j, m in enumerate(approx):
        observed = _observed(stats, m)
        frame[f"error_bias:{m}"] = np.where(observed, per_edge["err"][:, j], np.nan)
        frame[f"error_sd:{m}"] = np.where(observed, per_edge["err_sd"][:, j], np.nan)
    for m in ([schema.EXACT] if has_exact else []) + list(approx):
        label = next(x for x in stats.methods if x == m or (m == schema.EXACT and schema.is_exact(x)))
        rows = per[per.method == label].set_index("edge")["mean"]
        frame[f"naive_mean:{m}"] = rows.reindex(frame["edge"]).to_numpy(float)
    return frame


def _slab_columns(mu_slab: np.ndarray, hdi_prob: float) -> dict:
    """How large the edge's mean effect is if the edge is in the circuit: ``slab_effect_mean``, ``slab_hdi_*``.

    The contract's ``effect_*`` columns summarise the posterior of mu, which puts
    mass ``1 - inclusion_prob`` exactly at 0 (the point-mass spike): an edge
    with low inclusion gets the interval [0, 0]. No edge of a real model has a
    mean of exactly 0, so these columns answer the other question, "and if it
    matters, how much?", for every edge.
    """
    from .fitting import hdi

    low, high = hdi(mu_slab, hdi_prob)
    return {"slab_effect_mean": mu_slab.mean(0).astype(float), "slab_hdi_low": low.astype(float),
            "slab_hdi_high": high.astype(float)}


def _observed(stats, method) -> np.ndarray:
    k = stats.methods.index(method)
    sel = np.asarray(stats.patterns, bool)[:, k]
    return stats.n[:, sel].sum(1) > 0


def assemble(*, stats, table, approx, has_exact, problem, result, per_edge, hdi_prob, inclusion, threshold,
             threshold_origin, likelihood, inference, notes, settings, exact_values, exact_mask, layers) -> FitResult:
    edges = stats.edges.astype(str)
    E = len(edges)
    layer_label = np.array([layers[i] for i in problem.layer_idx], dtype=object)
    types = sorted(table["edge_type"].unique())
    posterior = {k: v for k, v in result.samples.items()}
    dims = {k: d for k, d in SITE_DIMS.items() if k in posterior}
    for k in ("mu", "tau", "inclusion"):
        posterior[k] = per_edge[k]
        dims[k] = [schema.DIM_EDGE]
    if per_edge["delta"] is not None:
        posterior["delta"] = per_edge["delta"]
        dims["delta"] = [schema.DIM_EDGE, schema.DIM_METHOD]
    if likelihood == "student-t":
        posterior["df"] = per_edge["df"]
    coords = {schema.DIM_EDGE: list(edges), schema.DIM_EDGE_TYPE: types, "layer": list(layers)}
    if approx:
        coords[schema.DIM_METHOD] = list(approx)
    idata = make_idata(posterior, coords=coords, dims=dims, sample_stats=result.sample_stats or None,
                       attrs={"inference": inference, "likelihood": likelihood, "inclusion_rule": inclusion})
    frame = edges_frame(stats, table, approx, has_exact, per_edge, result.samples, hdi_prob, layer_label)

    # variance decomposition
    mu = per_edge["mu"].reshape(-1, E)
    agg = mu.var(0)
    tau2 = (per_edge["tau"].reshape(-1, E).astype(float) ** 2).mean(0)
    observed, intr, appr = {}, {}, {}
    names = []
    if has_exact:
        names.append(schema.EXACT)
        observed[schema.EXACT] = np.asarray(problem.data.n_x) > 0
        intr[schema.EXACT] = tau2
        appr[schema.EXACT] = np.zeros(E)
    for j, m in enumerate(approx):
        names.append(m)
        observed[m] = _observed(stats, m)
        intr[m] = per_edge["intr"][:, j]
        appr[m] = per_edge["err2"][:, j] + per_edge["sig2"][:, j]
    decomp = decomposition(names, has_exact, observed, intr, appr, agg, layer_label)

    # diagnostics
    warn = list(notes)
    diag = {"max_r_hat": None, "min_ess_bulk": None, "min_ess_tail": None, "divergences": None, "svi_loss": None,
            "svi_final_loss": None, "svi_steps_run": None}
    sampled = [k for k in result.samples]
    if inference == "nuts":
        d = sampling_diagnostics(idata, sampled + ["mu"])
        diag.update({k: d[k] for k in ("max_r_hat", "min_ess_bulk", "min_ess_tail")})
        diag["divergences"] = int(np.sum(result.sample_stats["diverging"]))
        steps = np.asarray(result.sample_stats.get("n_steps", ())).reshape(-1)
        diag["max_tree_depth_share"] = float(np.mean(steps >= MAX_TREE_STEPS)) if steps.size else None
        if steps.size and diag["max_tree_depth_share"] > MAX_TREE_SHARE:
            warn.append(f"{diag['max_tree_depth_share']:.0%} of NUTS iterations hit the maximum tree depth "
                        f"({MAX_TREE_STEPS} leapfrog steps): the sampler barely moves (a posterior that varies in scale "
                        "from place to place, e.g. one or two inputs), so r_hat and ESS can look "
                        "fine while a chain is stuck. Check the trace plot, or fit with --inference svi.")
        chains, draws = idata.posterior.sizes.get("chain", 1), idata.posterior.sizes.get("draw", 1)
        if draws < 4:
            warn.append(f"{draws} draws per chain: too few for r_hat or ESS; run --draws 400 or more.")
        elif diag["max_r_hat"] is None:
            warn.append(f"{chains} chain: r_hat cannot be computed; run --chains 2 or more to check convergence.")
        elif diag["max_r_hat"] > RHAT_MAX:
            warn.append(f"max r_hat = {diag['max_r_hat']:.3f} > {RHAT_MAX} (worst: {d['worst'].get('r_hat')}): the chains "
                        "disagree; run more --warmup/--draws before trusting the posterior.")
        if diag["min_ess_bulk"] is not None and min(diag["min_ess_bulk"], diag["min_ess_tail"]) < ESS_MIN:
            warn.append(f"min ESS bulk/tail = {diag['min_ess_bulk']:.0f}/{diag['min_ess_tail']:.0f} < {ESS_MIN}: "
                        "intervals are imprecise; run more --draws or --chains.")
        if diag["divergences"]:
            warn.append(f"{diag['divergences']} divergent transitions: the posterior may be biased; "
                        "rerun with a longer --warmup.")
    else:
        losses = result.svi_loss
        diag["svi_loss"] = thin(losses)
        tail = max(1, len(losses) // 20)
        diag["svi_final_loss"] = float(np.mean(losses[-tail:]))
        diag["svi_steps_run"] = len(losses)
        if len(losses) >= 40 and still_falling(losses, len(losses) // 10):
            warn.append("the SVI loss was still falling at the end: increase svi_steps or use --inference nuts.")
    diag["warnings"] = warn

    # posterior predictive check
    ppc = {}
    tau_draws = per_edge["tau"].reshape(-1, E)
    g = gaussian_ppc(exact_values, exact_mask, tau_draws)
    ppc["gaussian"] = g
    if g.get("edges_checked", 0):
        ppc["preferred"] = "student-t" if g["heavy_tailed"] else "gaussian"
        ppc["reason"] = (f"{g['share_kurtosis_p_below_0.05']:.1%} of {g['edges_checked']} edges have more extreme exact-score "
                         f"kurtosis than a Gaussian predicts 95% of the time (expected 5%, critical {g['critical_share']:.1%})")
    else:  # nothing checked: no preference, and no advice to refit
        ppc["preferred"] = None
        ppc["reason"] = g.get("note", "")
    if likelihood == "student-t":
        values, counts = np.unique(per_edge["df"].reshape(-1), return_counts=True)
        ppc["student-t"] = {"df_posterior": {str(v): float(c / counts.sum()) for v, c in zip(values, counts)}}
    if ppc["preferred"] is not None and ppc["preferred"] != likelihood:
        warn.append(f"the posterior predictive check prefers likelihood={ppc['preferred']!r} ({ppc['reason']}); "
                    f"refit with --likelihood {ppc['preferred']}.")

    metadata = {"hdi_prob": hdi_prob, "inclusion_rule": inclusion, "threshold": threshold,
                "threshold_origin": threshold_origin, "likelihood": likelihood, "inference": inference,
                "scores_metadata": stats.metadata, "methods": list(approx), "exact_method": schema.EXACT if has_exact else None}
    summary = {
        "inference": inference, "likelihood": likelihood, "inclusion_rule": inclusion, "hdi_prob": hdi_prob,
        "threshold": threshold, "threshold_origin": threshold_origin,
        "n_edges": E, "n_inputs": int(len(stats.input_ids)), "input_ids": [int(i) for i in stats.input_ids],
        "methods": list(approx),
        "exact_method": schema.EXACT if has_exact else None, "settings": settings, "metadata": stats.metadata,
        "diagnostics": diag, "decomposition": decomp, "ppc": ppc,
        "globals": _global_summary(result.samples, approx, types),
    }
    return FitResult(idata=idata, edges=frame, summary=summary, metadata=metadata)


def _global_summary(samples: dict, approx, types) -> dict:
    out = {}
    for k, v in samples.items():
        flat = v.reshape(-1, *v.shape[2:])
        if k in PER_METHOD_SITES:
            out[k] = {m: {"mean": float(flat[:, j].mean()), "sd": float(flat[:, j].std())} for j, m in enumerate(approx)}
        elif k.endswith("_type") and k[:-5] in METHOD_SITES:
            out[k] = {m: {t: {"mean": float(flat[:, i, j].mean()), "sd": float(flat[:, i, j].std())}
                          for i, t in enumerate(types)} for j, m in enumerate(approx)}
        elif flat.ndim == 1:
            out[k] = {"mean": float(flat.mean()), "sd": float(flat.std())}
    return out
