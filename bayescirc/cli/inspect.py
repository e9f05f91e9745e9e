"""`bayescirc inspect`: validate and summarise a scores file."""

from __future__ import annotations

import click

from .._io import strict_json
from ..scores import scores_summary


@click.command(name="inspect")
@click.argument("scores", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def command(scores, as_json):
    """Validate SCORES (a scores.parquet file or a directory of parts) and summarise it.

    Exits with status 2 and a message naming the file, column and row when the
    file breaks the schema (see README, "scores.parquet").
    """
    summary = scores_summary(scores)
    if as_json:
        click.echo(strict_json(summary, indent=2, default=str))
        return
    meta = summary["metadata"]
    click.echo(f"{summary['path']}: {summary['rows']:,} rows, {summary['inputs']:,} inputs, {summary['edges']:,} edges")
    for key in ("model", "task", "metric", "sign_convention", "package_version"):
        if key in meta:
            click.echo(f"  {key}: {meta[key]}")
    click.echo(f"  {'method':<28}{'inputs':>8}{'edges':>9}{'rows':>12}{'mean |edge mean|':>18}")
    for name, m in summary["methods"].items():
        click.echo(f"  {name:<28}{m['inputs']:>8,}{m['edges']:>9,}{m['rows']:>12,}{m['mean_abs_edge_mean']:>18.4g}")
