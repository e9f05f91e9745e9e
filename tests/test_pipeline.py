"""The one-command demo: collect -> fit -> circuits -> report on the shipped IOI model."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from bayescirc.cli import cli
from bayescirc.errors import BayescircError
from bayescirc.pipeline import demo

PIPELINE_MODULES = ("bayescirc.collection", "bayescirc.fitting", "bayescirc.circuits", "bayescirc.export")


def test_sizes_are_checked_before_any_work(tmp_path):
    with pytest.raises(BayescircError, match="exact_inputs"):
        demo(tmp_path / "out", n_inputs=10, exact_inputs=20, echo=None)
    with pytest.raises(BayescircError, match="task.jsonl"):
        demo(tmp_path / "out", model=tmp_path, echo=None)


def test_demo_help_teaches_the_equivalent_commands():
    text = CliRunner().invoke(cli, ["demo", "--help"]).output
    for word in ("--n-inputs", "--exact-inputs", "--draws", "bayescirc collect", "bayescirc fit", "bayescirc report",
                 "ioi-toy"):
        assert word in text


@pytest.mark.slow
@pytest.mark.tl
def test_demo_runs_the_pipeline_and_says_where_things_are(tmp_path):
    missing = [m for m in PIPELINE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing} (not on this branch)")
    lines = []
    result = demo(tmp_path / "demo", n_inputs=24, exact_inputs=8, draws=150, progress=False, echo=lines.append)
    for path in (result.scores, result.report, result.circuit_json):
        assert path.exists() and path.stat().st_size > 0
    assert (result.fit_dir / "summary.json").exists()
    text = "\n".join(lines)
    assert str(result.report.resolve()) in text and str(result.circuit_json.resolve()) in text
    data = json.loads(result.circuit_json.read_text())
    assert {e for e, v in data["edges"].items() if v["in_graph"]} == set(result.circuit)
    assert result.report.read_text().count("<img ") >= 6
    assert set(result.timings) == {"collect", "fit", "circuits", "report"}
