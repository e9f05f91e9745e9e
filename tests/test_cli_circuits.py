"""`bayescirc circuits`, `stability` and `evaluate` from the command line."""

import json
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fitfixtures import A, B, C, fake_patching, four_draw_fit, make_fit

from bayescirc.cli import cli
from bayescirc.export import read_circuit_json
from bayescirc.graph import Graph
from bayescirc.scores import write_scores


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("name", ["circuits", "stability", "evaluate"])
def test_help_teaches_the_options(name):
    result = run(name, "--help")
    assert result.exit_code == 0 and "Example:" in result.output and "[default" in result.output


def test_circuits_writes_summary_tables_and_eap_ig_json(tmp_path):
    four_draw_fit().save(tmp_path / "fit")
    result = run("circuits", tmp_path / "fit", "--out", f"{tmp_path / 'c'}/")
    assert result.exit_code == 0, result.output
    assert "median-probability circuit: 1 edges" in result.output
    assert f"wrote {tmp_path / 'c'}/ (circuits.json" in result.output  # one slash, however --out was typed
    summary = json.loads((tmp_path / "c" / "circuits.json").read_text())
    assert summary["median_circuit"] == [C] and summary["credible_superset"] == sorted([A, B, C])
    assert summary["expected_jaccard"] == pytest.approx(7 / 18)
    edges = pd.read_parquet(tmp_path / "c" / "edges.parquet").set_index("edge")
    assert edges["frequency"].to_dict() == {A: 0.5, B: 0.5, C: 0.75}
    assert len(pd.read_parquet(tmp_path / "c" / "samples.parquet")) == 7
    exported = read_circuit_json(tmp_path / "c" / "median_circuit.json").set_index("edge")
    assert set(exported.index[exported.in_graph]) == {C}
    assert exported.loc[A, "score"] == 0.5
    superset = read_circuit_json(tmp_path / "c" / "credible_superset.json")
    assert set(superset.loc[superset.in_graph, "edge"]) == {A, B, C}
    assert json.loads((tmp_path / "c" / "credible_core.json").read_text())["cfg"]["d_model"] == 0


def test_circuits_exports_the_collected_models_graph_parallel_blocks_included(tmp_path):
    graph = Graph(2, 2, parallel_attn_mlp=True)  # GPT-J/Pythia blocks: heads do not feed their own layer's MLP
    fit = make_fit(graph.edges, inclusion=np.ones((2, graph.n_edges)))
    fit.summary["metadata"] = {"extra": {"collect": {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": True}}}
    fit.save(tmp_path / "fit")
    assert run("circuits", tmp_path / "fit", "--out", tmp_path / "c").exit_code == 0
    exported = json.loads((tmp_path / "c" / "median_circuit.json").read_text())
    assert exported["cfg"]["parallel_attn_mlp"] is True and list(exported["edges"]) == list(graph.edges)


def test_circuits_reads_d_model_from_the_fitted_models_config(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"n_embd": 64, "n_layer": 1}))
    fit = four_draw_fit()
    fit.metadata["model"] = str(model)
    fit.save(tmp_path / "fit")
    assert run("circuits", tmp_path / "fit", "--out", tmp_path / "c").exit_code == 0
    assert json.loads((tmp_path / "c" / "median_circuit.json").read_text())["cfg"]["d_model"] == 64


def test_circuits_bad_rule_is_one_line_exit_2(tmp_path):
    four_draw_fit().save(tmp_path / "fit")
    result = CliRunner().invoke(cli, ["circuits", str(tmp_path / "fit"), "--rule", "top5"])
    assert result.exit_code == 2 and "topk:K" in result.output
    missing = CliRunner().invoke(cli, ["circuits", str(tmp_path / "nofit")])
    assert missing.exit_code == 2 and "not a fit directory" in missing.output
    for option, value in (("--top", "-1"), ("--prob", "1.5"), ("--prob", "0")):
        bad = CliRunner().invoke(cli, ["circuits", str(tmp_path / "fit"), option, value])
        assert bad.exit_code == 2 and f"Invalid value for '{option}'" in bad.output, bad.output


def test_circuits_json_is_strict_json_even_when_a_summary_is_undefined(tmp_path):
    four_draw_fit().save(tmp_path / "fit")
    assert run("circuits", tmp_path / "fit", "--n", "1", "--out", tmp_path / "c").exit_code == 0
    text = (tmp_path / "c" / "circuits.json").read_text()
    summary = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in circuits.json"))
    assert summary["expected_jaccard"] is None  # one circuit: no pair to compare


def test_circuits_never_replaces_a_directory_holding_files_it_does_not_write(tmp_path):
    four_draw_fit().save(tmp_path / "fit")
    before = sorted(p.name for p in (tmp_path / "fit").iterdir())
    into_fit = CliRunner().invoke(cli, ["circuits", str(tmp_path / "fit"), "--out", str(tmp_path / "fit")])
    assert into_fit.exit_code == 2 and "posterior.nc" in into_fit.output and "Choose a new or empty" in into_fit.output
    assert sorted(p.name for p in (tmp_path / "fit").iterdir()) == before  # the fit is intact
    notes = tmp_path / "results"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(cli, ["circuits", str(tmp_path / "fit"), "--out", str(notes)])
    assert refused.exit_code == 2 and "notes.txt" in refused.output
    assert (notes / "notes.txt").read_text() == "mine"
    for _ in range(2):  # its own earlier output is replaced, and so is the default FIT_DIR/circuits
        assert run("circuits", tmp_path / "fit", "--out", tmp_path / "c").exit_code == 0
        assert run("circuits", tmp_path / "fit").exit_code == 0
    assert (tmp_path / "fit" / "circuits" / "circuits.json").exists()


def test_fit_stability_and_evaluate_refuse_a_foreign_output_directory_before_any_work(tmp_path, faked_evaluation,
                                                                                      monkeypatch):
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    (foreign / "data.csv").write_text("keep me")
    scores = tmp_path / "s.parquet"
    assert run("simulate", "--out", scores, "--layers", "1", "--heads", "2", "--inputs", "12", "-q").exit_code == 0
    import bayescirc.stability_metrics

    monkeypatch.setattr(bayescirc.stability_metrics, "stability", lambda *a, **k: pytest.fail("ran before the check"))
    calls, fit_dir, task = faked_evaluation
    for args in (["fit", scores, "--out", foreign], ["stability", scores, "--out", foreign],
                 ["evaluate", fit_dir, "--model", "m", "--task", task, "--held-out", "2", "--out", foreign]):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 2 and "data.csv" in result.output, (args[0], result.output)
    assert calls == [] and (foreign / "data.csv").read_text() == "keep me"


def test_stability_prints_the_table_and_writes_files(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"input_id": i, "edge": e, "method": m, "score": float(mu + rng.normal(0, 0.3))}
            for i in range(20) for e, mu in zip((A, B, C), (1.0, 0.9, 0.5)) for m in ("exact", "eap")]
    write_scores(pd.DataFrame(rows), tmp_path / "s.parquet")
    result = run("stability", tmp_path / "s.parquet", "-B", "20", "--k", "1", "--k", "2", "--threshold", "0.7",
                 "--methods", "exact,eap", "--out", tmp_path / "st")
    assert result.exit_code == 0, result.output
    assert "conventional" in result.output and "top-k k=2" in result.output and "|mean|>0.7" in result.output
    table = pd.read_parquet(tmp_path / "st" / "bootstrap.parquet")
    assert set(table.method) == {"exact", "eap"} and len(table) == 6
    assert json.loads((tmp_path / "st" / "stability.json").read_text())["settings"]["bootstrap"] == 20


def test_stability_bayes_passes_the_same_fit_settings_to_every_fit(tmp_path, monkeypatch):
    """--bayes: the headline table is printed and written; --fit-* reach every fit unchanged."""
    from bayescirc import stability_metrics

    calls = []

    def fake_fit(frame, **options):
        calls.append(options)
        means = frame.groupby("edge", observed=True)["score"].mean().reindex([A, B, C]).to_numpy()
        return _Inclusion([A, B, C], np.where(means > 0.8, 0.9, 0.1))

    monkeypatch.setattr(stability_metrics, "_default_fitter", fake_fit)
    rng = np.random.default_rng(1)
    rows = [{"input_id": i, "edge": e, "method": m, "score": float(mu + rng.normal(0, 0.3))}
            for i in range(20) for e, mu in zip((A, B, C), (1.0, 0.9, 0.5)) for m in ("exact", "eap")]
    write_scores(pd.DataFrame(rows), tmp_path / "s.parquet")
    result = run("stability", tmp_path / "s.parquet", "-B", "8", "--bayes", "--bayes-bootstrap", "5",
                 "--fit-chains", "1", "--fit-draws", "300", "--fit-approx-only", "mean",
                 "--fit-likelihood", "student-t", "--fit-inclusion", "threshold", "--fit-threshold", "5%",
                 "--out", tmp_path / "st")
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 + 5
    assert all(c == {"inference": "svi", "progress": False, "seed": 0, "chains": 1, "draws": 300, "approx_only": "mean",
                        "likelihood": "student-t", "inclusion": "threshold", "threshold": "5%"}
               for c in calls)
    assert "Headline" in result.output and "matched" in result.output and "fixed" in result.output
    head = pd.read_parquet(tmp_path / "st" / "headline.parquet")
    assert set(head.variant) == {"matched", "fixed"} and (head.n_bootstrap == 5).all()
    assert set(pd.read_parquet(tmp_path / "st" / "resamples.parquet")["resample"]) == set(range(-1, 5))


@pytest.mark.parametrize("options", [["--fit-threshold", "5%"], ["--fit-inclusion", "threshold"]])
def test_stability_fit_threshold_needs_the_threshold_rule(tmp_path, options):
    result = run("stability", tmp_path / "missing.parquet", "--bayes", *options)
    assert result.exit_code == 2
    assert "--fit-inclusion threshold and --fit-threshold D go together" in result.output


class _Inclusion:
    def __init__(self, edges, mean):
        self.edge_names, self._mean = list(edges), np.asarray(mean, dtype=float)

    def draws(self, var):
        return self._mean[None, :]


@pytest.fixture
def faked_evaluation(tmp_path, monkeypatch):
    """A saved four-draw fit, a 12-row task and patching replaced by a stub that records its calls."""
    calls = []
    monkeypatch.setitem(sys.modules, "bayescirc.patching", fake_patching(calls))
    four_draw_fit().save(tmp_path / "fit")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"clean": "a b", "corrupted": "c d", "answer": " x", "distractor": " y"}) + "\n"
                            for _ in range(12)))
    return calls, tmp_path / "fit", task


def test_evaluate_reports_faithfulness(tmp_path, faked_evaluation):
    calls, fit_dir, task = faked_evaluation
    result = run("evaluate", fit_dir, "--model", "m", "--task", task, "--n-circuits", "50",
                 "--held-out", "2", "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert calls[0]["inputs"] == [10, 11] and calls[0]["progress"]
    assert "median-probability circuit (1 edges): 0.500" in result.output
    saved = json.loads((tmp_path / "ev" / "faithfulness.json").read_text())
    assert saved["posterior"]["n_circuits"] == 50 and 0.5 <= saved["posterior"]["mean"] <= 1.0


def test_quiet_turns_off_the_progress_bars(tmp_path, faked_evaluation):
    calls, fit_dir, task = faked_evaluation
    assert run("evaluate", fit_dir, "--model", "m", "--task", task, "--held-out", "2", "-q").exit_code == 0
    assert calls[-1]["progress"] is False
    scores = tmp_path / "s.parquet"
    for quiet in ([], ["--quiet"]):
        simulated = run("simulate", "--out", scores, "--layers", "1", "--heads", "2", "--inputs", "12", *quiet)
        stable = run("stability", scores, "-B", "4", "--k", "3", *quiet)
        assert simulated.exit_code == 0 and stable.exit_code == 0, simulated.output + stable.output
        assert ("simulate:" in simulated.stderr) is not bool(quiet)
        assert ("conventional" in stable.stderr) is not bool(quiet)  # the per-method bar
