"""`bayescirc report`: one self-contained HTML report of a fit."""

from __future__ import annotations

import click


@click.command(name="report")
@click.argument("fit_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", type=click.Path(dir_okay=False), default="report.html", show_default=True,
              help="HTML file to write (images embedded: open it offline, mail it, archive it).")
@click.option("--scores", "-s", type=click.Path(exists=True), default=None,
              help="The scores.parquet the fit used: adds posterior predictive checks and the exact-vs-approximate "
                   "scatter of the most probable edges.")
@click.option("--stability", type=click.Path(exists=True), default=None,
              help="The output of `bayescirc stability SCORES --out DIR`: DIR or DIR/stability.json. "
                   "Adds the stability summary.")
@click.option("--top", type=int, default=30, show_default=True, help="Edges in the top-edge table and forest plot.")
def command(fit_dir, out, scores, stability, top):
    """Write one HTML report of the fit in FIT_DIR: run metadata, diagnostics with
    pass/warn flags (R-hat <= 1.01, ESS >= 400, no divergences), the variance
    decomposition, the top edges, the circuit graph and, when given, the
    per-input checks and the stability summary.

    \b
    Example:
      bayescirc report fit/ --scores scores.parquet --out report.html
    """
    from ..posterior import load_fit
    from ..reporting import diagnostic_checks, fit_warnings, report

    fit = load_fit(fit_dir)
    path = report(fit, out, scores=scores, stability=stability, top=top)
    warns = [c.name for c in diagnostic_checks(fit.summary) if c.status == "warn"]
    n_fit = len(fit_warnings(fit.summary))
    also = f", {n_fit} fit warning(s): see the report" if n_fit else ""
    click.echo(f"wrote {path}" + (f" (diagnostics warn: {', '.join(warns)}{also})" if warns else
                                  f" (diagnostics pass{also})"))
