"""Stability metrics checked on small cases computed by hand, and against a naive set-based reference."""

import importlib.util
import warnings

import numpy as np
import pandas as pd
import pytest
from fitfixtures import A, B, C, make_fit

from bayescirc.circuits import CircuitWarning, EdgeIndex
from bayescirc.errors import BayescircError
from bayescirc.graph import prune_to_paths
from bayescirc.stability_metrics import (
    bootstrap_counts,
    exact_variability,
    matched_top_k,
    paired_jaccard,
    posterior_circuit,
    select,
    selection_stability,
    stability,
    warning_kinds,
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
            rows += [{"input_id": i, "edge": e, "method": method, "score": float(v)} for e, v in zip(EDGES, row)
                     if not np.isnan(v)]  # NaN: not scored
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


def test_sign_consistency_needs_two_inputs_and_a_nonzero_score():
    values = np.array([[1.0, 0.0, 4.0], [np.nan, 0.0, 5.0]])  # e1 on one input, e2 always exactly 0
    table = exact_variability(values, ["e1", "e2", "e3"]).set_index("edge")
    assert np.isnan(table.loc["e1", "sign_consistency"]) and np.isnan(table.loc["e2", "sign_consistency"])
    assert table.loc["e3", "sign_consistency"] == 1.0


def test_the_exact_summary_covers_edges_scored_on_two_inputs_or_more():
    exact = np.array([[1.0, 2.0, 0.0], [1.2, 2.2, np.nan], [0.8, -2.0, np.nan]])  # C: one input only
    s = stability(scores_table({"exact": exact}), bootstrap=4, k=[3], progress=False).summary()["exact_variability"]
    assert s["n_edges"] == 2  # A and B
    assert s["median_sign_consistency"] == pytest.approx((1 + 2 / 3) / 2)
    assert s["share_sign_consistent_90"] == 0.5


def test_rank_correlations_are_over_the_edges_the_method_scores(rng):
    from bayescirc.stability_metrics import _rank_correlations

    noise = np.abs(rng.normal(size=(40, 30)))
    padded = np.hstack([noise, np.full((40, 300), np.nan)])  # 300 edges the method never scores
    scored = np.r_[np.ones(30, bool), np.zeros(300, bool)]
    assert _rank_correlations(padded, scored) == pytest.approx(_rank_correlations(noise))
    assert abs(_rank_correlations(padded, scored)[0]) < 0.2  # not the ~1 a tied block of 300 would give


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
    for bad in (-1.0, float("nan")):
        with pytest.raises(BayescircError, match=f"threshold={bad}: .* finite number >= 0"):
            stability(table, threshold=[bad], progress=False)
    with pytest.raises(BayescircError, match="no method labels given"):
        stability(table, methods=[], progress=False)


def test_methods_restrict_the_resampled_inputs_and_repeat_once():
    # exact on inputs 0-1, eap on inputs 0-5: analysing exact alone resamples exact's own two inputs
    eap = np.tile(EXACT * 0.9, (3, 1))
    table = pd.concat([scores_table({"exact": EXACT}), scores_table({"eap": eap})])
    alone = stability(scores_table({"exact": EXACT}), bootstrap=20, k=[1, 2], seed=2, progress=False)
    chosen = stability(table, methods=["exact", "exact"], bootstrap=20, k=[1, 2], seed=2, progress=False)
    pd.testing.assert_frame_equal(chosen.bootstrap, alone.bootstrap)
    assert chosen.settings["n_inputs"] == 2


def test_an_empty_selection_is_flagged_on_screen():
    dangling = np.array([[3.0, 0.1, 0.2], [2.5, 0.2, 0.1]])  # top-1 is input->m0, which reaches no logits
    text = stability(scores_table({"exact": dangling}), bootstrap=5, k=[1], progress=False).to_text()
    assert "(empty)" in text and "J = 1 only says every resample chose nothing" in text  # top-1 keeps no path


def test_scores_over_part_of_the_graph_are_warned_about():
    one_layer = pd.DataFrame({"input_id": [0, 0, 1, 1], "edge": ["m0->a1.h0<q>", "m0->a1.h0<k>"] * 2,
                              "method": "exact", "score": [1.0, 2.0, 1.5, 2.5]})
    with pytest.warns(CircuitWarning, match="none of its 2 edges lies on a path"):
        result = stability(one_layer, bootstrap=3, k=[1], progress=False)
    assert "(empty)" in result.to_text()


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
    # full data + 12 resamples (default 20, capped at B), all with the same settings: svi (the default here), one seed
    assert len(calls) == 1 + 12 and all(c == {"inference": "svi", "progress": False, "seed": 2, "draws": 50} for c in calls)
    bayes = result.bootstrap[result.bootstrap.pipeline == "bayesian"].iloc[0]
    # full data: means (1.05, 1, 1.5) -> {C}; the unpruned k = 1 is added to k = 3
    assert bayes.circuit_size == 1 and result.settings["k"] == [1, 3]
    counts = bootstrap_counts(2, 12, seed=2)
    sets = [prune_to_paths([e for e, m in zip(EDGES, EXACT.T @ c / 2) if abs(m) > 1.2]) for c in counts]
    pairs = [len(a & b) / len(a | b) if a | b else 1.0 for i, a in enumerate(sets) for b in sets[i + 1:]]
    assert bayes.jaccard_mean == pytest.approx(np.mean(pairs))
    top1 = result.bootstrap[(result.bootstrap.pipeline == "conventional") & (result.bootstrap.k == 1)].iloc[0]
    assert top1.circuit_size == 1
    head = result.headline()["exact"]["matched"]
    assert head["bayes_jaccard_mean"] == pytest.approx(bayes.jaccard_mean) and head["n_bootstrap"] == 12
    assert "Headline" in result.to_text()


# --- the headline, like-for-like -------------------------------------------------------------------------


class FixedInclusion:
    """A stand-in fit whose posterior mean inclusion is given (two draws averaging to ``mean``)."""

    def __init__(self, edges, mean):
        self.edge_names = list(edges)
        self._draws = np.stack([np.clip(np.asarray(mean) - 0.05, 0, 1), np.clip(np.asarray(mean) + 0.05, 0, 1)])

    def draws(self, var):
        assert var == "inclusion"
        return self._draws


# Two paths to logits: input->m0->logits (A, B) and input->logits (C); D = m0->m1 dangles unless m1->logits.
D, E_ = "m0->m1", "m1->logits"
FIVE = [A, B, C, D, E_]


def test_posterior_circuit_thresholds_the_mean_inclusion_then_prunes():
    index = EdgeIndex.from_edges(FIVE)
    # means: A 0.9, B 0.6, C 0.4, D 0.7, E 0.3 -> {A, B, D} selected; D dangles (m1 reaches no logits) -> {A, B}
    fake = FixedInclusion(FIVE[::-1], [0.3, 0.7, 0.4, 0.6, 0.9])  # edge order of the fit differs from the index
    mask, mean = posterior_circuit(fake, index)
    assert mean == pytest.approx([0.9, 0.6, 0.4, 0.7, 0.3])
    assert [e for e, m in zip(FIVE, mask) if m] == [A, B]


def test_matched_top_k_is_the_smallest_k_whose_pruned_circuit_is_large_enough():
    index = EdgeIndex.from_edges(FIVE)
    # |means| order: D, A, C, B, E. Pruned sizes by k: 1 {D} -> 0; 2 {D, A} -> 0; 3 +C -> 1 ({C});
    # 4 +B -> 3 ({A, B, C}: D = m0->m1 still dangles); 5 +E -> 5 (m1 now reaches logits).
    means = np.array([[2.0, 0.5, 1.0, 3.0, 0.1]] * 4)
    masks, ks = matched_top_k(means, np.array([0, 1, 2, 5]), index)
    assert ks.tolist() == [0, 3, 4, 5]
    assert [sorted(e for e, m in zip(FIVE, row) if m) for row in masks] == [[], [C], sorted([A, B, C]), sorted(FIVE)]
    # the naive reference: scan k upwards and prune with graph.prune_to_paths
    for target, k in zip([0, 1, 2, 5], ks):
        order = sorted(range(5), key=lambda j: -abs(means[0, j]))
        sizes = [len(prune_to_paths([FIVE[j] for j in order[:kk]])) for kk in range(6)]
        assert k == next(kk for kk in range(6) if sizes[kk] >= target)
    # B unscored (NaN, never taken): the most any top-k reaches is 4 ({A, C, D, E}); asking 5 takes all scored edges
    masks, ks = matched_top_k(np.array([[2.0, np.nan, 1.0, 3.0, 0.1]]), [5], index)
    assert ks.tolist() == [4] and masks[0].tolist() == [True, False, True, True, True]


def test_paired_difference_and_jackknife_se_by_hand():
    bayes = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=bool)
    topk = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=bool)
    out = paired_jaccard(bayes, topk)
    # Bayes pairs (0,1)=1, (0,2)=1/2, (1,2)=1/2; top-k pairs all 0 -> differences 1, 1/2, 1/2
    assert out["bayes_jaccard_mean"] == pytest.approx(2 / 3) and out["topk_jaccard_mean"] == 0
    assert out["difference"] == pytest.approx(2 / 3)
    # leave one out: without 0 -> 1/2, without 1 -> 1/2, without 2 -> 1; mean 2/3
    loo = np.array([0.5, 0.5, 1.0])
    assert out["difference_se"] == pytest.approx(np.sqrt(2 / 3 * ((loo - loo.mean()) ** 2).sum()))
    assert np.isnan(paired_jaccard(bayes[:2], topk[:2])["difference_se"])


def inclusion_fitter(calls):
    """Inclusion 0.9 for edges whose mean exact score on the (resampled) data exceeds 1.2, else 0.1."""
    def fitter(frame, **options):
        calls.append(frame)
        means = frame[frame.method == "exact"].groupby("edge")["score"].mean().reindex(EDGES).to_numpy()
        return FixedInclusion(EDGES, np.where(np.abs(means) > 1.2, 0.9, 0.1))
    return fitter


def test_headline_shares_resamples_and_matches_size_after_pruning():
    calls = []
    table = scores_table({"exact": EXACT, "eap": EXACT * np.array([1.0, 1.0, 0.5])})
    result = stability(table, bootstrap=30, bayes=True, bayes_bootstrap=6, fitter=inclusion_fitter(calls),
                       seed=4, progress=False)
    counts = bootstrap_counts(2, 30, seed=4)[:6]  # the headline uses the first 6 of the 30 resamples
    # every Bayesian fit saw exactly that resample's inputs, with multiplicity
    for frame, c in zip(calls[1:], counts):
        assert len(frame) == 3 * 2 * c.sum()  # 3 edges x 2 methods x resampled inputs
        assert frame[frame.method == "exact"].groupby("edge")["score"].mean().reindex(EDGES).to_numpy() == \
            pytest.approx(EXACT.T @ c / c.sum())
    # circuits as masks over the sorted edge names (the order stability uses)
    bayes = np.array([[e in prune_to_paths([x for x, m in zip(EDGES, EXACT.T @ c / 2) if abs(m) > 1.2])
                       for e in sorted(EDGES)] for c in counts])
    for method, values in (("exact", EXACT), ("eap", EXACT * np.array([1.0, 1.0, 0.5]))):
        means = (values.T @ counts.T / 2).T  # [6, 3] in EDGES order
        topk = []
        for row, size in zip(means, bayes.sum(1)):  # naive: smallest k whose pruned top-k is big enough
            order = sorted(range(3), key=lambda j: -abs(row[j]))
            topk.append(next(c for c in (prune_to_paths([EDGES[j] for j in order[:kk]]) for kk in range(4))
                             if len(c) >= size))
        topk = np.array([[e in c for e in sorted(EDGES)] for c in topk])
        assert (topk.sum(1) >= bayes.sum(1)).all()
        expected = paired_jaccard(bayes, topk)
        got = result.headline()[method]["matched"]
        for key in ("bayes_jaccard_mean", "topk_jaccard_mean", "difference", "difference_se"):
            assert got[key] == pytest.approx(expected[key], nan_ok=True), (method, key)
        assert got["n_bootstrap"] == 6 and got["bayes_at_least_as_stable"] == (expected["difference"] >= 0)
    res = result.resamples
    assert sorted(res["resample"].unique()) == list(range(-1, 6))
    assert res[res["resample"] >= 0].in_bayes.to_numpy().reshape(6, 3).tolist() == bayes.tolist()


def test_fixed_variant_keeps_the_full_data_k():
    calls = []
    result = stability(scores_table({"exact": EXACT}), bootstrap=8, bayes=True, bayes_bootstrap=8,
                       fitter=inclusion_fitter(calls), seed=1, progress=False)
    fixed = result.headline()["exact"]["fixed"]
    # full data: means (1.05, 1, 1.5): Bayes {C} (size 1); top-1 = {C} -> k = 1 on every resample
    assert fixed["k"] == 1 and fixed["k_min"] == fixed["k_max"] == 1
    counts = bootstrap_counts(2, 8, seed=1)
    top1 = np.array([[e == EDGES[int(np.argmax(np.abs(EXACT.T @ c)))] and e == C for e in sorted(EDGES)]
                     for c in counts])
    assert fixed["topk_jaccard_mean"] == pytest.approx(paired_jaccard(top1, top1)["bayes_jaccard_mean"])


@pytest.mark.skipif(importlib.util.find_spec("bayescirc.fitting") is None,
                    reason="bayescirc.fitting (the fit) is not on this branch yet; it lands on main separately")
@pytest.mark.slow  # four SVI fits (the Bayesian side's default), mostly JAX compilation
def test_bayesian_side_with_the_real_fit_on_simulated_data():
    from bayescirc.simulation import simulate

    sim = simulate(n_layers=1, n_heads=2, n_inputs=40, n_exact=10, seed=3)
    with warnings.catch_warnings(record=True) as caught:  # fit warnings are summarised once
        warnings.simplefilter("always")
        result = stability(sim.scores, bootstrap=3, bayes=True, progress=False, fit_options={"draws": 100})
    assert len(caught) <= 1
    assert result.settings["fit_options"]["inference"] == "svi"
    assert result.settings["bayes_bootstrap"] == 3 and set(result.headline()) == {"eap", "eap-ig-inputs", "exact"}
    bayes = result.bootstrap[result.bootstrap.pipeline == "bayesian"].iloc[0]
    assert 0 <= bayes.jaccard_mean <= 1
    if bayes.circuit_size > 0:
        assert int(bayes.circuit_size) in result.settings["k"]


def test_fit_warnings_are_summarised_once_and_recorded():
    r_hats = iter(["1.2", "1.3", "1.2", "1.25", "1.2"])

    def warning_fitter(frame, **options):
        warnings.warn(f"max r_hat = {next(r_hats)} > 1.01", RuntimeWarning, stacklevel=2)
        return inclusion_fitter([])(frame, **options)

    with pytest.warns(RuntimeWarning, match=r"5 warnings from the 5 Bayesian fits.*: 5x max r_hat = 1\.2 > 1\.01$") as record:
        result = stability(scores_table({"exact": EXACT}), bootstrap=4, bayes=True, fitter=warning_fitter,
                           progress=False)
    assert len(record) == 1
    assert result.settings["fit_warnings"] == {"max r_hat = 1.2 > 1.01": 3, "max r_hat = 1.3 > 1.01": 1,
                                               "max r_hat = 1.25 > 1.01": 1}


def test_warning_kinds_count_messages_that_differ_only_in_their_figures_together():
    messages = ["prefers student-t (83.7% of 104 edges)", "r_hat 1.2", "prefers student-t (81.7% of 104 edges)",
                "prefers student-t (80% of 110 edges)"]
    assert warning_kinds(messages) == [(3, "prefers student-t (83.7% of 104 edges)"), (1, "r_hat 1.2")]
