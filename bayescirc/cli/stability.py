"""`bayescirc stability`: how stable circuits are under input resampling, across methods and k."""

from __future__ import annotations

from pathlib import Path

import click

from . import folder


@click.command(name="stability")
@click.argument("scores", type=click.Path())
@click.option("--bootstrap", "-B", default=100, show_default=True,
              help="Number of bootstrap resamples of the inputs (the same resamples for every method).")
@click.option("--k", "ks", type=int, multiple=True,
              help="Circuit size for top-k on |mean score|; repeat for several. [default: 1%, 5% and 10% of the edges]")
@click.option("--threshold", "thresholds", type=float, multiple=True,
              help="Also select edges with |mean score| > D (metric units); repeat for several.")
@click.option("--methods", default=None, metavar="M1,M2,...",
              help="Comma-separated method labels to analyse, e.g. 'eap,eap-ig-inputs:steps=5'. [default: all in the file]")
@click.option("--bayes/--no-bayes", default=False, show_default=True,
              help="Also fit the hierarchical model on the full data and on each of the first --bayes-bootstrap "
                   "resamples (same fit settings) and compare its median-probability circuit "
                   "with top-k at the same size after pruning, on the same resamples (the headline: paired "
                   "difference of mean Jaccard with a jackknife SE). One fit per resample: slow.")
@click.option("--bayes-bootstrap", type=int, default=None,
              help="Resamples for the Bayesian side and the headline (the first ones of --bootstrap, shared with "
                   "top-k). [default: 20, at most --bootstrap]")
@click.option("--fit-draws", type=int, default=None, help="Posterior draws per chain of every Bayesian fit. [default: the fit's, 1000]")
@click.option("--fit-chains", type=int, default=None,
              help="Chains of every Bayesian fit (SVI: chains x draws samples). [default: the fit's, 2]")
@click.option("--fit-inference", type=click.Choice(["auto", "nuts", "svi"]), default="svi", show_default=True,
              help="Inference of every Bayesian fit. svi: on ioi-toy and simulated scores the same circuits as NUTS "
                   "2 x 500 (inclusion within 0.04) at 1/12 of the time, and there is one fit per resample; nuts: "
                   "the reference posterior (~1-2 min per 110-edge fit on 2 cores); auto: NUTS up to 5,000 edges "
                   "as bayescirc fit does.")
@click.option("--fit-error-pooling", type=click.Choice(["type", "method"]), default=None,
              help="--error-pooling of every Bayesian fit (see bayescirc fit --help). [default: the fit's, type]")
@click.option("--fit-approx-only", type=click.Choice(["auto", "full", "mean"]), default=None,
              help="--approx-only of every Bayesian fit (see bayescirc fit --help). [default: the fit's, auto]")
@click.option("--fit-likelihood", type=click.Choice(["gaussian", "student-t"]), default=None,
              help="--likelihood of every Bayesian fit; use the one the full-data fit's posterior predictive check "
                   "prefers (bayescirc fit prints it). [default: the fit's, gaussian]")
@click.option("--fit-inclusion", type=click.Choice(["slab", "threshold"]), default=None,
              help="--inclusion of every Bayesian fit: the median-probability circuit then holds the edges with "
                   "P(|mean effect| > --fit-threshold) > 0.5. [default: the fit's, slab]")
@click.option("--fit-threshold", default=None, metavar="D",
              help="--threshold of every Bayesian fit (with --fit-inclusion threshold): metric units (0.1) or a "
                   "percentage of the mean total effect (5%).")
@click.option("--seed", default=0, show_default=True, help="Random seed of the resamples.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Directory for stability.json, bootstrap.parquet, methods_jaccard.parquet, k_jaccard.parquet, "
                   "edges.parquet and summary.txt, and with --bayes headline.parquet and resamples.parquet. "
                   "[default: print only]")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of the table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def command(scores, bootstrap, ks, thresholds, methods, bayes, bayes_bootstrap, fit_draws, fit_chains, fit_inference,
            fit_error_pooling, fit_approx_only, fit_likelihood, fit_inclusion, fit_threshold, seed, out, as_json, quiet):
    """Stability of circuits selected from SCORES, conventional and Bayesian side by side.

    Conventional: mean score per edge and method, top-k (or threshold), pruned.
    For each, over bootstrap resamples of the inputs: mean and 5th percentile of
    the pairwise Jaccard similarity of the selected circuits, and the Spearman /
    Kendall correlation of the edge ranking between resamples. Also: Jaccard
    between methods and between k on the full data, and the coefficient of
    variation and sign consistency of each edge's exact effect across inputs.

    \b
    Example:
      bayescirc stability scores.parquet --bootstrap 200 --k 50 --k 200 --out stability/
      bayescirc stability scores.parquet -B 100 --bayes --bayes-bootstrap 20 --out stability/
    """
    from .._io import check_replaceable, strict_json
    from ..stability_metrics import STABILITY_FILES, stability

    if out:
        check_replaceable(out, STABILITY_FILES)  # before a run that can take hours
    if (fit_inclusion == "threshold") != (fit_threshold is not None):
        raise click.UsageError("--fit-inclusion threshold and --fit-threshold D go together: give both or neither.")
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    given = {"draws": fit_draws or None, "chains": fit_chains or None, "error_pooling": fit_error_pooling,
             "approx_only": fit_approx_only, "likelihood": fit_likelihood, "inclusion": fit_inclusion,
             "threshold": fit_threshold}  # --fit-draws/--fit-chains 0: the fit's default
    fit_options = {"inference": fit_inference, **{k: v for k, v in given.items() if v is not None}}
    result = stability(scores, bootstrap=bootstrap, k=list(ks) or None, threshold=list(thresholds) or None,
                       methods=method_list, bayes=bayes, bayes_bootstrap=bayes_bootstrap,
                       fit_options=fit_options, seed=seed, progress=not quiet)
    if as_json:
        click.echo(strict_json(result.summary(), indent=2, default=str))
    else:
        click.echo(result.to_text())
    if out:
        result.save(Path(out))
        click.echo(f"\nwrote {folder(out)}", err=as_json)
