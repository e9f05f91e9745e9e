"""`bayescirc fit`: the hierarchical model on a scores file -> a fit directory."""

from __future__ import annotations

import warnings

import click

from . import folder


def _print_summary(res, top: int) -> None:
    s = res.summary
    edges = res.edges.sort_values("inclusion_prob", ascending=False).head(top)
    click.echo(f"\n{s['n_edges']} edges, {s['n_inputs']} inputs, methods: "
               f"{', '.join(([s['exact_method']] if s['exact_method'] else []) + s['methods'])}\n"
               f"{s['inference'].upper()}, {s['likelihood']} likelihood, inclusion rule: {s['inclusion_rule']}; "
               f"approximation error pooled by {s['settings'].get('error_pooling', 'method')}; approximate-only "
               f"inputs: {s['settings'].get('approx_only', 'full')}")
    hp = s["hdi_prob"]
    click.echo(f"\nTop {len(edges)} edges by inclusion probability (effect: posterior mean [{hp:.0%} HDI]; "
               f"if in the circuit: [{hp:.0%} HDI given the slab]; metric units):")
    width = max(8, int(edges["edge"].str.len().max() if len(edges) else 8))
    click.echo(f"  {'edge':<{width}}  incl.   effect   [{'low':>8}, {'high':>8}]  if in the circuit     intrinsic sd")
    for row in edges.itertuples():
        lo, hi, mean, slo, shi = (round(v, 4) + 0.0 for v in (row.effect_hdi_low, row.effect_hdi_high, row.effect_mean,
                                                               row.slab_hdi_low, row.slab_hdi_high))
        click.echo(f"  {row.edge:<{width}}  {row.inclusion_prob:5.3f}  {mean:+8.4f} [{lo:+8.4f}, "
                   f"{hi:+8.4f}]  [{slo:+8.4f}, {shi:+8.4f}]  {row.intrinsic_sd:8.4f}")
    click.echo("\nVariance of one per-input score around the edge's true mean effect (share):")
    click.echo(f"  {'method':<20} intrinsic  approximation  aggregation")
    for m, sh in s["decomposition"]["per_method"].items():
        click.echo(f"  {m:<20} {sh['intrinsic']:9.1%}  {sh['approximation']:13.1%}  {sh['aggregation']:11.1%}")
    _print_layer_shares(s["decomposition"].get("per_layer") or {})
    _print_error_by_type(s)
    d = s["diagnostics"]
    if s["inference"] == "nuts":
        click.echo(f"\nDiagnostics: max r_hat {_fmt(d['max_r_hat'], '.3f')}, min ESS bulk/tail "
                   f"{_fmt(d['min_ess_bulk'], '.0f')}/{_fmt(d['min_ess_tail'], '.0f')}, divergences {d['divergences']}")
    else:
        click.echo(f"\nDiagnostics: SVI final loss {_fmt(d['svi_final_loss'], '.2f')}")
    if s["ppc"].get("preferred"):
        click.echo(f"Posterior predictive check prefers the {s['ppc']['preferred']} likelihood: {s['ppc'].get('reason', '')}")
    else:
        click.echo(f"Posterior predictive check: {s['ppc'].get('reason') or 'not run'}")
    for w in d["warnings"]:
        click.echo(f"WARNING: {w}")


def _print_layer_shares(per_layer: dict) -> None:
    """The same shares per receiver layer (logits = the layer after the last block), one column per method."""
    methods = list(dict.fromkeys(m for block in per_layer.values() for m in block))
    if not methods:
        return
    click.echo("\nThe same per receiver layer (intrinsic / approximation / aggregation, %):")
    click.echo(f"  {'layer':<8}" + "".join(f"{m[:20]:>22}" for m in methods))
    for layer, block in per_layer.items():
        cells = [f"{block[m]['intrinsic']:.0%}/{block[m]['approximation']:.0%}/{block[m]['aggregation']:.0%}"
                 .replace("%", "") if m in block and all(v is not None for v in block[m].values()) else "-"
                 for m in methods]
        click.echo(f"  {layer:<8}" + "".join(f"{c:>22}" for c in cells))


def _print_error_by_type(s: dict) -> None:
    """Each method's fitted scale (beta) and noise SD (sigma) per edge type, when the fit pooled them by type."""
    beta, sigma = s.get("globals", {}).get("beta_type"), s.get("globals", {}).get("sigma_type")
    if not beta:
        return
    methods = list(beta)
    types = list(next(iter(beta.values())))
    width = max(9, max(len(t) for t in types))
    click.echo("\nApproximation by edge type: scale beta (1 = matches exact) and per-input noise SD sigma:")
    click.echo(f"  {'edge type':<{width}}  " + "  ".join(f"{m[:22]:>22}" for m in methods))
    for t in types:
        cells = [f"{beta[m][t]['mean']:6.2f} ({sigma[m][t]['mean']:.3g})" for m in methods]
        click.echo(f"  {t:<{width}}  " + "  ".join(f"{c:>22}" for c in cells))


def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


@click.command(name="fit")
@click.argument("scores", type=click.Path(exists=True))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Fit directory to write: edges.parquet, posterior.nc, summary.json (replaced atomically).")
@click.option("--inference", type=click.Choice(["auto", "nuts", "svi"]), default="auto", show_default=True,
              help="nuts: the reference posterior (MCMC over the model's global parameters); svi: a fast Gaussian "
                   "approximation for large graphs; auto: NUTS up to 5,000 edges, SVI above.")
@click.option("--chains", default=2, show_default=True,
              help="NUTS chains (r_hat needs 2 or more); on a CPU they run side by side, one core each.")
@click.option("--draws", type=int, default=None,
              help="Posterior draws per chain (SVI: chains x draws samples). [default: 1000; SVI above 5,000 edges: "
                   "500 in all]")
@click.option("--warmup", type=int, default=None, help="NUTS warm-up iterations per chain. [default: --draws]")
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives the same fit.")
@click.option("--hdi-prob", default=0.9, show_default=True,
              help="Probability of the reported highest-density intervals of each edge's effect.")
@click.option("--inclusion", type=click.Choice(["slab", "threshold"]), default="slab", show_default=True,
              help="slab: probability that the edge's mean effect comes from the slab (is in the circuit) rather than "
                   "the spike at 0; threshold: probability that |mean effect| > --threshold.")
@click.option("--threshold", default=None, metavar="D",
              help="For --inclusion threshold: D in metric units (0.1) or a percentage of the mean total effect (5%).")
@click.option("--likelihood", type=click.Choice(["gaussian", "student-t"]), default="gaussian", show_default=True,
              help="Input-to-input variation of exact effects: gaussian (fast, sufficient statistics) or student-t "
                   "(robust to outlying inputs; holds the exact scores in memory). summary.json's ppc says which fits.")
@click.option("--svi-steps", type=click.IntRange(min=1), default=3000, show_default=True,
              help="Most SVI optimisation steps; SVI stops earlier (after 500) once its loss no longer falls.")
@click.option("--spike-sd", default=0.0, show_default=True,
              help="SD of the spike for edges outside the circuit (0: exactly zero mean effect).")
@click.option("--error-pooling", type=click.Choice(["type", "method"]), default="type", show_default=True,
              help="Who shares approximation parameters: type = each method x edge type (attn->attn<q>, mlp->logits, "
                   "...), pooled towards the method's values; method = one set per method.")
@click.option("--approx-only", type=click.Choice(["auto", "full", "mean"]), default="auto", show_default=True,
              help="Inputs scored only by approximate methods: mean = their mean with its observed standard error, "
                   "so tau comes from the exact inputs (calibrated in SBC; robust when an edge's approximation scale "
                   "differs from its edge type's); full = each through the model, their scatter also informs tau; "
                   "auto = mean, or full with --likelihood student-t.")
@click.option("--top", default=15, show_default=True, help="Edges to list in the terminal summary.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def command(scores, out, inference, chains, draws, warmup, seed, hdi_prob, inclusion, threshold, likelihood, svi_steps,
            spike_sd, error_pooling, approx_only, top, quiet):
    """Fit the hierarchical model to SCORES (a scores.parquet file or directory of parts).

    Per input i the exact effect of edge e is theta = mu_e + tau_e * eps: mu_e is the
    edge's mean effect (a spike at 0 or a slab: in the circuit or not), tau_e its
    intrinsic input-to-input spread. Each approximate method m observes
    alpha + beta * theta + delta_e + noise(sigma), with alpha, beta, sigma and the
    spread of delta per method and edge type, learnt where exact scores overlap.
    The per-input effects, mu, delta and tau are integrated out, so the cost
    grows with edges, not inputs.

    \b
    Writes OUT/edges.parquet (one row per edge: inclusion_prob, effect_mean/sd/HDI,
    the effect if the edge is in the circuit: slab_effect_mean, slab_hdi_low/high,
    intrinsic_sd, per-method error_bias/error_sd), OUT/posterior.nc (ArviZ) and
    OUT/summary.json (diagnostics, variance decomposition, predictive check).

    \b
    Example:
      bayescirc simulate --out sim.parquet
      bayescirc fit sim.parquet --out sim-fit/
      bayescirc fit sim.parquet --out sim-fit/ --inclusion threshold --threshold 5%
    """
    from ..fitting import FitWarning, fit

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FitWarning)
        res = fit(scores, out=out, inference=inference, chains=chains, draws=draws, warmup=warmup, seed=seed,
                  hdi_prob=hdi_prob, inclusion=inclusion, threshold=threshold, likelihood=likelihood,
                  progress=not quiet, spike_sd=spike_sd, svi_steps=svi_steps, error_pooling=error_pooling,
                  approx_only=approx_only)
    shown = set(res.summary["diagnostics"]["warnings"])
    for w in caught:
        if not issubclass(w.category, FitWarning) or str(w.message) not in shown:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    _print_summary(res, top)
    click.echo(f"\nwrote {folder(out)} (edges.parquet, posterior.nc, summary.json)")
