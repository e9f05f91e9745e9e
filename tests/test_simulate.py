"""The simulator draws from the fit's generative model, reproducibly."""

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from bayescirc.cli import cli
from bayescirc.graph import prune_to_paths
from bayescirc.scores import read_scores, sufficient_statistics
from bayescirc.simulation import MethodError, SimulationConfig, read_truth, simulate, truth_table, write_simulation


def test_same_seed_same_scores_other_seed_other_scores():
    a = simulate(n_inputs=20, n_exact=5, seed=3)
    b = simulate(n_inputs=20, n_exact=5, seed=3)
    c = simulate(n_inputs=20, n_exact=5, seed=4)
    pd.testing.assert_frame_equal(a.scores, b.scores)
    assert not np.allclose(a.scores.score, c.scores.score)


def test_file_and_memory_simulations_agree(tmp_path):
    config = SimulationConfig(n_layers=2, n_heads=2, n_inputs=37, n_exact=9, seed=1)
    path, truth_path = write_simulation(tmp_path / "sim.parquet", config)
    memory = simulate(config)

    def canon(d):
        return d.astype({"edge": str, "method": str}).sort_values(["method", "input_id", "edge"]).reset_index(drop=True)

    np.testing.assert_allclose(canon(read_scores(path)).score, canon(memory.scores).score, rtol=1e-6, atol=1e-6)
    truth, back = read_truth(truth_path)
    assert back == config
    pd.testing.assert_frame_equal(truth, memory.truth)


def test_sizes_follow_the_config():
    config = SimulationConfig(n_layers=2, n_heads=3, n_inputs=30, n_exact=10,
                              methods={"eap": MethodError(), "other": MethodError(scale=2.0)})
    sim = simulate(config)
    n_edges = len(sim.truth)
    counts = sim.scores.method.value_counts()
    assert counts["exact"] == 10 * n_edges and counts["eap"] == 30 * n_edges and counts["other"] == 30 * n_edges
    assert set(sim.scores.input_id[sim.scores.method == "exact"]) == set(range(10))


def test_planted_circuit_survives_pruning_and_decoys_are_zero_mean():
    sim = simulate(n_layers=3, n_heads=4, circuit_fraction=0.1, decoy_fraction=0.1, n_inputs=5)
    circuit = set(sim.truth.edge[sim.truth.in_circuit])
    assert prune_to_paths(circuit) == circuit
    assert abs(len(circuit) - 0.1 * len(sim.truth)) <= 1
    decoys = sim.truth[sim.truth.is_decoy]
    assert len(decoys) > 0 and (decoys.effect == 0).all() and (decoys.intrinsic_sd == 3.0).all()
    assert not (sim.truth.in_circuit & sim.truth.is_decoy).any()
    assert (sim.truth.effect[~sim.truth.in_circuit] == 0).all()


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("shape", [(2, 4), (3, 2)])
def test_every_planted_edge_is_on_a_complete_input_to_logits_path(shape, seed):
    """A path cut off when the target size is reached would be pruned away: the circuit is closed instead."""
    _, truth = truth_table(SimulationConfig(n_layers=shape[0], n_heads=shape[1], n_inputs=2, seed=seed))
    circuit = set(truth.edge[truth.in_circuit])
    target = round(0.1 * len(truth))
    assert prune_to_paths(circuit) == circuit
    assert target <= len(circuit) <= target + 1


@pytest.mark.parametrize("heavy_tails", [None, 4.0])
def test_moments_match_the_generative_model(tmp_path, heavy_tails):
    """Per-edge mean and sd of exact scores, and each method's calibration line, recover the truth."""
    eap = MethodError(bias=0.3, scale=0.7, edge_sd=0.0, noise_sd=0.2)
    config = SimulationConfig(n_layers=1, n_heads=2, n_inputs=4000, n_exact=4000, methods={"eap": eap},
                              heavy_tails=heavy_tails, decoy_fraction=0.0, seed=5)
    path, _ = write_simulation(tmp_path / "sim.parquet", config)
    stats = sufficient_statistics(path)
    per = stats.per_method().set_index(["method", "edge"])
    truth = truth_table(config)[1].set_index("edge")
    exact = per.loc["exact"].join(truth)
    se = exact.intrinsic_sd / np.sqrt(4000)
    assert (np.abs(exact["mean"] - exact.effect) < 4.5 * se).all()
    np.testing.assert_allclose(np.sqrt(exact["var"]), exact.intrinsic_sd, rtol=0.12 if heavy_tails else 0.06)
    cross = stats.exact_cross().set_index("edge").join(truth)
    n = cross["n"]
    cov = cross.sum_cross / n - cross.sum_exact * cross.sum_approx / n**2
    var_x = cross.sum_exact_sq / n - (cross.sum_exact / n) ** 2
    np.testing.assert_allclose(cov / var_x, eap.scale, atol=0.03)


def test_method_errors_can_differ_by_edge_type(tmp_path):
    """An edge type's overrides set its calibration line; the other types keep the method's values."""
    q = "input->attn<q>"
    eap = MethodError(scale=0.7, noise_sd=0.2, by_edge_type={q: {"scale": 0.05, "bias": 1.0}})
    config = SimulationConfig(n_layers=1, n_heads=2, n_inputs=2000, n_exact=2000, methods={"eap": eap},
                              decoy_fraction=0.0, seed=5)
    path, _ = write_simulation(tmp_path / "sim.parquet", config)
    stats = sufficient_statistics(path)
    truth = truth_table(config)[1].set_index("edge")
    cross = stats.exact_cross().set_index("edge").join(truth)
    n = cross["n"]
    slope = (cross.sum_cross / n - cross.sum_exact * cross.sum_approx / n**2) / (
        cross.sum_exact_sq / n - (cross.sum_exact / n) ** 2)
    offset = cross.sum_approx / n - slope * cross.sum_exact / n
    is_q = cross.edge_type == q
    np.testing.assert_allclose(slope[is_q], 0.05, atol=0.03)
    np.testing.assert_allclose(offset[is_q], 1.0, atol=0.05)
    np.testing.assert_allclose(slope[~is_q], 0.7, atol=0.03)
    with pytest.raises(ValueError, match="unknown"):
        MethodError(by_edge_type={q: {"slope": 1.0}})
    with pytest.raises(ValueError, match=r"by_edge_type\['input->attn<q>'\] edge_sd"):
        MethodError(by_edge_type={q: {"edge_sd": -1.0}})


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="n_exact"):
        SimulationConfig(n_inputs=5, n_exact=6)
    with pytest.raises(ValueError, match="df"):
        SimulationConfig(heavy_tails=2.0)
    with pytest.raises(ValueError, match="nothing to simulate"):
        SimulationConfig(n_exact=0, methods={})
    with pytest.raises(ValueError, match="n_layers and n_heads must be >= 1"):
        SimulationConfig(n_heads=0)


def simulate_cli(*args):
    """`bayescirc simulate` on a tiny graph; user errors must exit 2 with one line, no traceback."""
    return CliRunner().invoke(cli, ["simulate", "--layers", "1", "--heads", "2", "--inputs", "4", "-q", *args])


def assert_usage_error(result, *names):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert all(name in result.output for name in names), result.output


def test_cli_refuses_a_truth_path_that_is_the_out_path(tmp_path):
    out = tmp_path / "sim.parquet"
    result = simulate_cli("--out", str(out), "--truth", str(tmp_path / "sub" / ".." / "sim.parquet"))
    assert_usage_error(result, "--truth", "--out")
    assert not out.exists()


@pytest.mark.parametrize("methods, says", [
    ([":scale=1"], "needs a name"),
    (["eap", "eap:scale=2"], "'eap' is given twice"),
])
def test_cli_refuses_empty_and_repeated_method_names(tmp_path, methods, says):
    out = tmp_path / "sim.parquet"
    result = simulate_cli("--out", str(out), *(arg for m in methods for arg in ("--method", m)))
    assert_usage_error(result, "--method", says)
    assert not out.exists()


@pytest.mark.parametrize("option, value", [("--layers", "0"), ("--heads", "0"), ("--layers", "-1")])
def test_cli_refuses_a_graph_without_layers_or_heads(tmp_path, option, value):
    result = simulate_cli("--out", str(tmp_path / "sim.parquet"), option, value)
    assert_usage_error(result, option)
    assert list(tmp_path.iterdir()) == []


def test_cli_names_an_output_path_whose_folder_is_a_file(tmp_path):
    (tmp_path / "somefile").write_text("not a folder")
    result = simulate_cli("--out", str(tmp_path / "somefile" / "x.parquet"))
    assert_usage_error(result, "error: cannot write", "somefile is a file, not a folder")
