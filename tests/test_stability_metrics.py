"""Stability metrics checked on small cases computed by hand, and against a naive set-based reference."""

import importlib.util

import numpy as np
import pandas as pd
import pytest
from fitfixtures import A, B, C, make_fit

from bayescirc.circuits import EdgeIndex
from bayescirc.errors import BayescircError
from bayescirc.graph import prune_to_paths
from bayescirc.stability_metrics import (
    bootstrap_counts,
    exact_variability,
    select,
    selection_stability,
    stability,
    weighted_means,
)

EDGES = [A, B, C]  # input->m0, m0->logits, input->logits
# Two inputs. Input 0 drives the path through m0, input 1 the direct path.
EXACT = np.array([[2.0, 2.0, 0.0],
                  [0.1, 0.0, 3.0]])


def scores_table(per_method: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for method, values in per_method.items():
        for i, row in enumerate(values):
            rows += [{"input_id": i, "edge": e, "method": method, "score": float(v)} for e, v in zip(EDGES, row)]
    return pd.DataFrame(rows)


def circuit_of(means_row, k):
    """Naive reference: sort by |mean|, take k, prune with graph.prune_to_paths."""
    order = sorted(range(len(EDGES)), key=lambda j: -abs(means_row[j]))[:k]
    return prune_to_paths([EDGES[j] for j in order])


def test_bootstrap_circuits_and_jaccard_by_hand():
    counts = np.array([[2, 0], [1, 1], [1, 1], [0, 2]])
    means = weighted_means(EXACT, counts)
    assert means[1] == pytest.approx([1.05, 1.0, 1.5])
    circuits = EdgeIndex.from_edges(EDGES).prune(select(means, k=2))
    # (2,0) -> top-2 {A, B}: the m0 path; (1,1) and (0,2) -> top-2 {C, A}, A dangles -> {C}
    assert circuits.astype(int).tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]]
    stats = selection_stability(circuits)
    # pairs: three (0, j) with J = 0, three among {C} with J = 1
    assert stats == {"jaccard_mean": 0.5, "jaccard_p05": 0.0, "boot_size_mean": 1.25}


def test_missing_scores_leave_the_mean_of_their_edge():
    values = np.array([[1.0, np.nan], [3.0, np.nan]])
    assert weighted_means(values, np.array([[1, 1]]))[0, 0] == 2.0
    assert np.isnan(weighted_means(values, np.array([[1, 1]]))[0, 1])


def test_unscored_edges_are_never_selected():
    assert select(np.array([[np.nan, 0.5, np.nan]]), k=2).tolist() == [[False, True, False]]


def test_threshold_selection():
    assert select(np.array([[0.5, -2.0, np.nan]]), threshold=1.0).tolist() == [[False, True, False]]


def test_bootstrap_counts_are_resamples_of_full_size():
    counts = bootstrap_counts(5, 100, seed=1)
    assert counts.shape == (100, 5) and (counts.sum(1) == 5).all()
    assert np.array_equal(counts, bootstrap_counts(5, 100, seed=1))


def test_expected_bootstrap_jaccard_matches_the_closed_form():
    # Each resample of the two inputs gives {A, B} with probability 1/4 (input 0 twice), else {C}.
    # Two independent resamples agree (J = 1) with probability 1/16 + 9/16, else J = 0: E[J] = 0.625.
    result = stability(scores_table({"exact": EXACT}), bootstrap=2000, k=[2], progress=False)
    row = result.bootstrap.set_index("selection").loc["top-k"]
    assert row.jaccard_mean == pytest.approx(0.625, abs=0.04)
    assert row.jaccard_p05 == 0.0 and row.circuit_size == 1


def test_stability_agrees_with_a_naive_loop_over_the_same_resamples(rng):
    values = rng.normal(size=(6, 3)) + np.array([1.0, 1.0, 0.8])
    result = stability(scores_table({"eap": values}), bootstrap=30, k=[1, 2, 3], seed=4, progress=False)
    counts = bootstrap_counts(6, 30, seed=4)
    for k in (1, 2, 3):
        sets = [circuit_of(values.T @ c / c.sum(), k) for c in counts]
        pairs = [len(a & b) / len(a | b) if a | b else 1.0 for i, a in enumerate(sets) for b in sets[i + 1:]]
        row = result.bootstrap[result.bootstrap.k == k].iloc[0]
        assert row.jaccard_mean == pytest.approx(np.mean(pairs))
        assert row.jaccard_p05 == pytest.approx(np.percentile(pairs, 5))


def test_jaccard_across_methods_and_k():
    eap_ig = np.array([[5.0, 5.0, 0.0], [5.0, 5.0, 0.0]])
    result = stability(scores_table({"exact": EXACT, "eap-ig-inputs:steps=5": eap_ig}), bootstrap=5, k=[2, 3],
                       progress=False)
    mj = result.methods_jaccard.set_index(["selection", "method_a", "method_b"])["jaccard"]
    # k=2: exact -> {C}, eap-ig -> {A, B}: disjoint. k=3: both take all three edges.
    assert mj[("top-k k=2", "exact", "eap-ig-inputs:steps=5")] == 0.0
    assert mj[("top-k k=2", "exact", "exact")] == 1.0
    assert mj[("top-k k=3", "exact", "eap-ig-inputs:steps=5")] == 1.0
    kj = result.k_jaccard.set_index(["method", "k_a", "k_b"])["jaccard"]
    assert kj[("exact", 2, 3)] == pytest.approx(1 / 3)
    # A method whose scores never change is perfectly stable, rankings included.
    steady = result.bootstrap[(result.bootstrap.method == "eap-ig-inputs:steps=5") & (result.bootstrap.k == 2)].iloc[0]
    assert [steady.jaccard_mean, steady.jaccard_p05, steady.spearman_mean, steady.kendall_mean] == pytest.approx([1, 1, 1, 1])


def test_exact_variability_by_hand():
    values = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [-2.0, -1.0]])
    table = exact_variability(values, ["e1", "e2"]).set_index("edge")
    assert table.loc["e1", "mean"] == 1.0
    assert table.loc["e1", "sd"] == pytest.approx(np.sqrt(14 / 3))
    assert table.loc["e1", "cv"] == pytest.approx(np.sqrt(14 / 3))
    assert table.loc["e1", "sign_consistency"] == 0.75
    assert table.loc["e2", "cv"] == np.inf and table.loc["e2", "sign_consistency"] == 0.25


def test_result_tables_files_and_screen(tmp_path):
    result = stability(scores_table({"exact": EXACT, "eap": EXACT * 0.9}), bootstrap=10, k=[1, 2], progress=False)
    out = result.save(tmp_path / "stab")
    for name in ("stability.json", "bootstrap.parquet", "methods_jaccard.parquet", "k_jaccard.parquet",
                 "edges.parquet", "summary.txt"):
        assert (out / name).exists()
    assert len(pd.read_parquet(out / "edges.parquet")) == 3  # exact edges only
    text = result.to_text()
    assert "conventional" in text and "J mean" in text and len(text.splitlines()) <= 50


def test_bad_options_are_user_errors():
    table = scores_table({"exact": EXACT})
    with pytest.raises(BayescircError, match="at least 2"):
        stability(table, bootstrap=1, progress=False)
    with pytest.raises(BayescircError, match="'eap'"):
        stability(table, methods=["eap"], progress=False)
    with pytest.raises(BayescircError, match="k=0"):
        stability(table, k=[0], progress=False)


# --- the Bayesian side ------------------------------------------------------------------------------------


def threshold_fitter(calls):
    """A stand-in fit: inclusion 1 for edges whose mean exact score exceeds 1.2, else 0."""
    def fitter(frame, **options):
        calls.append(options)
        means = frame[frame.method == "exact"].groupby("edge")["score"].mean().reindex(EDGES).to_numpy()
        inclusion = np.tile((np.abs(means) > 1.2).astype(float), (2, 1))
        return make_fit(EDGES, inclusion=inclusion, mu=np.tile(means, (2, 1)))
    return fitter


def test_bayesian_side_resamples_fits_and_matches_k():
    calls = []
    result = stability(scores_table({"exact": EXACT}), bootstrap=12, k=[3], bayes=True, fitter=threshold_fitter(calls),
                       fit_options={"draws": 50}, seed=2, progress=False)
    assert len(calls) == 1 + 12 and calls[0]["inference"] == "svi" and calls[0]["draws"] == 50
    bayes = result.bootstrap[result.bootstrap.pipeline == "bayesian"].iloc[0]
    # full data: means (1.05, 1, 1.5) -> {C}; matched conventional k = 1 is added to k = 3
    assert bayes.circuit_size == 1 and result.settings["k"] == [1, 3]
    counts = bootstrap_counts(2, 12, seed=2)
    sets = [prune_to_paths([e for e, m in zip(EDGES, EXACT.T @ c / 2) if abs(m) > 1.2]) for c in counts]
    pairs = [len(a & b) / len(a | b) if a | b else 1.0 for i, a in enumerate(sets) for b in sets[i + 1:]]
    assert bayes.jaccard_mean == pytest.approx(np.mean(pairs))
    top1 = result.bootstrap[(result.bootstrap.pipeline == "conventional") & (result.bootstrap.k == 1)].iloc[0]
    assert top1.circuit_size == 1
    head = result.headline()["exact"]
    assert head["k"] == 1 and head["bayesian_jaccard_mean"] == bayes.jaccard_mean
    assert head["conventional_jaccard_mean"] == top1.jaccard_mean
    assert "Same size (k = 1)" in result.to_text()


@pytest.mark.skipif(importlib.util.find_spec("bayescirc.fitting") is None,
                    reason="bayescirc.fitting (the fit) is not on this branch yet; it lands on main separately")
def test_bayesian_side_with_the_real_fit_on_simulated_data():
    from bayescirc.simulation import simulate

    sim = simulate(n_layers=1, n_heads=2, n_inputs=40, n_exact=10, seed=3)
    result = stability(sim.scores, bootstrap=3, bayes=True, progress=False, fit_options={"draws": 100})
    bayes = result.bootstrap[result.bootstrap.pipeline == "bayesian"].iloc[0]
    assert 0 <= bayes.jaccard_mean <= 1
    if bayes.circuit_size > 0:
        assert int(bayes.circuit_size) in result.settings["k"]
