"""The HTML report: self-contained, flags diagnostics by the stated rules, shows what was given."""

from __future__ import annotations

import json
import re

import pytest
from fit_fixture import make_fit, make_simulation

from bayescirc import reporting
from bayescirc.errors import BayescircError


@pytest.fixture(scope="module")
def sim():
    return make_simulation()


def _summary(**diag):
    base = {"max_r_hat": 1.0, "min_ess_bulk": 1000.0, "min_ess_tail": 1000.0, "divergences": 0}
    return {"inference": "nuts", "diagnostics": {**base, **diag}}


def _status(checks, name):
    return next(c.status for c in checks if c.name == name)


@pytest.mark.parametrize("r_hat,status", [(1.0, "pass"), (1.01, "pass"), (1.0101, "warn"), (1.2, "warn")])
def test_r_hat_rule(r_hat, status):
    assert _status(reporting.diagnostic_checks(_summary(max_r_hat=r_hat)), "max R-hat") == status


@pytest.mark.parametrize("ess,status", [(400, "pass"), (399.9, "warn"), (5000, "pass")])
def test_ess_rule_applies_to_bulk_and_tail(ess, status):
    checks = reporting.diagnostic_checks(_summary(min_ess_bulk=ess, min_ess_tail=ess))
    assert _status(checks, "min bulk ESS") == _status(checks, "min tail ESS") == status


@pytest.mark.parametrize("n,status", [(0, "pass"), (1, "warn"), (37, "warn")])
def test_divergence_rule(n, status):
    assert _status(reporting.diagnostic_checks(_summary(divergences=n)), "divergent transitions") == status


def test_svi_has_no_chain_diagnostics_and_judges_its_loss():
    flat = {"inference": "svi", "diagnostics": {"svi_loss": [100.0] * 50 + [10.0] * 50, "svi_final_loss": 10.0}}
    checks = reporting.diagnostic_checks(flat)
    assert {c.status for c in checks if c.name != "SVI final loss"} == {"n/a"}
    assert _status(checks, "SVI final loss") == "pass"
    still_falling = {"inference": "svi", "diagnostics": {"svi_loss": list(range(200, 100, -1)), "svi_final_loss": 101.0}}
    assert _status(reporting.diagnostic_checks(still_falling), "SVI final loss") == "warn"


def test_report_is_self_contained_and_has_every_section(tmp_path, sim):
    fit = make_fit(sim, divergences=3)
    stability = {"bootstrap": {"bayesian": {"jaccard_mean": 0.83}, "conventional": {"jaccard_mean": 0.41}},
                 "methods": [{"a": "eap", "b": "eap-ig-inputs", "jaccard": 0.55}]}
    out = reporting.report(fit, tmp_path / "r.html", scores=sim.scores, stability=stability)
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    for anchor in ("run", "diagnostics", "decomposition", "edges", "circuit", "ppc", "stability"):
        assert f"id='{anchor}'" in page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources)
    assert not re.search(r"https?://", page)
    assert page.count("<img ") == 8
    # diagnostics flagged: three pass, divergences warn
    assert page.count("✔ pass") == 3 and page.count("⚠ warn") == 1
    # top-edge table lists the most probable edge, stability numbers appear
    top = fit.edges.sort_values("inclusion_prob", ascending=False)["edge"].iloc[0]
    assert top.replace(">", "&gt;").replace("<", "&lt;") in page
    assert "0.83" in page and "0.41" in page and "eap-ig-inputs" in page
    assert "ioi-toy" in re.search(r"<title>(.*?)</title>", page).group(1)


def test_report_from_a_fit_directory_and_a_stability_file(tmp_path, sim):
    fit = make_fit(sim, inference="svi")
    fit.save(tmp_path / "fit")
    (tmp_path / "stability").mkdir()
    (tmp_path / "stability" / "stability.json").write_text(json.dumps({"n_boot": 50, "jaccard_mean": 0.7}))
    page = reporting.report(tmp_path / "fit", tmp_path / "r.html", stability=tmp_path / "stability").read_text()
    assert "0.7" in page and "n_boot" in page
    assert "SVI loss" in page or "svi" in page.lower()
    assert page.count("<img ") == 6  # trace, rank, loss, decomposition, forest, circuit
    assert "id='ppc'" not in page
    assert "they check nothing here" in page and "mean the chains agree" not in page  # SVI draws are independent


def test_bad_stability_file_is_a_user_error_and_writes_nothing(tmp_path, sim):
    fit = make_fit(sim)
    bad = tmp_path / "stab.json"
    bad.write_text("{not json")
    with pytest.raises(BayescircError, match="stab.json"):
        reporting.report(fit, tmp_path / "r.html", stability=bad)
    with pytest.raises(BayescircError, match="no such stability file"):
        reporting.report(fit, tmp_path / "r.html", stability=tmp_path / "missing.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stab.json"]
