"""fit(): the posterior recovers simulated truth, handles every data layout, writes the output contract."""

import json
import os
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scipy.stats import rankdata

from bayescirc import schema
from bayescirc.cli import cli
from bayescirc.errors import BayescircError, FitError, ScoresError
from bayescirc.fitting import FitWarning, fit, hdi, parse_threshold
from bayescirc.posterior import load_fit
from bayescirc.simulation import MethodError, simulate, write_simulation

FAST = dict(inference="svi", chains=1, draws=200, svi_steps=400, progress=False)


def auc(score, label):
    r = rankdata(score)
    n1 = label.sum()
    n0 = len(label) - n1
    return (r[label].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def fit_warnings(scores, **kw):
    """Fit, returning the result and the FitWarning messages it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FitWarning)
        res = fit(scores, **kw)
    return res, [str(w.message) for w in caught if issubclass(w.category, FitWarning)]


def quiet_fit(scores, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        return fit(scores, **kw)


@pytest.fixture(scope="module")
def tiny():
    return simulate(n_layers=1, n_heads=2, n_inputs=60, seed=3)


@pytest.fixture(scope="module")
def tiny_fit(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "fit"
    return quiet_fit(tiny.scores, out=out, **FAST), out


# --- small pure pieces -------------------------------------------------------------------------


def test_the_map_subset_holds_every_group_however_rare():
    from bayescirc._fit_engine import map_subset

    rng = np.random.default_rng(0)
    types = np.r_[np.zeros(5000, int), [1], np.full(3, 2)]  # one common type, two rare ones
    layers = np.arange(len(types)) % 7
    sub = map_subset(len(types), 100, (types, layers), rng, per_group=4)
    assert len(sub) >= 100 and np.all(np.diff(sub) > 0)
    assert set(types[sub]) == {0, 1, 2} and (types[sub] == 2).sum() == 3  # all of a small group
    assert np.bincount(layers[sub]).min() >= 4
    assert np.array_equal(map_subset(50, 100, (types[:50],), rng), np.arange(50))


def test_edges_pool_by_type_and_receiver_layer_with_the_logits_as_a_layer_after_the_last_block():
    from bayescirc.fitting import _groups
    from bayescirc.graph import Graph

    edges = np.array([*Graph(2, 1).edges, "not an edge"])
    table, type_idx, layer_idx, types, layers = _groups(edges)
    assert layers == ["0", "1", "2", "other"]
    level = dict(zip(edges, np.array(layers)[layer_idx]))
    assert level["m1->logits"] == "2" and level["input->a0.h0<q>"] == "0" and level["a0.h0->m1"] == "1"
    assert level["not an edge"] == "other"
    assert np.array(types)[type_idx].tolist() == table["edge_type"].tolist()
    assert list(table["edge"]) == list(edges)


def test_hdi_of_a_normal_sample_is_its_central_interval(rng):
    x = rng.normal(size=(20000, 2)) * [1.0, 3.0]
    low, high = hdi(x, 0.9)
    np.testing.assert_allclose(low, [-1.645, -4.935], rtol=0.05)
    np.testing.assert_allclose(high, [1.645, 4.935], rtol=0.05)


def test_hdi_of_a_skewed_sample_is_narrower_than_its_central_interval(rng):
    x = rng.exponential(size=(20000, 1))
    low, high = hdi(x, 0.9)
    assert low[0] < 0.01 and high[0] - low[0] < np.quantile(x, 0.95) - np.quantile(x, 0.05)


@pytest.mark.parametrize("value,expected", [(0.2, (0.2, None)), ("0.2", (0.2, None)), ("5%", (None, 0.05)),
                                            (None, (None, None))])
def test_threshold_is_metric_units_or_a_percentage(value, expected):
    assert parse_threshold(value) == expected


@pytest.mark.parametrize("value", ["-1", "abc", "0%"])
def test_a_bad_threshold_is_refused(value):
    with pytest.raises(FitError):
        parse_threshold(value)


# --- output contract ------------------------------------------------------------------------------


def test_edges_table_has_the_contract_columns(tiny_fit, tiny):
    res, out = tiny_fit
    cols = set(res.edges.columns)
    assert set(schema.EDGE_TABLE_COLUMNS) <= cols
    for m in ("eap", "eap-ig-inputs"):
        assert {f"error_bias:{m}", f"error_sd:{m}", f"naive_mean:{m}"} <= cols
    assert {"layer", "edge_type", "n_inputs", "naive_mean:exact"} <= cols
    assert sorted(res.edges["edge"]) == sorted(tiny.truth["edge"])
    assert res.edges[list(schema.EDGE_TABLE_COLUMNS[1:])].notna().all().all()
    assert (res.edges["effect_hdi_low"] <= res.edges["effect_hdi_high"]).all()
    assert res.edges["inclusion_prob"].between(0, 1).all()
    assert (res.edges["n_inputs"] == 60).all()
    meta = json.loads(pq.read_schema(out / schema.FIT_EDGES_FILE).metadata[schema.METADATA_KEY])
    assert meta["hdi_prob"] == 0.9 and meta["inclusion_rule"] == "slab"


def test_slab_columns_say_how_large_an_effect_would_be_if_the_edge_mattered(tiny_fit):
    e = tiny_fit[0].edges
    assert (e["slab_hdi_low"] <= e["slab_effect_mean"]).all() and (e["slab_effect_mean"] <= e["slab_hdi_high"]).all()
    sure = e[e["inclusion_prob"] > 0.99]
    assert len(sure)  # in the circuit: the slab posterior is the posterior
    assert ((sure["slab_effect_mean"] - sure["effect_mean"]).abs() < 0.5 * sure["effect_sd"]).all()
    unlikely = e[e["inclusion_prob"] < 0.1]
    assert len(unlikely)  # out of it: mu's interval is [0, 0], the slab's is not
    assert (unlikely["effect_hdi_low"] == 0).all() and (unlikely["effect_hdi_high"] == 0).all()
    assert (unlikely["slab_hdi_high"] > unlikely["slab_hdi_low"]).all()


def test_posterior_loads_with_arviz_and_has_the_contract_variables(tiny_fit):
    import arviz as az

    _, out = tiny_fit
    idata = az.from_netcdf(str(out / schema.FIT_POSTERIOR_FILE))
    post = idata.posterior
    for var in ("mu", "inclusion", "tau"):
        assert post[var].dims == ("chain", "draw", "edge")
    for var in ("alpha", "beta", "sigma", "omega"):
        assert post[var].dims == ("chain", "draw", "method")
    assert list(post["method"].values) == ["eap", "eap-ig-inputs"]
    assert post["delta"].dims == ("chain", "draw", "edge", "method")
    loaded = load_fit(out)
    np.testing.assert_allclose(loaded.draws("mu").mean(0), loaded.edges["effect_mean"], rtol=1e-5, atol=1e-6)


def test_summary_json_has_the_documented_keys(tiny_fit):
    _, out = tiny_fit
    s = json.loads((out / schema.FIT_SUMMARY_FILE).read_text())
    assert {"inference", "likelihood", "inclusion_rule", "hdi_prob", "n_edges", "n_inputs", "methods", "exact_method",
            "settings", "metadata", "diagnostics", "decomposition", "ppc"} <= set(s)
    assert s["inference"] == "svi" and s["exact_method"] == "exact" and s["n_inputs"] == 60
    assert s["settings"]["approx_only"] == "mean"  # the default "auto" with the Gaussian likelihood
    d = s["diagnostics"]
    assert {"max_r_hat", "min_ess_bulk", "min_ess_tail", "divergences", "svi_loss", "svi_final_loss", "warnings"} <= set(d)
    assert len(d["svi_loss"]) <= 200 and np.isfinite(d["svi_final_loss"])
    for shares in [*s["decomposition"]["per_method"].values(),
                   *(v for layer in s["decomposition"]["per_layer"].values() for v in layer.values())]:
        assert sum(shares.values()) == pytest.approx(1.0)
    assert s["decomposition"]["per_method"]["exact"]["approximation"] == 0.0
    assert s["ppc"]["preferred"] in ("gaussian", "student-t")


# --- the data layouts fit must handle ---------------------------------------------------------------


def test_exact_scores_only(tiny):
    sim = simulate(n_layers=1, n_heads=2, n_inputs=40, n_exact=40, methods={}, seed=4)
    res = quiet_fit(sim.scores, **FAST)
    assert res.summary["methods"] == [] and res.summary["exact_method"] == "exact"
    assert res.edges["effect_mean"].notna().all()
    assert "alpha" not in res.idata.posterior
    # with exact scores on all inputs the mean effect is close to the exact sample mean
    np.testing.assert_allclose(res.edges["effect_mean"], res.edges["naive_mean:exact"], atol=0.35)


def test_svi_subsamples_edges_on_large_graphs(tiny, monkeypatch):
    """Above SVI_EDGE_BATCH edges SVI sees a random edge minibatch per step (GPT-2 scale); shrink it to run here."""
    from bayescirc import _fit_engine

    full = quiet_fit(tiny.scores, **FAST)
    monkeypatch.setattr(_fit_engine, "SVI_EDGE_BATCH", 5)
    res = quiet_fit(tiny.scores, **FAST)
    assert np.isfinite(res.edges[["effect_mean", "inclusion_prob", "effect_sd"]].to_numpy()).all()
    assert np.isfinite(res.summary["diagnostics"]["svi_final_loss"])
    assert np.corrcoef(res.edges["effect_mean"], full.edges["effect_mean"])[0, 1] > 0.95


def test_large_svi_fits_share_each_draw_of_the_globals_among_several_per_edge_draws(tiny, monkeypatch):
    """Above NUTS_MAX_EDGES each SVI draw of the globals serves several per-edge draws; shrink the limit to run here."""
    from bayescirc import fitting

    one_each = quiet_fit(tiny.scores, **FAST)
    monkeypatch.setattr(fitting, "NUTS_MAX_EDGES", 5)
    shared = quiet_fit(tiny.scores, **FAST)
    R = fitting.SVI_EDGE_DRAWS_PER_GLOBAL
    beta = shared.idata.posterior["beta"].values[0]  # (draws, ...): each distinct draw R times in a row
    assert beta.shape[0] == 200 and len(np.unique(beta[:, 0])) == 200 // R
    np.testing.assert_array_equal(beta[:R], np.repeat(beta[:1], R, axis=0))
    assert len(np.unique(shared.idata.posterior["mu"].values[0, :R, 0])) > 1  # the per-edge draws differ
    # the same posterior: per-edge summaries agree within Monte-Carlo error
    np.testing.assert_allclose(shared.edges["inclusion_prob"], one_each.edges["inclusion_prob"], atol=0.1)
    scale = one_each.edges["effect_sd"].to_numpy() + 1e-3
    assert np.max(np.abs(shared.edges["effect_mean"] - one_each.edges["effect_mean"]) / scale) < 0.5


def test_approximate_scores_only_warns_loudly_that_errors_rest_on_priors():
    sim = simulate(n_layers=1, n_heads=2, n_inputs=40, n_exact=0, seed=5)
    res, messages = fit_warnings(sim.scores, **FAST)
    assert any(m.startswith("NO EXACT SCORES") for m in messages)
    assert res.summary["exact_method"] is None
    assert any("NO EXACT SCORES" in w for w in res.summary["diagnostics"]["warnings"])
    assert res.edges["effect_mean"].notna().all() and "naive_mean:exact" not in res.edges


@pytest.mark.slow
def test_several_methods_and_edges_scored_by_only_some_methods():
    methods = {"eap": MethodError(scale=0.8, noise_sd=0.2), "ig": MethodError(scale=0.95, noise_sd=0.1),
               "cc": MethodError(bias=0.1, noise_sd=0.3)}
    sim = simulate(n_layers=1, n_heads=2, n_inputs=40, n_exact=10, methods=methods, seed=6)
    edges = sorted(sim.truth["edge"])
    scores = sim.scores
    drop = (scores["method"] == "cc") & scores["edge"].isin(edges[:5])
    scores = scores[~drop].reset_index(drop=True)
    scores["method"] = scores["method"].cat.remove_unused_categories()
    res = quiet_fit(scores, **FAST)
    assert res.summary["methods"] == ["cc", "eap", "ig"]
    rows = res.edges.set_index("edge")
    assert rows.loc[edges[:5], "error_bias:cc"].isna().all()
    assert rows.loc[edges[5:], "error_bias:cc"].notna().all()
    assert rows["effect_mean"].notna().all()


def test_a_method_with_all_zero_scores_is_dropped_with_a_message(tiny):
    scores = tiny.scores.copy()
    scores.loc[scores["method"] == "eap", "score"] = 0.0
    res, messages = fit_warnings(scores, **FAST)
    assert any("'eap' scored every edge and input as exactly 0" in m for m in messages)
    assert res.summary["methods"] == ["eap-ig-inputs"]


def test_an_edge_scored_at_rounding_noise_fits(tiny):
    """An edge whose exact scores are all 0 and whose approximate scores are float32 noise around 0 (a saturated
    head's query edges on a small collect) takes its approximate-only inputs one by one: their sample covariance
    (~1e-20) would claim a precision no score has (the fit diverged at its first step)."""
    scores = tiny.scores.copy()
    edge = scores["edge"] == "input->a0.h1<q>"
    scores.loc[edge & (scores["method"] == "exact"), "score"] = 0.0
    approx = edge & (scores["method"] != "exact")
    scores.loc[approx, "score"] = np.random.default_rng(0).normal(0.0, 1e-10, approx.sum())
    res = quiet_fit(scores, **FAST)
    assert np.isfinite(res.edges[list(schema.EDGE_TABLE_COLUMNS[1:])].to_numpy()).all()
    row = res.edges.set_index(schema.EDGE).loc["input->a0.h1<q>"]
    assert abs(row["effect_mean"]) < 0.05 and row["inclusion_prob"] < 0.5


def test_one_input_fits_with_a_warning():
    sim = simulate(n_layers=1, n_heads=2, n_inputs=1, n_exact=1, seed=7)
    res, messages = fit_warnings(sim.scores, **FAST)
    assert any("only 1 input" in m for m in messages)
    assert np.isfinite(res.edges[list(schema.EDGE_TABLE_COLUMNS[1:])].to_numpy()).all()


def test_copies_of_one_input_fit_with_a_warning(tiny):
    scores = tiny.scores.copy()
    first = scores[scores["input_id"] == scores["input_id"].min()].set_index(["edge", "method"])["score"]
    scores["score"] = first.reindex(pd.MultiIndex.from_frame(scores[["edge", "method"]])).to_numpy()
    res, messages = fit_warnings(scores, **FAST)
    assert any("look like copies of one prompt" in m for m in messages)
    assert np.isfinite(res.edges[list(schema.EDGE_TABLE_COLUMNS[1:])].to_numpy()).all()
    _, messages = fit_warnings(tiny.scores, **FAST)
    assert not any("copies" in m for m in messages)


def test_threshold_inclusion_is_a_probability_of_exceeding_the_threshold(tiny):
    res = quiet_fit(tiny.scores, inclusion="threshold", threshold=0.3, **FAST)
    mu = res.draws("mu")
    freq = (np.abs(mu) > 0.3).mean(0)
    np.testing.assert_allclose(res.edges["inclusion_prob"], freq, atol=0.12)
    assert res.summary["inclusion_rule"] == "threshold" and res.summary["threshold"] == 0.3


# --- bad input -------------------------------------------------------------------------------------------


def test_all_zero_scores_are_refused(tiny):
    scores = tiny.scores.copy()
    scores["score"] = 0.0
    with pytest.raises(FitError, match="exactly 0"):
        fit(scores, **FAST)


def test_a_file_without_the_score_column_is_refused(tmp_path, tiny):
    tiny.scores.rename(columns={"score": "value"}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ScoresError, match="missing column 'score'"):
        fit(tmp_path / "bad.parquet", **FAST)


@pytest.mark.parametrize("kw,match", [({"inference": "mcmc"}, "inference"), ({"likelihood": "cauchy"}, "likelihood"),
                                      ({"hdi_prob": 1.5}, "hdi_prob"), ({"inclusion": "threshold"}, "needs a threshold"),
                                      ({"chains": 0}, "chains"), ({"chains": 1, "draws": 1}, "single posterior draw")])
def test_bad_options_are_refused_before_any_work(tiny, kw, match):
    with pytest.raises(FitError, match=match):
        fit(tiny.scores, **{**FAST, **kw})


def test_too_few_exact_inputs_for_the_predictive_check_give_no_likelihood_advice(capsys):
    """Below 8 exact inputs per edge the check does not run: no preferred likelihood, no 'refit with' warning
    (a Student-t fit was told to refit with a Gaussian on no evidence)."""
    from bayescirc.cli.fit import _print_summary

    sim = simulate(n_layers=1, n_heads=2, n_inputs=20, n_exact=5, seed=5)
    res, messages = fit_warnings(sim.scores, likelihood="student-t", **FAST)
    assert res.summary["ppc"]["preferred"] is None and "nothing to check" in res.summary["ppc"]["reason"]
    assert not any("predictive check prefers" in m for m in messages)
    _print_summary(res, top=3)
    printed = capsys.readouterr().out
    assert "Posterior predictive check: fewer than 8 exact inputs" in printed and "prefers the" not in printed


def test_nuts_stuck_at_the_maximum_tree_depth_is_a_warning(tiny, monkeypatch):
    """A chain whose every iteration runs the full 1,023 leapfrog steps barely moves while its ESS can look fine
    (seen on a 2-input collect): the share of such iterations is recorded and warned about. Here the bound is
    lowered to 1 step so that every iteration counts."""
    import bayescirc.fit_outputs as fit_outputs

    monkeypatch.setattr(fit_outputs, "MAX_TREE_STEPS", 1)
    res, messages = fit_warnings(tiny.scores, inference="nuts", chains=1, draws=20, warmup=20, progress=False)
    assert res.summary["diagnostics"]["max_tree_depth_share"] == 1.0
    assert any("100% of NUTS iterations hit the maximum tree depth" in m for m in messages)


def test_nuts_strides_over_a_global_the_data_pin_far_below_unit_scale():
    """Warm-up's mass matrix is shrunk towards 1e-3 (as in Stan), so it cannot describe a coordinate whose
    posterior SD is 1e-5 (a method bias on a small induction collect: 2e-4), and plain NUTS then crawls at a
    tiny step size. bayescirc's NUTS samples such a global in units of its curvature at the MAP."""
    import jax
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS, init_to_value

    from bayescirc import _fit_engine as engine

    def prior():
        numpyro.sample("b", dist.Normal(0.0, 1.0))
        return numpyro.sample("a", dist.Normal(0.0, 1.0))

    def model():
        numpyro.sample("y", dist.Normal(prior(), 1e-5), obs=0.3)

    start = {"a": 0.3, "b": 0.0}
    scale = engine.unit_scale(model, prior, (), start)[1]  # coordinates a, b: a's conditional SD is 1/sqrt(1e10 + 1)
    np.testing.assert_allclose(np.asarray(scale), [1e-5, 1.0], rtol=0.02)  # float32 when run alone
    samples, stats, rescaled = engine.nuts(model, prior, (), start, key=jax.random.PRNGKey(0), chains=1, draws=400,
                                           warmup=400, dense=False)
    assert rescaled == 1  # `a` only
    assert stats["n_steps"].mean() < 15
    a, b = samples["a"].ravel(), samples["b"].ravel()
    assert abs(a.mean() - 0.3) < 3e-6 and 0.8e-5 < a.std() < 1.2e-5  # the posterior: N(0.3, 1e-5) to 1e-10
    assert abs(b.mean()) < 0.3 and 0.8 < b.std() < 1.2  # the prior
    plain = MCMC(NUTS(model, init_strategy=init_to_value(values=start)), num_warmup=300, num_samples=100,
                 progress_bar=False)  # the same model in NumPyro's own coordinates: ~570 steps per iteration
    plain.run(jax.random.PRNGKey(0), extra_fields=("num_steps",))
    assert plain.get_extra_fields()["num_steps"].mean() > 100


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts Linux memory maps")
def test_nuts_fits_in_one_process_do_not_pile_up_memory_maps(tiny, monkeypatch):
    """Each NUTS fit left ~1,200 memory maps of compiled programs behind; at Linux's 65,530 per process the
    ~55th fit of a bootstrap crashed. A fit releases them once the process holds a share of the limit (here
    any: the share is set to 0, so every fit must release)."""
    from bayescirc import _fit_engine as engine

    monkeypatch.setattr(engine, "MAPS_SHARE", 0.0)

    def maps():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    counts = []
    for seed in range(2):
        fit_warnings(tiny.scores, inference="nuts", chains=1, draws=20, warmup=20, seed=seed, progress=False)
        counts.append(maps())
    assert counts[1] - counts[0] < 200, counts


def test_student_t_needs_exact_scores():
    sim = simulate(n_layers=1, n_heads=2, n_inputs=20, n_exact=0, seed=5)
    with pytest.raises(FitError, match="needs exact scores"):
        quiet_fit(sim.scores, likelihood="student-t", **FAST)


# --- approximation error by edge type -------------------------------------------------------------------------

Q_EDGES, LOGIT_EDGES = "input->attn<q>", "attn->logits"
TYPED_EAP = MethodError(scale=0.8, noise_sd=0.2, by_edge_type={Q_EDGES: {"scale": 0.1, "noise_sd": 0.02},
                                                                LOGIT_EDGES: {"scale": 1.5, "noise_sd": 0.6}})


def test_approximation_error_is_learnt_per_edge_type():
    """A method whose scale and noise differ by edge type: each type's posterior finds its own, not the average."""
    sim = simulate(n_layers=1, n_heads=2, n_inputs=120, n_exact=30, methods={"eap": TYPED_EAP}, decoy_fraction=0.0,
                   seed=3)
    res = quiet_fit(sim.scores, inference="nuts", chains=1, draws=300, progress=False)
    assert res.summary["settings"]["nuts_mass_matrix"] == "diagonal"  # ~60 globals: see NUTS_DENSE_MASS_MAX_GLOBALS
    post = res.idata.posterior
    for edge_type, scale, noise in [(Q_EDGES, 0.1, 0.02), (LOGIT_EDGES, 1.5, 0.6), ("attn->mlp", 0.8, 0.2)]:
        cell = {"edge_type": edge_type, "method": "eap"}  # a dict: .sel's own keyword is `method`
        beta = post["beta_type"].sel(cell).values.ravel()
        sigma = post["sigma_type"].sel(cell).values.ravel()
        assert np.quantile(beta, 0.01) < scale < np.quantile(beta, 0.99), (edge_type, beta.mean())
        assert np.quantile(sigma, 0.01) < noise < np.quantile(sigma, 0.99), (edge_type, sigma.mean())
    assert res.summary["globals"]["beta_type"]["eap"][Q_EDGES]["mean"] < 0.3
    pooled = quiet_fit(sim.scores, error_pooling="method", **FAST)
    assert "beta_type" not in pooled.idata.posterior and pooled.summary["settings"]["error_pooling"] == "method"


def test_an_edge_whose_approximation_scale_differs_from_its_types_keeps_its_intrinsic_sd_with_approx_only_mean():
    """One edge's EAP scores x3 (its own scale 2.4 where its type's is 0.8): the full likelihood explains their
    scatter with a larger tau (~2x); through their mean only, tau stays at the edge's exact-score SD."""
    sim = simulate(n_layers=1, n_heads=2, n_inputs=200, n_exact=40, methods={"eap": MethodError(scale=0.8, noise_sd=0.2)},
                   decoy_fraction=0.0, seed=11)
    scores, edge = sim.scores.copy(), "a0.h1->m0"
    steep = (scores["edge"] == edge) & (scores["method"] == "eap")
    scores.loc[steep, "score"] *= 3
    true_sd = sim.truth.set_index("edge").loc[edge, "intrinsic_sd"]
    tau = {mode: quiet_fit(scores, inference="nuts", chains=1, draws=200, progress=False, approx_only=mode)
           .edges.set_index("edge").loc[edge, "intrinsic_sd"] for mode in ("full", "mean")}
    assert tau["mean"] == pytest.approx(true_sd, rel=0.25), tau
    assert tau["full"] > 1.5 * true_sd, tau


def test_approx_only_mean_needs_the_gaussian_likelihood(tiny):
    with pytest.raises(FitError, match="approx_only='mean' works with likelihood='gaussian'"):
        fit(tiny.scores, **{**FAST, "approx_only": "mean", "likelihood": "student-t"})


# --- CLI ----------------------------------------------------------------------------------------------------


def test_cli_fit_end_to_end(tmp_path):
    write_simulation(tmp_path / "sim.parquet", n_layers=1, n_heads=2, n_inputs=40, seed=8)
    result = CliRunner().invoke(cli, ["fit", str(tmp_path / "sim.parquet"), "--out", str(tmp_path / "fit"),
                                      "--inference", "svi", "--chains", "1", "--draws", "100", "--svi-steps", "200",
                                      "--approx-only", "full", "-q"])
    assert result.exit_code == 0, result.output
    assert "Top" in result.output and "intrinsic" in result.output and "approximation" in result.output
    assert "if in the circuit" in result.output and "Approximation by edge type" in result.output
    layer_rows = result.output.split("The same per receiver layer")[1].splitlines()[2:4]  # layers 0 and 1 (logits)
    assert [row.split()[0] for row in layer_rows] == ["0", "1"] and "/" in layer_rows[0]
    assert "approximation error pooled by type; approximate-only inputs: full" in result.output
    assert (tmp_path / "fit" / schema.FIT_EDGES_FILE).exists()
    fitted = load_fit(tmp_path / "fit")
    summary = fitted.summary
    assert summary["n_edges"] == 13 and summary["diagnostics"]["svi_steps_run"] == 200
    assert summary["settings"]["error_pooling"] == "type"
    assert summary["settings"]["approx_only"] == "full"
    assert fitted.idata.posterior["beta_type"].dims[-2:] == ("edge_type", "method")


def test_a_diverging_optimiser_is_an_error_not_a_nan_table():
    import jax
    import jax.numpy as jnp
    import numpyro
    from numpyro import distributions as dist
    from numpyro.infer import SVI, Trace_ELBO, init_to_value
    from numpyro.infer.autoguide import AutoDelta

    from bayescirc._fit_engine import _svi_steps

    def model():  # the prior pulls x from 0 to 5; past 0.5 the likelihood is undefined
        x = numpyro.sample("x", dist.Normal(5.0, 1.0))
        numpyro.factor("broken", jnp.where(x < 0.5, 0.0, jnp.nan))

    guide = AutoDelta(model, init_loc_fn=init_to_value(values={"x": 0.0}))
    svi = SVI(model, guide, numpyro.optim.Adam(0.1), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0))
    with pytest.raises(FitError, match=r"optimiser diverged: the loss became nan at step [1-9]"):
        _svi_steps(svi, state, (), 300)


def test_cli_fit_bad_file_is_one_line_and_exit_2(tmp_path):
    pd.DataFrame({"input_id": [0], "edge": ["m0->logits"], "method": ["exact"]}).to_parquet(tmp_path / "bad.parquet")
    result = CliRunner().invoke(cli, ["fit", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "fit")])
    assert result.exit_code == 2
    assert "missing column 'score'" in result.output
    assert not (tmp_path / "fit").exists()


def test_cli_fit_help_teaches_the_options():
    result = CliRunner().invoke(cli, ["fit", "--help"])
    assert result.exit_code == 0
    for word in ("--inference", "--inclusion", "--threshold", "--likelihood", "--hdi-prob", "--error-pooling", "--approx-only",
                 "intrinsic", "Example"):
        assert word in result.output


# --- recovery of simulated truth (NUTS; slow) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def truth_fit():
    sim = simulate(n_layers=2, n_heads=4, n_inputs=200, seed=1)
    res = quiet_fit(sim.scores, inference="nuts", chains=2, draws=400, progress=False)
    return sim, res, res.edges.merge(sim.truth, on="edge", suffixes=("", "_true"))


@pytest.mark.slow
def test_inclusion_ranks_planted_edges_at_least_as_well_as_any_naive_ranking(truth_fit):
    sim, res, e = truth_fit
    y = e["in_circuit"].to_numpy()
    naive = max(auc(e[f"naive_mean:{m}"].abs().to_numpy(), y) for m in sim.config.methods)
    assert auc(e["inclusion_prob"].to_numpy(), y) >= naive


@pytest.mark.slow
def test_confident_edges_are_truly_in_the_circuit_and_decoys_are_not(truth_fit):
    _, _, e = truth_fit
    confident = e[e["inclusion_prob"] >= 0.9]
    assert len(confident) >= 3 and confident["in_circuit"].mean() >= 0.9
    assert e.loc[e["is_decoy"], "inclusion_prob"].max() < 0.2


@pytest.mark.slow
def test_slab_hdis_cover_the_true_effects_at_their_nominal_rate(truth_fit):
    _, _, e = truth_fit
    covered = (e["slab_hdi_low"] <= e["effect"] + 1e-9) & (e["effect"] - 1e-9 <= e["slab_hdi_high"])
    assert 0.85 <= covered.mean() <= 0.95  # measured 0.909 (NUTS 2 x 400)
    assert covered[e["in_circuit"]].mean() >= 0.7  # measured 9 of 12


@pytest.mark.slow
def test_marginal_hdis_cover_the_true_effects_of_85_to_95_percent_of_edges(truth_fit):
    _, _, e = truth_fit
    covered = (e["effect_hdi_low"] <= e["effect"] + 1e-9) & (e["effect"] - 1e-9 <= e["effect_hdi_high"])
    # measured 0.945 (NUTS 2 x 400). Per planted edge the marginal is the wrong interval to read: a small planted
    # effect sits mostly in the spike (HDI [0, 0]) and the slab_hdi test above covers it; of the 9 planted edges in
    # the slab 6 are covered here, the 3 misses centred on their 200-input sample mean (2.8 SE from mu for one).
    assert 0.85 <= covered.mean() <= 0.95


@pytest.mark.slow
def test_variance_components_are_recovered_within_20_percent(truth_fit):
    sim, res, e = truth_fit
    ratio = e["intrinsic_sd"] / e["intrinsic_sd_true"]
    assert np.median(np.abs(ratio - 1)) < 0.2
    g = res.summary["globals"]
    counts = e["edge_type_true"].value_counts()
    well_observed = counts.index[counts >= 8]  # edge types with 8+ edges (of 16 types)
    assert len(well_observed) >= 6
    for m, err in sim.config.methods.items():  # the same error on every type: each type finds it
        for t in well_observed:
            assert g["beta_type"][m][t]["mean"] == pytest.approx(err.scale, rel=0.2), (m, t)
            assert g["sigma_type"][m][t]["mean"] == pytest.approx(err.noise_sd, rel=0.2), (m, t)
            assert abs(g["alpha_type"][m][t]["mean"] - err.bias) < 0.2 * sim.config.intrinsic_sd, (m, t)


@pytest.mark.slow
def test_heavy_tailed_inputs_are_detected_and_fitted_by_the_student_t_variant():
    sim = simulate(n_layers=2, n_heads=4, n_inputs=250, n_exact=100, heavy_tails=3.0, seed=2)
    gauss = quiet_fit(sim.scores, inference="svi", chains=1, draws=300, progress=False)
    assert gauss.summary["ppc"]["preferred"] == "student-t"
    robust = quiet_fit(sim.scores, inference="svi", chains=1, draws=300, likelihood="student-t", progress=False)
    assert robust.summary["settings"]["approx_only"] == "full"  # the default "auto" with Student-t: every input
    e = robust.edges.merge(sim.truth, on="edge")
    y = e["in_circuit"].to_numpy()
    naive = max(auc(e[f"naive_mean:{m}"].abs().to_numpy(), y) for m in sim.config.methods)
    assert auc(e["inclusion_prob"].to_numpy(), y) >= naive - 0.02
    df = robust.summary["ppc"]["student-t"]["df_posterior"]
    assert max(df, key=df.get) in ("3.0", "5.0")
    ratio = e["intrinsic_sd_x"] / e["intrinsic_sd_y"] if "intrinsic_sd_x" in e else None
    if ratio is not None:
        assert np.median(np.abs(ratio - 1)) < 0.25


def test_fit_errors_are_user_errors():
    assert issubclass(FitError, BayescircError)


def _fresh_python(code: str, xla_flags: str | None = None) -> list[str]:
    """Words of the stdout of ``code`` run in a new interpreter (JAX not yet started there), XLA_FLAGS as given."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_nuts_chains_get_a_cpu_device_each_when_jax_has_not_started_yet():
    import os

    cores = os.cpu_count() or 1
    check = ("import jax; from bayescirc.fitting import cpu_devices_for_chains as f; {before}"
             "print(f(2), jax.local_device_count(), f(4))")
    fresh = _fresh_python(check.format(before=""))
    assert fresh == ([str(cores >= 2), str(2 if cores >= 2 else 1), "False"])  # a second call cannot change it
    assert _fresh_python(check.format(before="jax.numpy.zeros(1).block_until_ready(); ")) == ["False", "1", "False"]
    assert _fresh_python(check.format(before=""), "--xla_force_host_platform_device_count=3") == ["False", "3", "False"]
    assert _fresh_python("import jax; from bayescirc.fitting import cpu_devices_for_chains as f; "
                         "print(f(1), jax.local_device_count())") == ["False", "1"]
    if cores >= 2:  # more chains than cores: still one device each, so that NumPyro runs them side by side
        assert _fresh_python(check.format(before="").replace("f(2)", "f(3)")) == ["True", "3", "False"]
