"""Plots of a fit: every kind renders, saves by extension, and shows what it claims.

The fit is built by hand to the fit's output contract (``fit_fixture``) around
a simulation with known truth, so predictive draws can be checked against
closed forms.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pandas as pd
import pytest
from fit_fixture import make_fit, make_simulation
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from bayescirc import plots, schema
from bayescirc.errors import BayescircError
from bayescirc.graph import Graph, prune_to_paths
from bayescirc.posterior import FitResult
from bayescirc.scores import write_scores


@pytest.fixture(scope="module")
def sim():
    return make_simulation()


@pytest.fixture(scope="module")
def fit(sim):
    return make_fit(sim)


@pytest.fixture(scope="module")
def svi_fit(sim):
    return make_fit(sim, inference="svi")


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    return buf.getvalue()


def _blank_size(fig: Figure) -> int:
    return len(_png_bytes(Figure(figsize=fig.get_size_inches())))


def _check_figure(fig: Figure, fit) -> None:
    """Non-trivial image, every visible axes labelled, title names model and task."""
    assert isinstance(fig, Figure)
    assert len(_png_bytes(fig)) > 3 * _blank_size(fig)
    info = plots.run_info(fit)
    titles = [fig.get_suptitle()] + [ax.get_title() for ax in fig.axes]
    assert any(info["model"] in t and info["task"] in t for t in titles), titles
    for ax in fig.axes:
        if ax.get_visible() and ax.get_label() != "<colorbar>":
            assert ax.get_xlabel() and ax.get_ylabel(), (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())


@pytest.mark.parametrize("kind", [k for k in plots.KINDS if k != "loss"])
def test_every_nuts_kind_renders_with_labels_and_title(kind, fit, sim):
    fig = plots.plot(fit, kind, scores=sim.scores)
    _check_figure(fig, fit)


def test_loss_renders_for_svi_and_energy_refuses_it(svi_fit):
    _check_figure(plots.plot(svi_fit, "loss"), svi_fit)
    with pytest.raises(BayescircError, match="NUTS"):
        plots.plot(svi_fit, "energy")


def test_loss_refuses_a_nuts_fit(fit):
    with pytest.raises(BayescircError, match="SVI"):
        plots.plot(fit, "loss")


def test_metric_units_appear_on_axes(fit, sim):
    units = plots.run_info(fit)["units"]
    assert units == "logit-diff"
    for kind in ("forest", "ppc", "scatter"):
        fig = plots.plot(fit, kind, scores=sim.scores)
        assert any(units in ax.get_xlabel() for ax in fig.axes), kind


@pytest.mark.parametrize("ext,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_saves_by_extension(tmp_path, fit, ext, magic):
    out = tmp_path / f"forest{ext}"
    assert plots.plot(fit, "forest", out=out) is not None
    assert out.read_bytes()[:5].startswith(magic)
    assert out.stat().st_size > 5000
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left behind


def test_unknown_extension_and_kind_are_user_errors(tmp_path, fit):
    with pytest.raises(BayescircError, match=r"\.png"):
        plots.plot(fit, "forest", out=tmp_path / "forest.jpeg")
    with pytest.raises(BayescircError, match="choose one of"):
        plots.plot(fit, "violin")


def test_all_writes_the_kinds_the_fit_supports(tmp_path, fit, svi_fit, sim):
    figures = plots.plot(fit, "all", scores=sim.scores, out=tmp_path / "nuts")
    assert set(figures) == set(plots.KINDS) - {"loss"}
    assert sorted(p.name for p in (tmp_path / "nuts").iterdir()) == sorted(f"{k}.png" for k in figures)
    assert set(plots.plot(svi_fit, "all")) == {"trace", "rank", "forest", "loss", "decomposition", "circuit"}


def test_all_leaves_out_the_exact_scatter_for_a_fit_without_exact_scores(tmp_path, svi_fit, sim):
    """Approximate against exact scores needs exact scores: an EAP-only fit plots everything else (it failed whole)."""
    import copy

    eap_only = copy.copy(svi_fit)
    eap_only.summary = {**svi_fit.summary, "exact_method": None}
    scores = sim.scores[sim.scores["method"] != "exact"]
    figures = plots.plot(eap_only, "all", scores=scores, out=tmp_path / "eap")
    assert "scatter" not in figures and {"ppc", "circuit", "forest"} <= set(figures)


def test_scores_are_required_for_ppc_and_scatter(fit):
    for kind in ("ppc", "scatter"):
        with pytest.raises(BayescircError, match="scores"):
            plots.plot(fit, kind)


def test_unknown_edge_is_named(fit, sim):
    with pytest.raises(BayescircError, match="a9.h9->logits"):
        plots.plot(fit, "ppc", scores=sim.scores, edges=["a9.h9->logits"])


def test_ppc_reads_only_chosen_edges_from_a_scores_file(tmp_path, fit, sim):
    path = tmp_path / "scores.parquet"
    write_scores(sim.scores, path)
    edge = plots.default_edges(fit, 1)
    frame = plots._scores_for(path, edge)
    assert set(frame[schema.EDGE]) == set(edge)
    expected = sim.scores[sim.scores[schema.EDGE] == edge[0]]
    assert len(frame) == len(expected)
    _check_figure(plots.plot(fit, "ppc", scores=path, edges=edge), fit)


# --- predictive draws and calibration against closed forms -------------------------------------


def test_predictive_draws_match_the_generative_model(fit):
    edge = plots.default_edges(fit, 1)[0]
    e = fit.edge_names.index(edge)
    post = fit.idata.posterior
    mu, tau = post["mu"].values[..., e].mean(), post["tau"].values[..., e].mean()
    exact = plots.predictive_draws(fit, edge, schema.EXACT, n_inputs=2000, n_draws=200)
    assert exact.shape == (200, 2000)
    assert exact.mean() == pytest.approx(mu, abs=0.03)
    assert exact.std() == pytest.approx(np.sqrt(tau**2 + post["mu"].values[..., e].var()), rel=0.05)
    mu_d, tau_d = post["mu"].values[..., e].ravel(), post["tau"].values[..., e].ravel()
    for m, method in enumerate(post[schema.DIM_METHOD].values):
        a, b, s, w = (post[v].values[..., m].ravel() for v in ("alpha", "beta", "sigma", "omega"))
        draws = plots.predictive_draws(fit, edge, str(method), n_inputs=2000, n_draws=200)  # all 200 draws
        assert draws.mean() == pytest.approx(np.mean(a + b * mu_d), abs=0.05)
        # Within one replicate: intrinsic variation and noise.
        assert draws.std(axis=1).mean() == pytest.approx(np.sqrt(np.mean(b**2 * tau_d**2 + s**2)), rel=0.05)
        # Across replicates the systematic delta (omega) and the posterior spread of alpha + beta mu add.
        total = np.mean(b**2 * tau_d**2 + s**2 + w**2) + np.var(a + b * mu_d)
        assert draws.std() == pytest.approx(np.sqrt(total), rel=0.05)


def test_predictive_draws_use_posterior_delta_when_kept(sim):
    fit = make_fit(sim, with_delta=True)
    edge = plots.default_edges(fit, 1)[0]
    e = fit.edge_names.index(edge)
    delta = sim.truth.loc[e, f"error_{schema.EAP}"]
    post = fit.idata.posterior
    a, b = post["alpha"].values[..., 0].mean(), post["beta"].values[..., 0].mean()
    mu = post["mu"].values[..., e].mean()
    draws = plots.predictive_draws(fit, edge, schema.EAP, n_inputs=3000, n_draws=200)
    assert draws.mean() == pytest.approx(a + b * mu + delta, abs=0.02)


def test_calibration_line_is_the_posterior_mean_of_alpha_plus_beta_x(fit):
    x = np.linspace(-2, 3, 7)
    post = fit.idata.posterior
    mean, lo, hi = plots.calibration_lines(fit, schema.EAP, x)
    a, b = post["alpha"].values[..., 0].ravel(), post["beta"].values[..., 0].ravel()
    np.testing.assert_allclose(mean, a.mean() + b.mean() * x)
    assert np.all(lo <= mean) and np.all(mean <= hi)
    with pytest.raises(BayescircError, match="eap-ig-activations"):
        plots.calibration_lines(fit, schema.EAP_IG_ACTIVATIONS, x)


def test_calibration_and_predictive_draws_follow_the_edge_type_when_the_fit_pooled_by_type(sim):
    fit = make_fit(sim, by_type=True)
    post = fit.idata.posterior
    x = np.linspace(-2, 3, 7)
    types = [str(t) for t in post[schema.DIM_EDGE_TYPE].values]
    for edge in fit.edge_names[:4]:
        t = types.index(fit.edges.set_index("edge").loc[edge, "edge_type"])
        a = post["alpha_type"].values[..., t, 0].ravel()
        b = post["beta_type"].values[..., t, 0].ravel()
        mean, _, _ = plots.calibration_lines(fit, schema.EAP, x, edge=edge)
        np.testing.assert_allclose(mean, a.mean() + b.mean() * x)
        e = fit.edge_names.index(edge)
        mu = post["mu"].values[..., e].ravel()
        draws = plots.predictive_draws(fit, edge, schema.EAP, n_inputs=2000, n_draws=200)
        assert draws.mean() == pytest.approx(np.mean(a + b * mu), abs=0.05 * (t + 1))
    pooled, _, _ = plots.calibration_lines(fit, schema.EAP, x)  # no edge: the method's own line
    np.testing.assert_allclose(pooled, post["alpha"].values[..., 0].mean() + post["beta"].values[..., 0].mean() * x)


# --- the circuit graph ------------------------------------------------------------------------------


def _tiny_fit(edges: dict[str, float], draws: int = 4) -> FitResult:
    import arviz as az

    names = list(edges)
    p = np.array([edges[n] for n in names])
    idata = az.from_dict(posterior={"mu": np.zeros((1, draws, len(names))), "inclusion": np.tile(p, (1, draws, 1))},
                         dims={"mu": ["edge"], "inclusion": ["edge"]}, coords={"edge": names})
    table = pd.DataFrame({"edge": names, "inclusion_prob": p, "effect_mean": p, "effect_sd": 0.1,
                          "effect_hdi_low": p - 0.2, "effect_hdi_high": p + 0.2, "intrinsic_sd": 0.5})
    return FitResult(idata=idata, edges=table, summary={"metadata": {"model": "m", "task": "t", "metric": "prob"}})


def test_median_probability_circuit_is_pruned_to_input_logits_paths():
    fit = _tiny_fit({"input->a0.h0<q>": 0.9, "a0.h0->logits": 0.8, "a0.h1->logits": 0.95,
                     "input->a0.h1<k>": 0.4, "input->m0": 0.7, "not an edge": 0.99})
    assert plots.median_probability_circuit(fit) == {"input->a0.h0<q>", "a0.h0->logits"}


def test_the_plotted_circuit_is_the_one_circuits_reports():
    from bayescirc.circuits import sample_circuits

    # two chained edges at 0.6 each: each is in the graph in 0.36 of the pruned draws, so not in the median circuit
    fit = _tiny_fit({"input->a0.h0<v>": 0.6, "a0.h0->logits": 0.6, "input->logits": 0.9}, draws=400)
    assert plots.median_probability_circuit(fit) == set(sample_circuits(fit, seed=0).median_circuit())
    assert plots.median_probability_circuit(fit) == {"input->logits"}  # inclusion_prob > 0.5 would add the chain


def test_layout_places_every_gpt2_node_once_and_edges_point_forward():
    graph = Graph(12, 12)
    pos = plots.circuit_layout(graph.edges)
    assert set(pos) == set(graph.nodes)
    assert len(set(pos.values())) == len(graph.nodes)
    from bayescirc.graph import parse_edge
    assert all(pos[parse_edge(e).source][0] < pos[parse_edge(e).receiver][0] for e in graph.edges)


def test_gpt2_sized_circuit_graph_shows_tens_of_edges(rng):
    import matplotlib.colors as mcolors

    graph = Graph(12, 12)
    edges = dict(zip(graph.edges, 0.6 * rng.beta(0.2, 3, graph.n_edges)))  # all below 0.6
    chain = ["input->a0.h1<q>", "a0.h1->a5.h5<k>", "a5.h5->m7", "m7->logits"]
    edges.update({e: 0.97 for e in chain})
    fit = _tiny_fit(edges)
    circuit = plots.median_probability_circuit(fit)
    assert circuit == set(chain) | prune_to_paths(e for e, q in edges.items() if q > 0.5)
    fig = plots.plot_circuit(fit, threshold=0.2, max_edges=40)
    arrows = [a for a in fig.axes[0].patches if isinstance(a, FancyArrowPatch)]
    top40 = {e for e, _ in sorted(edges.items(), key=lambda kv: -kv[1])[:40]}
    assert len(arrows) == len(top40 | circuit)
    red = [a for a in arrows if mcolors.same_color(a.get_edgecolor()[:3], mcolors.to_rgb(plots.CIRCUIT_COLOUR))]
    assert len(red) == len(circuit)
    assert f"of {graph.n_edges} edges" in fig.axes[0].get_title()
    _check_figure(fig, fit)


def test_global_parameters_exclude_per_edge_and_oversized_variables(sim):
    import arviz as az

    fit = make_fit(sim)
    post = {k: fit.idata.posterior[k].values for k in fit.idata.posterior.data_vars}
    post["layer_z"] = np.zeros((2, 100, 3))           # a global over layers: kept
    post["df"] = np.ones((2, 100, len(fit.edge_names)))  # per edge under an anonymous dim: left out
    dims = {"mu": ["edge"], "inclusion": ["edge"], "tau": ["edge"], "layer_z": ["layer"],
            **{k: ["method"] for k in ("alpha", "beta", "sigma", "omega")}}
    fit.idata = az.from_dict(posterior=post, sample_stats={k: fit.idata.sample_stats[k].values for k in ("diverging", "energy")},
                             dims=dims, coords={"edge": fit.edge_names, "method": list(fit.idata.posterior.method.values)})
    names = plots._global_vars(fit)
    assert "layer_z" in names and "df" not in names and "mu" not in names
    assert set(names) == {"alpha", "beta", "sigma", "omega", "slab_sd", "tau_scale", "layer_z"}
    _check_figure(plots.plot(fit, "rank"), fit)


def test_trace_and_rank_plots_take_globals_with_a_method_dimension(fit):
    """Per method and edge type (beta_type: edge_type x method), as every fit with approximate methods has."""
    import arviz as az

    fit = copy.deepcopy(fit)
    post = {k: fit.idata.posterior[k].values for k in fit.idata.posterior.data_vars}
    methods = list(fit.idata.posterior.method.values)
    post["beta_type"] = np.ones((2, 100, 2, len(methods))) + np.random.default_rng(0).normal(0, 0.1, (2, 100, 2, len(methods)))
    dims = {"mu": ["edge"], "inclusion": ["edge"], "tau": ["edge"], "beta_type": ["edge_type", "method"],
            **{k: ["method"] for k in ("alpha", "beta", "sigma", "omega")}}
    fit.idata = az.from_dict(posterior=post, sample_stats={k: fit.idata.sample_stats[k].values for k in ("diverging", "energy")},
                             dims=dims, coords={"edge": fit.edge_names, "method": methods, "edge_type": ["a->b", "c->d"]})
    for kind in ("rank", "trace"):
        _check_figure(plots.plot(fit, kind, var_names=["beta_type", "beta"]), fit)


def test_the_loss_is_drawn_over_the_steps_that_ran(svi_fit):
    fit = copy.deepcopy(svi_fit)
    fit.summary["settings"]["svi_steps"] = 3000  # the cap
    fit.summary["diagnostics"]["svi_steps_run"] = 1900  # where the plateau rule stopped
    assert plots.plot(fit, "loss").axes[0].lines[0].get_xdata().max() == 1900


def test_student_t_fits_replicate_heavy_tailed_inputs(fit):
    import arviz as az

    heavy = copy.deepcopy(fit)
    post = {k: heavy.idata.posterior[k].values for k in heavy.idata.posterior.data_vars}
    post["df"] = np.full(post["mu"].shape[:2], 3.0)  # one df per draw, as Student-t fits store it
    heavy.idata = az.from_dict(posterior=post, dims={k: list(heavy.idata.posterior[k].dims[2:]) for k in post if k != "df"},
                               coords={c: heavy.idata.posterior[c].values for c in heavy.idata.posterior.coords
                                       if c not in ("chain", "draw")})
    edge = heavy.edge_names[0]
    from scipy.stats import kurtosis

    t_draws = plots.predictive_draws(heavy, edge, "exact", n_draws=50, n_inputs=400)
    normal_draws = plots.predictive_draws(fit, edge, "exact", n_draws=50, n_inputs=400)
    assert np.median(kurtosis(t_draws, axis=1)) > 1.0 > abs(np.median(kurtosis(normal_draws, axis=1)))


def test_plot_options_reach_the_figures_under_kind_all_and_bad_ones_are_refused(tmp_path, fit, monkeypatch):
    from click.testing import CliRunner

    from bayescirc.cli import cli

    fit.save(tmp_path / "fit")
    seen = {}
    real = plots.plot_circuit
    monkeypatch.setattr(plots, "plot_circuit", lambda f, **kw: seen.update(kw) or real(f, **kw))
    assert CliRunner().invoke(cli, ["plot", str(tmp_path / "fit"), "--max-edges", "5", "--threshold", "0.3"]).exit_code == 0
    assert seen == {"threshold": 0.3, "max_edges": 5}
    for args in (["--max-edges", "-1"], ["--top", "0"], ["--kind", "forest", "-e", "bogus"]):
        result = CliRunner().invoke(cli, ["plot", str(tmp_path / "fit"), *args])
        assert result.exit_code == 2 and "Traceback" not in result.output, (args, result.output)


def test_a_dollar_sign_in_the_model_name_is_printed_not_typeset(tmp_path, fit):
    odd = copy.deepcopy(fit)
    odd.summary["metadata"] = {**odd.summary.get("metadata", {}), "model": "cost_$^$"}
    plots.save_figure(plots.plot(odd, "decomposition"), tmp_path / "d.png")
