"""The one-command demo: collect -> fit -> circuits -> report on the shipped IOI model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bayescirc.cli import cli
from bayescirc.errors import BayescircError
from bayescirc.pipeline import demo

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_MODULES = ("bayescirc.collection", "bayescirc.fitting", "bayescirc.circuits", "bayescirc.export")


def test_sizes_are_checked_before_any_work(tmp_path):
    with pytest.raises(BayescircError, match="exact_inputs"):
        demo(tmp_path / "out", n_inputs=10, exact_inputs=20, echo=None)
    with pytest.raises(BayescircError, match="task.jsonl"):
        demo(tmp_path / "out", model=tmp_path, echo=None)


def test_a_missing_model_directory_is_named_as_such_before_any_stage(tmp_path):
    said = []
    for task in (None, tmp_path / "task.jsonl"):
        with pytest.raises(BayescircError, match="nomodel: no such model directory"):
            demo(tmp_path / "out", model=str(tmp_path / "nomodel"), task=task, echo=said.append)
    assert said == [] and not (tmp_path / "out").exists()


def test_demo_help_teaches_the_equivalent_commands():
    text = CliRunner().invoke(cli, ["demo", "--help"]).output
    for word in ("--n-inputs", "--exact-inputs", "--draws", "--inference", "bayescirc collect", "bayescirc fit",
                 "bayescirc report", "ioi-toy"):
        assert word in text


def _user_env() -> dict:
    """The environment a user runs in: this checkout importable, without the test harness's forced JAX devices."""
    env = dict(os.environ)
    if env.get("XLA_FLAGS") == "--xla_force_host_platform_device_count=2":  # set by tests/conftest.py
        env.pop("XLA_FLAGS")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
@pytest.mark.tl
def test_demo_command_runs_the_pipeline_and_says_where_things_are(tmp_path):
    missing = [m for m in PIPELINE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing} (not on this branch)")
    out = tmp_path / "demo"
    # smaller is not faster: with 24 inputs and 150 warm-up draws NUTS took 135-290 leapfrog steps per draw
    # (165 s in all), with 60 inputs and 300 warm-up draws 31 (125 s)
    proc = subprocess.run([sys.executable, "-m", "bayescirc", "demo", "--out", str(out), "--n-inputs", "60",
                           "--exact-inputs", "20", "--draws", "300", "--no-progress"],
                          env=_user_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Loading weights" not in proc.stderr  # --no-progress reaches the Hugging Face loader too
    for name in ("scores.parquet", "report.html", "circuit.json", "fit/summary.json"):
        assert (out / name).stat().st_size > 0
    assert f"report:  {(out / 'report.html').resolve()}" in proc.stdout
    assert f"circuit: {(out / 'circuit.json').resolve()}" in proc.stdout
    for stage in ("[1/4] collect", "[2/4] fit", "[3/4] circuits", "[4/4] report"):
        assert stage in proc.stdout
    assert "[2/4] fit: hierarchical model, NUTS 2 chains x 300 draws" in proc.stdout  # what auto chose for 110 edges
    data = json.loads((out / "circuit.json").read_text())
    assert data["cfg"] == {"n_layers": 2, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 128}  # ioi-toy's
    circuit = {e for e, v in data["edges"].items() if v["in_graph"]}
    assert f"median-probability circuit: {len(circuit)} of " in proc.stdout
    assert (out / "report.html").read_text().count("<img ") >= 6
