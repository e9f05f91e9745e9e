"""On real collected scores (the shipped ioi-toy model): exact scores on 20% of the inputs plus approximations on
all, and the fit's intervals for each edge against its exact all-input mean (fast version of
benchmarks/coverage_real.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from bayescirc.bridge import shipped_model
from bayescirc.collection import collect
from bayescirc.fitting import FitWarning, fit


@pytest.fixture(scope="module")
def all_exact():
    model = shipped_model("ioi-toy")
    return collect(model, Path(model) / "task.jsonl", n_inputs=60, exact_inputs=60, device="cpu", progress=False)


def test_slab_intervals_cover_the_exact_all_input_means_for_most_edges(all_exact):
    exact = all_exact[all_exact["method"] == "exact"]
    by_edge = exact.groupby("edge", observed=True)["score"]
    target, se = by_edge.mean(), by_edge.std() / np.sqrt(by_edge.count())
    sub = all_exact[(all_exact["method"] != "exact") | (all_exact["input_id"] < 12)].reset_index(drop=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        res = fit(sub, inference="svi", chains=1, draws=300, svi_steps=1000, progress=False)
    e = res.edges.set_index("edge")
    t, s = target.reindex(e.index), se.reindex(e.index)
    miss = np.maximum(0, np.maximum(e["slab_hdi_low"] - t, t - e["slab_hdi_high"]))
    assert (miss <= 2 * s).mean() >= 0.9  # within 2 SE of the target, itself an estimate
    assert ((e["slab_hdi_low"] <= t) & (t <= e["slab_hdi_high"])).mean() >= 0.7
