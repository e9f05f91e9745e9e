"""`bayescirc simulate`: synthetic scores with known truth."""

from __future__ import annotations

from pathlib import Path

import click

from ..simulation import ERROR_FIELDS, MethodError, SimulationConfig, truth_path_for, write_simulation


def _parse_method(value: str) -> tuple[str, MethodError]:
    name, _, spec = value.partition(":")
    if not name.strip():
        raise click.BadParameter(f"{value!r}: the method needs a name before ':', e.g. 'eap:scale=0.8'",
                                 param_hint="--method")
    params, by_type = {}, {}
    for item in filter(None, spec.split(",")):
        key, eq, number = item.partition("=")
        edge_type, dot, field = key.rpartition(".") if "->" in key else ("", "", key)
        if not eq or field not in ERROR_FIELDS or (dot and not edge_type):
            raise click.BadParameter(
                f"{value!r}: expected NAME[:bias=B,scale=S,edge_sd=D,noise_sd=N,TYPE.FIELD=V], e.g. "
                "'eap:scale=0.8,noise_sd=0.2,input->attn<q>.scale=0.05'", param_hint="--method")
        try:
            number = float(number)
        except ValueError:
            raise click.BadParameter(f"{value!r}: {key}={number!r} is not a number", param_hint="--method") from None
        if edge_type:
            by_type.setdefault(edge_type, {})[field] = number
        else:
            params[field] = number
    try:
        return name, MethodError(**params, by_edge_type=by_type)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc}", param_hint="--method") from None


def _parse_methods(ctx, param, values: tuple[str, ...]) -> dict[str, MethodError]:
    """``--method`` callback: label -> error model, each label given once."""
    methods = {}
    for value in values:
        name, error = _parse_method(value)
        if name in methods:
            raise click.BadParameter(f"method {name!r} is given twice; give each method once, with all its "
                                     "settings in one NAME:k=v,... value", param_hint="--method")
        methods[name] = error
    return methods


@click.command(name="simulate")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="scores.parquet to write.")
@click.option("--truth", type=click.Path(dir_okay=False), default=None,
              help="Truth table to write [default: OUT with .truth.parquet].")
@click.option("--layers", default=2, show_default=True, type=click.IntRange(min=1),
              help="Number of layers of the simulated graph.")
@click.option("--heads", default=4, show_default=True, type=click.IntRange(min=1), help="Attention heads per layer.")
@click.option("--inputs", "n_inputs", default=200, show_default=True, help="Number of inputs.")
@click.option("--exact-inputs", "n_exact", type=int, default=None,
              help="Exact scores on the first K inputs (0: approximations only). [default: 20% of the inputs]")
@click.option("--method", "methods", multiple=True, metavar="NAME[:k=v,...]", callback=_parse_methods,
              help="Approximate method and its error: bias, scale, edge_sd (per-edge systematic error), "
                   "noise_sd (per-input noise); TYPE.FIELD=V sets one for an edge type only, e.g. "
                   "'eap:scale=0.8,input->attn<q>.scale=0.05' (quote it: the shell reads < and >). Repeat for "
                   "several. [default: eap:scale=0.8,edge_sd=0.05,noise_sd=0.2 and "
                   "eap-ig-inputs:scale=0.95,edge_sd=0.02,noise_sd=0.1]")
@click.option("--no-approx", is_flag=True, help="Simulate exact scores only.")
@click.option("--circuit-fraction", default=0.1, show_default=True, help="Fraction of edges in the planted circuit.")
@click.option("--effect-sd", default=1.0, show_default=True, help="Spread of circuit edges' mean effects (metric units).")
@click.option("--intrinsic-sd", default=0.5, show_default=True, help="Typical input-to-input sd of an edge's effect.")
@click.option("--heavy-tails", type=float, default=None, metavar="DF",
              help="Student-t input variation with DF degrees of freedom (> 2) instead of Gaussian.")
@click.option("--decoy-fraction", default=0.05, show_default=True,
              help="Fraction of non-circuit edges that are zero-mean, high-variance decoys.")
@click.option("--decoy-sd", default=3.0, show_default=True, help="Intrinsic sd of decoy edges.")
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives the same file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def command(out, truth, layers, heads, n_inputs, n_exact, methods, no_approx, circuit_fraction, effect_sd,
            intrinsic_sd, heavy_tails, decoy_fraction, decoy_sd, seed, quiet):
    """Write a synthetic scores.parquet drawn from the fit's generative model, with its truth.

    Per input i and edge e the exact effect is theta = mu_e + tau_e * eps; an
    approximate method scores bias + scale * theta + delta_e + noise. The truth
    table (one row per edge) holds mu_e (`effect`), tau_e (`intrinsic_sd`), the
    circuit and decoy flags and the per-edge errors; use it to check a fit.

    \b
    Example:
      bayescirc simulate --layers 4 --heads 4 --inputs 500 --exact-inputs 100 --out sim.parquet
      bayescirc fit sim.parquet --out sim-fit/
    """
    if no_approx and methods:
        raise click.UsageError("--no-approx and --method exclude each other.")
    if truth is not None and Path(truth).resolve() == Path(out).resolve():
        raise click.UsageError(f"--truth and --out name the same file ({out}); give the truth table its own path "
                               f"(or leave --truth out for {truth_path_for(out)}).")
    kwargs = {}
    if no_approx:
        kwargs["methods"] = {}
    elif methods:
        kwargs["methods"] = methods
    try:
        config = SimulationConfig(n_layers=layers, n_heads=heads, n_inputs=n_inputs, n_exact=n_exact,
                                  circuit_fraction=circuit_fraction, effect_sd=effect_sd, intrinsic_sd=intrinsic_sd,
                                  heavy_tails=heavy_tails, decoy_fraction=decoy_fraction, decoy_sd=decoy_sd,
                                  seed=seed, **kwargs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    scores_path, truth_path = write_simulation(out, config, truth_path=truth, progress=not quiet)
    click.echo(f"wrote {scores_path} ({config.n_inputs} inputs, {len(config.methods) + bool(config.n_exact)} methods)")
    click.echo(f"wrote {truth_path} (truth: one row per edge)")
