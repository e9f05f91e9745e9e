"""Posterior circuits: sampling rules, pruning, and every summary checked against hand-computed values."""

import numpy as np
import pytest
from fitfixtures import THREE_EDGES, A, B, C, four_draw_fit, make_fit

from bayescirc.circuits import CircuitWarning, EdgeIndex, jaccard_matrix, parse_rule, prune_masks, sample_circuits
from bayescirc.errors import BayescircError
from bayescirc.graph import Graph, prune_to_paths

# --- pruning -------------------------------------------------------------------------------------------


def test_vectorised_pruning_equals_prune_to_paths_on_random_circuits(rng):
    graph = Graph(3, 2)
    edges = list(graph.edges)
    masks = rng.random((300, len(edges))) < rng.uniform(0.02, 0.6, size=(300, 1))
    pruned = prune_masks(masks, edges)
    for row, kept in zip(masks, pruned):
        expected = prune_to_paths([e for e, m in zip(edges, row) if m])
        assert {e for e, m in zip(edges, kept) if m} == expected


def test_pruning_drops_a_dangling_edge_and_keeps_a_path():
    index = EdgeIndex.from_edges(THREE_EDGES)
    got = index.prune(np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=bool))
    assert got.tolist() == [[False, False, True], [True, True, False], [False, False, False]]


def test_pruning_refuses_names_outside_the_graph_syntax():
    with pytest.raises(BayescircError, match="'foo'"):
        EdgeIndex.from_edges(["foo"])


# --- rules -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, parsed", [("slab", ("slab", None)), ("topk:3", ("topk", 3)),
                                          ("threshold:0.25", ("threshold", 0.25)), ("TopK:0", ("topk", 0))])
def test_rules_parse(rule, parsed):
    assert parse_rule(rule) == parsed


@pytest.mark.parametrize("rule", ["topk", "topk:-1", "topk:1.5", "threshold:-0.1", "threshold:x", "mcmc", "slab:1"])
def test_bad_rules_name_the_valid_ones(rule):
    with pytest.raises(BayescircError, match="topk:K"):
        parse_rule(rule)


# --- summaries on the four-draw fit ------------------------------------------------------------------------


@pytest.fixture
def four():
    return sample_circuits(four_draw_fit(), rule="slab", seed=0)


def test_indicators_are_the_pruned_draws(four):
    assert four.indicators.astype(int).tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 1], [0, 0, 1]]
    assert four.draws.tolist() == [0, 1, 2, 3]


def test_frequencies_after_pruning(four):
    assert four.frequency.to_dict() == {A: 0.5, B: 0.5, C: 0.75}


def test_tidy_table_lists_each_circuits_edges(four):
    table = four.table()
    assert list(table.columns) == ["circuit", "draw", "edge"]
    assert len(table) == 3 + 2 + 1 + 1
    assert set(table.loc[table.circuit == 1, "edge"]) == {A, B}


def test_median_circuit_is_edges_above_one_half(four):
    assert four.median_circuit() == {C}


def test_credible_core(four):
    assert four.credible_core(0.95) == set()
    assert four.credible_core(0.75) == {C}
    assert four.credible_core(0.5) == {A, B, C}


def test_credible_superset_by_hand(four):
    # weakest frequency per circuit: 0.5, 0.5, 0.75, 0.75
    assert four.superset_threshold(0.95) == 0.5 and four.credible_superset(0.95) == {A, B, C}
    assert four.superset_threshold(0.5) == 0.75 and four.credible_superset(0.5) == {C}
    assert four.coverage({C}) == 0.5 and four.coverage({A, B, C}) == 1.0


def test_size_posterior(four):
    size = four.size_posterior()
    assert size["mean"] == 1.75 and size["median"] == 1.5 and (size["min"], size["max"]) == (1, 3)
    assert four.size_distribution().to_dict() == {1: 0.5, 2: 0.25, 3: 0.25}


def test_expected_jaccard_is_the_mean_over_pairs(four):
    # J01 = 2/3, J02 = J03 = 1/3, J12 = J13 = 0, J23 = 1
    assert four.expected_jaccard() == pytest.approx(7 / 18)


def test_top_circuits_with_probabilities(four):
    top = four.top_circuits(3)
    assert top.probability.tolist() == [0.5, 0.25, 0.25]
    assert [set(e) for e in top.edges] == [{C}, {A, B, C}, {A, B}]
    assert four.n_distinct() == 3


def test_summary_and_text(four):
    s = four.summary()
    assert s["median_circuit_size"] == 1 and s["credible_superset_size"] == 3 and s["n_circuits"] == 4
    assert s["expected_jaccard"] == pytest.approx(7 / 18)
    text = four.to_text()
    assert "median-probability circuit: 1 edges" in text and len(text.splitlines()) < 25


def test_edge_table_flags(four):
    table = four.edge_table().set_index("edge")
    assert table.loc[C, "in_median"] and not table.loc[A, "in_median"]
    assert table["in_superset"].all()
    assert not table["in_core"].any()  # no edge is in 95% of the four circuits
    at_half = four.edge_table(prob=0.5).set_index("edge")  # core and superset at the probability asked for
    assert set(at_half.index[at_half["in_core"]]) == four.credible_core(0.5) == {A, B, C}


def test_jaccard_of_two_empty_circuits_is_one():
    assert jaccard_matrix(np.zeros((2, 3), bool)).tolist() == [[1.0, 1.0], [1.0, 1.0]]


# --- Bernoulli sampling, rules on mu --------------------------------------------------------------------


def test_slab_frequencies_match_the_product_of_chain_probabilities():
    # A and B form the only path through m0: both survive pruning with probability p_A * p_B.
    inclusion = np.tile([0.8, 0.5, 0.3], (4000, 1))
    samples = sample_circuits(make_fit(THREE_EDGES, inclusion=inclusion, chains=2), seed=1)
    freq = samples.frequency
    se = np.sqrt(0.4 * 0.6 / 4000)
    assert abs(freq[A] - 0.4) < 4 * se and abs(freq[B] - 0.4) < 4 * se
    assert abs(freq[C] - 0.3) < 4 * np.sqrt(0.21 / 4000)


def test_same_seed_same_circuits_and_n_resamples_draws():
    fit = make_fit(THREE_EDGES, inclusion=np.full((50, 3), 0.5))
    a, b = sample_circuits(fit, n=200, seed=3), sample_circuits(fit, n=200, seed=3)
    assert np.array_equal(a.indicators, b.indicators) and a.n_circuits == 200
    assert a.draws.max() < 50


def test_topk_and_threshold_rules_on_mu():
    mu = np.array([[3.0, 0.1, -2.0], [0.5, 0.4, -0.1], [1.0, -1.0, 0.0]])
    fit = make_fit(THREE_EDGES, mu=mu)
    top1 = sample_circuits(fit, rule="topk:1")
    # draw 0: A alone dangles -> empty; draw 1: A -> empty; draw 2: tie |1| = |-1|, one of A/B -> empty
    assert top1.sizes.tolist() == [0, 0, 0]
    top2 = sample_circuits(fit, rule="topk:2")
    assert top2.indicators.astype(int).tolist() == [[0, 0, 1], [1, 1, 0], [1, 1, 0]]
    thr = sample_circuits(fit, rule="threshold:0.45")
    assert thr.indicators.astype(int).tolist() == [[0, 0, 1], [0, 0, 0], [1, 1, 0]]
    assert thr.rule == "threshold:0.45"


def test_rules_on_mu_compare_at_full_precision():
    just_above = make_fit(THREE_EDGES, mu=np.array([[0.0, 0.0, 0.1 + 1e-9]]))  # float32 would round it to 0.1
    assert sample_circuits(just_above, rule="threshold:0.1").indicators.tolist() == [[False, False, True]]
    near_tie = make_fit(THREE_EDGES, mu=np.array([[1.0, 0.0, 1.0 + 1e-9]]))
    assert sample_circuits(near_tie, rule="topk:1").indicators.tolist() == [[False, False, True]]


def test_fit_method_and_directory_give_the_same_circuits(tmp_path):
    fit = four_draw_fit()
    fit.save(tmp_path / "fit")
    from_dir = sample_circuits(tmp_path / "fit")
    assert np.array_equal(fit.sample_circuits().indicators, from_dir.indicators)


def test_bad_inputs_are_user_errors():
    fit = four_draw_fit()
    with pytest.raises(BayescircError, match="at least 1"):
        sample_circuits(fit, n=0)
    with pytest.raises(BayescircError, match="outside"):
        sample_circuits(make_fit(THREE_EDGES, inclusion=np.full((2, 3), 1.5)))
    with pytest.raises(BayescircError, match=r"NaN or infinite for 1 edge\(s\), e.g. \['input->logits'\]"):
        sample_circuits(make_fit(THREE_EDGES, inclusion=np.array([[1.0, 1.0, np.nan]] * 2)))
    with pytest.raises(BayescircError, match="'input->m0' appears more than once"):
        sample_circuits(make_fit((A, B, A), inclusion=np.ones((2, 3))))


def test_a_fit_over_part_of_the_graph_is_refused_or_warned_about(tmp_path):
    # one layer's edges alone hold no input->logits path: every circuit would be empty
    layer = ("m0->a1.h0<q>", "m0->a1.h0<k>")
    fit = make_fit(layer, inclusion=np.ones((4, 2)))
    with pytest.raises(BayescircError, match=r"none of its 2 edges lies on a path from 'input' to 'logits'"):
        sample_circuits(fit)
    fit.save(tmp_path / "fit")
    with pytest.raises(BayescircError, match="^" + str(tmp_path / "fit")):
        sample_circuits(tmp_path / "fit")
    # a dangling edge beside a path: named, and never in a circuit
    with pytest.warns(CircuitWarning, match=r"1 of its 4 edges lie on no path .* \(e.g. 'm0->a1.h0<q>'\)"):
        samples = sample_circuits(make_fit(THREE_EDGES + layer[:1], inclusion=np.ones((4, 4))))
    assert samples.frequency.tolist() == [1.0, 1.0, 1.0, 0.0]
