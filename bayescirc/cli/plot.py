"""`bayescirc plot`: diagnostic figures of a fit, saved as PNG, SVG or PDF."""

from __future__ import annotations

import click

from ..plots import KINDS


@click.command(name="plot")
@click.argument("fit_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--kind", "-k", type=click.Choice([*KINDS, "all"]), default="all", show_default=True,
              help="Which figure. trace/rank: global parameters per chain; forest: top edges' mean effect with HDIs; "
                   "energy: NUTS energy and divergences; loss: SVI loss curve; ppc: observed per-input scores vs "
                   "posterior predictive draws (needs --scores); decomposition: intrinsic / approximation / "
                   "aggregation variance shares; scatter: exact vs approximate scores with the fitted calibration "
                   "line (needs --scores); circuit: the edge graph weighted by inclusion probability; all: every "
                   "kind this fit supports.")
@click.option("--edges", "-e", multiple=True, metavar="EDGE",
              help="Edge for ppc, scatter and forest, e.g. 'a0.h3->a2.h1<q>'; repeat for several. "
                   "[default: the 3 most probable edges (forest: top 30)]")
@click.option("--scores", "-s", type=click.Path(exists=True), default=None,
              help="The scores.parquet (file or directory of parts) the fit used; needed by ppc and scatter.")
@click.option("--out", "-o", type=click.Path(), default=None,
              help="File to write; its extension (.png, .svg, .pdf) picks the format. With --kind all, or a path "
                   "without extension, a directory that receives KIND.png files. [default: FIT_DIR/plots/]")
@click.option("--threshold", type=float, default=0.1, show_default=True,
              help="circuit: hide edges whose inclusion probability is below this.")
@click.option("--max-edges", type=click.IntRange(min=0), default=60, show_default=True,
              help="circuit: draw at most this many edges (the most probable), plus the median-probability circuit.")
@click.option("--top", type=click.IntRange(min=1), default=30, show_default=True, help="forest: number of edges shown.")
def command(fit_dir, kind, edges, scores, out, threshold, max_edges, top):
    """Draw diagnostic figures of the fit in FIT_DIR (written by `bayescirc fit`).

    Every figure names the model and task in its title and labels its axes in
    the metric's units.

    \b
    Examples:
      bayescirc plot fit/                                  # every figure into fit/plots/
      bayescirc plot fit/ --kind circuit --out circuit.svg
      bayescirc plot fit/ --kind ppc --scores scores.parquet -e 'a9.h9->logits' --out ppc.pdf
    """
    from pathlib import Path

    from ..plots import plot

    out = Path(out) if out else Path(fit_dir) / "plots"
    options = {"circuit": {"threshold": threshold, "max_edges": max_edges}, "forest": {"top": top},
               "all": {"threshold": threshold, "max_edges": max_edges, "top": top}}.get(kind, {})
    result = plot(fit_dir, kind, scores=scores, edges=list(edges) or None, out=out, **options)
    if isinstance(result, dict):
        for name in result:
            click.echo(f"wrote {out / f'{name}.png'}")
    else:
        click.echo(f"wrote {out if out.suffix else out / f'{kind}.png'}")
