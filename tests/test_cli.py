"""The command line: discoverable, and user errors exit 2 with one clear line."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from bayescirc.cli import COMMANDS, cli


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_every_available_command_with_its_purpose():
    result = run("--help")
    assert result.exit_code == 0
    for name in ("simulate", "inspect"):
        assert name in result.output and COMMANDS[name][:30] in " ".join(result.output.split())


def test_every_command_has_help():
    for name in cli.list_commands(None):
        result = run(name, "--help")
        assert result.exit_code == 0, name
        assert "Usage:" in result.output


@pytest.mark.parametrize("name", ["collect", "fit", "simulate", "stability", "evaluate", "demo"])
def test_every_command_with_progress_bars_takes_the_same_quiet_flags(name):
    """`-q` and `--quiet` silence the progress bars of every long-running command alike."""
    options = [p for p in cli.get_command(None, name).params if "--quiet" in p.opts]
    assert len(options) == 1 and "-q" in options[0].opts, name


def test_simulate_then_inspect(tmp_path):
    out = tmp_path / "sim.parquet"
    result = run("simulate", "--out", str(out), "--layers", "1", "--heads", "2", "--inputs", "12",
                 "--exact-inputs", "4", "--method", "eap:scale=0.5,noise_sd=0.1", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert out.exists() and (tmp_path / "sim.truth.parquet").exists()
    summary = json.loads(run("inspect", str(out), "--json").output)
    assert summary["inputs"] == 12 and summary["edges"] == 13
    assert summary["methods"]["exact"]["inputs"] == 4 and summary["methods"]["eap"]["rows"] == 12 * 13
    assert summary["metadata"]["seed"] == 7


def test_simulate_sets_a_method_error_for_one_edge_type(tmp_path):
    from bayescirc.simulation import read_truth

    out = tmp_path / "sim.parquet"
    result = run("simulate", "--out", str(out), "--layers", "1", "--heads", "2", "--inputs", "4",
                 "--method", "eap:scale=0.5,input->attn<q>.scale=0.05,input->attn<q>.noise_sd=0")
    assert result.exit_code == 0, result.output
    eap = read_truth(tmp_path / "sim.truth.parquet")[1].methods["eap"]
    assert eap.scale == 0.5 and eap.by_edge_type == {"input->attn<q>": {"scale": 0.05, "noise_sd": 0.0}}


def test_bad_scores_file_exits_2_without_traceback(tmp_path):
    (tmp_path / "bad.parquet").write_text("nope")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "bad.parquet")])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output


def test_bad_option_is_a_usage_error(tmp_path):
    for spec in ("eap:slope=2", "eap:input->attn<q>.slope=2", "eap:input->attn<q>.noise_sd=-1"):
        result = CliRunner().invoke(cli, ["simulate", "--out", str(tmp_path / "x.parquet"), "--method", spec])
        assert result.exit_code == 2 and "--method" in result.output, spec
        assert not (tmp_path / "x.parquet").exists()


@pytest.mark.slow
def test_module_entry_point_runs_in_a_fresh_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bayescirc", "--help"], capture_output=True, text=True, check=True)
    assert "Commands" in done.stdout
