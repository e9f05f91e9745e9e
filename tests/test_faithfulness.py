"""Faithfulness arithmetic on hand-computed arrays, and evaluate() end to end with a stand-in patcher."""

import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from fitfixtures import THREE_EDGES, fake_patching, four_draw_fit, make_fit

from bayescirc.circuits import CircuitWarning
from bayescirc.errors import BayescircError
from bayescirc.faithfulness import FaithfulnessWarning, circuit_faithfulness, evaluate, held_out_inputs, interval


def test_ratio_of_means_by_hand():
    values = np.array([[2.0, 4.0], [0.0, 1.0]])
    clean, corrupted = np.array([4.0, 6.0]), np.array([0.0, 2.0])
    # means: circuit 0 -> 3, circuit 1 -> 0.5; clean 5, corrupted 1: (3-1)/4, (0.5-1)/4
    assert circuit_faithfulness(values, clean, corrupted).tolist() == [0.5, -0.125]


def test_mean_of_per_input_ratios_by_hand():
    values = np.array([[2.0, 4.0]])
    clean, corrupted = np.array([4.0, 6.0]), np.array([0.0, 2.0])
    # input 0: 2/4, input 1: 2/4
    assert circuit_faithfulness(values, clean, corrupted, per_input=True).tolist() == [0.5]
    assert circuit_faithfulness(np.array([[4.0, 2.0]]), clean, corrupted, per_input=True).tolist() == [0.5]
    assert circuit_faithfulness(np.array([[3.0, 2.0]]), np.array([4.0, 2.5]), np.array([0.0, 2.0]), per_input=True) == [
        pytest.approx((3 / 4 + 0 / 0.5) / 2)]


def test_full_circuit_is_one_and_empty_is_zero():
    clean, corrupted = np.array([3.0, 1.0, 2.0]), np.array([0.5, -1.0, 0.0])
    assert circuit_faithfulness(np.stack([clean, corrupted]), clean, corrupted).tolist() == [1.0, 0.0]


def test_undefined_faithfulness_is_a_user_error():
    with pytest.raises(BayescircError, match="no effect"):
        circuit_faithfulness(np.ones((1, 2)), np.ones(2), np.ones(2))
    with pytest.raises(BayescircError, match="input 1"):
        circuit_faithfulness(np.ones((1, 2)), np.array([2.0, 1.0]), np.array([0.0, 1.0]), per_input=True)


def test_interval_is_central():
    assert interval(np.arange(101), 0.9) == pytest.approx((5.0, 95.0))


def test_held_out_rows():
    assert held_out_inputs(None, 10, 7) == [7, 8, 9]
    assert held_out_inputs(2, 10, 7) == [7, 8]
    assert held_out_inputs("7:9", 10, 7) == [7, 8]
    assert held_out_inputs([9, 8], 10, 7) == [9, 8]
    with pytest.raises(BayescircError, match="3 left, 5 asked for"):
        held_out_inputs(5, 10, 7)
    with pytest.raises(BayescircError, match="within"):
        held_out_inputs("8:12", 10, 7)


def test_held_out_rows_are_the_ones_the_fit_did_not_see():
    # a fit of the second shard of a task (rows 3-5 of 8) leaves rows 0-2 and 6-7 out of sample
    assert held_out_inputs(None, 8, 3, fitted=[3, 4, 5]) == [0, 1, 2, 6, 7]
    assert held_out_inputs(4, 8, 3, fitted=[3, 4, 5]) == [0, 1, 2, 6]
    with pytest.warns(FaithfulnessWarning, match="2 of the 3 held-out rows were fitted .e.g. row 4"):
        assert held_out_inputs("4:7", 8, 3, fitted=[3, 4, 5]) == [4, 5, 6]


def test_a_noise_sized_denominator_is_warned_about():
    from bayescirc.faithfulness import _warn_small_denominators

    clean, corrupted = np.array([20.0, 19.0, 21.0, 0.1]), np.zeros(4)
    with pytest.warns(FaithfulnessWarning, match="1 held-out input.*row 13.*under 1% of the median"):
        _warn_small_denominators(clean, corrupted, np.array([10, 11, 12, 13]), per_input=True)
    with pytest.warns(FaithfulnessWarning, match="within 2 standard errors of 0"):
        _warn_small_denominators(np.array([1.0, -1.2, 0.9, -0.8]), np.zeros(4), np.arange(4), per_input=False)


@pytest.fixture
def task():
    return pd.DataFrame({"clean": ["a b"] * 14, "corrupted": ["c d"] * 14, "answer": [" x"] * 14,
                         "distractor": [" y"] * 14})


def test_evaluate_batches_distinct_circuits_and_reports_the_posterior(monkeypatch, task):
    calls = []
    monkeypatch.setitem(sys.modules, "bayescirc.patching", fake_patching(calls))
    # four-draw fit: circuits {A,B,C}, {A,B}, {C}, {C} (see fitfixtures); the fit saw 10 inputs
    result = evaluate(four_draw_fit(), "model", task, n_circuits=None, held_out=None, progress=False)
    assert calls[0]["inputs"] == [10, 11, 12, 13]
    assert len(calls[0]["circuits"]) == 3 + 1  # three distinct circuits + the median one, each run once
    # faithfulness = circuit's contribution / 4: {A,B,C} 1, {A,B} 0.5, {C} 0.5
    assert result.circuits.faithfulness.tolist() == [1.0, 0.5, 0.5, 0.5]
    assert result.median_circuit == {"size": 1, "faithfulness": 0.5}
    s = result.summary()["posterior"]
    assert s["mean"] == 0.625 and s["median"] == 0.5
    assert "median-probability circuit (1 edges): 0.500" in result.to_text()


def test_a_model_other_than_the_fits_is_warned_about(monkeypatch, task, tmp_path):
    monkeypatch.setitem(sys.modules, "bayescirc.patching", fake_patching([]))
    fit = four_draw_fit()
    fit.metadata["scores_metadata"] = {"model": "/data/models/induction", "task": "/data/models/induction/task.jsonl"}
    with pytest.warns(FaithfulnessWarning, match="collected with model '/data/models/induction', but this evaluation "
                                                  "uses 'models/ioi-toy'"):
        evaluate(fit, "models/ioi-toy", task, n_circuits=2, held_out=None, progress=False)
    evaluate(fit, tmp_path / "induction", task, n_circuits=2, held_out=None, progress=False)  # moved: no warning
    task_file = tmp_path / "other.jsonl"
    task.to_json(task_file, orient="records", lines=True)
    with pytest.warns(FaithfulnessWarning, match="collected with task '/data/models/induction/task.jsonl'"):
        evaluate(fit, tmp_path / "induction", task_file, n_circuits=2, held_out=None, progress=False)


def test_a_dangling_edge_is_warned_about_once(monkeypatch, task):
    monkeypatch.setitem(sys.modules, "bayescirc.patching", fake_patching([]))
    fit = make_fit(THREE_EDGES + ("m0->a1.h0<q>",), inclusion=np.ones((4, 4)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(fit, "model", task, n_circuits=2, held_out=None, progress=False)
    circuit_warnings = [w for w in caught if issubclass(w.category, CircuitWarning)]
    assert len(circuit_warnings) == 1 and "'m0->a1.h0<q>'" in str(circuit_warnings[0].message)


def test_the_median_circuit_is_the_whole_posteriors_and_bad_settings_fail_before_any_run(monkeypatch, task):
    calls = []
    monkeypatch.setitem(sys.modules, "bayescirc.patching", fake_patching(calls))
    fit = four_draw_fit()  # whole posterior: median circuit {C} (C in 3 of 4 pruned draws)
    for seed in range(5):  # whatever two draws the n=2 sample holds
        assert evaluate(fit, "model", task, n_circuits=2, seed=seed, progress=False).median_circuit["size"] == 1
    calls.clear()
    with pytest.raises(BayescircError, match="interval probability 90"):
        evaluate(fit, "model", task, interval_prob=90, progress=False)
    with pytest.raises(BayescircError, match="unknown metric 'foo'"):
        evaluate(fit, "model", task, metric="foo", progress=False)
    assert calls == []


def test_evaluate_without_patching_says_what_is_missing(monkeypatch, task):
    monkeypatch.setitem(sys.modules, "bayescirc.patching", None)
    with pytest.raises(BayescircError, match="bayescirc.patching"):
        evaluate(four_draw_fit(), "model", task, progress=False)
