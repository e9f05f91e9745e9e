"""`bayescirc plot` and `bayescirc report` from the command line, on a saved fit directory."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from fit_fixture import make_fit, make_simulation
from PIL import Image

from bayescirc.cli import cli
from bayescirc.plots import KINDS
from bayescirc.scores import write_scores


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    sim = make_simulation()
    make_fit(sim).save(root / "fit")
    make_fit(sim, inference="svi").save(root / "svi-fit")
    write_scores(sim.scores, root / "scores.parquet")
    return root


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("kind", KINDS)
def test_plot_each_kind_writes_a_non_trivial_png(run_dir, kind, tmp_path):
    fit = run_dir / ("svi-fit" if kind == "loss" else "fit")
    out = tmp_path / f"{kind}.png"
    result = _invoke("plot", fit, "--kind", kind, "--scores", run_dir / "scores.parquet", "--out", out)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    image = Image.open(out)
    assert image.width > 400 and image.height > 300
    assert len(set(image.convert("L").getdata())) > 20  # far from a blank canvas


def test_plot_all_defaults_to_the_fit_directory(run_dir):
    result = _invoke("plot", run_dir / "fit")
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (run_dir / "fit" / "plots").iterdir())
    assert written == sorted(f"{k}.png" for k in ("trace", "rank", "forest", "energy", "decomposition", "circuit"))


def test_plot_svg_and_pdf_and_chosen_edges(run_dir, tmp_path):
    edge = "m1->logits"
    for ext, magic in ((".svg", b"<?xml"), (".pdf", b"%PDF")):
        out = tmp_path / f"scatter{ext}"
        result = _invoke("plot", run_dir / "fit", "-k", "scatter", "-s", run_dir / "scores.parquet", "-e", edge, "-o", out)
        assert result.exit_code == 0, result.output
        assert out.read_bytes().startswith(magic)
    assert edge.replace(">", "&gt;") in (tmp_path / "scatter.svg").read_text()  # text kept as text


def test_plot_user_errors_exit_2_with_one_line(run_dir, tmp_path):
    result = CliRunner().invoke(cli, ["plot", str(run_dir / "fit"), "-k", "ppc", "-o", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and "--scores" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["plot", str(run_dir / "fit"), "-k", "energy"])
    assert result.exit_code == 0  # NUTS fit has an energy plot
    result = CliRunner().invoke(cli, ["plot", str(run_dir / "svi-fit"), "-k", "energy", "-o", str(tmp_path / "e.png")])
    assert result.exit_code == 2 and "NUTS" in result.output
    result = CliRunner().invoke(cli, ["plot", str(tmp_path), "-k", "forest"])
    assert result.exit_code == 2 and "not a fit directory" in result.output


def test_report_command_writes_html_and_says_how_diagnostics_went(run_dir, tmp_path):
    out = tmp_path / "report.html"
    result = _invoke("report", run_dir / "fit", "--out", out, "--scores", run_dir / "scores.parquet")
    assert result.exit_code == 0, result.output
    assert "diagnostics pass" in result.output
    n_warnings = len(json.loads((run_dir / "fit" / "summary.json").read_text())["diagnostics"]["warnings"])
    assert (f"{n_warnings} fit warning(s): see the report" in result.output) == (n_warnings > 0)
    page = out.read_text()
    assert page.count("<img ") == 8 and "id='ppc'" in page
    assert (f"The fit gave {n_warnings} warning(s), below." in page) == (n_warnings > 0)


def test_help_teaches_the_options():
    text = _invoke("plot", "--help").output
    for word in ("trace", "circuit", "--scores", "--edges", ".svg", "median-probability", "[default"):
        assert word in text
    text = _invoke("report", "--help").output
    for word in ("--stability", "--scores", "R-hat", "report.html"):
        assert word in text
