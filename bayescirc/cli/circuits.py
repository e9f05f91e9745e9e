"""`bayescirc circuits`: sample circuits from a fit's posterior and summarise them."""

from __future__ import annotations

from pathlib import Path

import click

from . import folder

CIRCUITS_FILES = ("circuits.json", "edges.parquet", "samples.parquet", "summary.txt", "median_circuit.json",
                  "credible_core.json", "credible_superset.json")
"""What ``bayescirc circuits`` writes into its output directory."""


@click.command(name="circuits")
@click.argument("fit_dir", type=click.Path(file_okay=False))
@click.option("--n", "n", type=int, default=None,
              help="Number of circuits to sample. [default: one per posterior draw, chains stacked]")
@click.option("--rule", default="slab", show_default=True, metavar="slab|topk:K|threshold:D",
              help="How a draw becomes a circuit: 'slab' draws each edge with its conditional inclusion "
                   "probability; 'topk:K' takes the K edges with the largest |mu| in that draw; 'threshold:D' "
                   "the edges with |mu| > D (metric units). Circuits are then pruned to input->logits paths.")
@click.option("--seed", default=0, show_default=True, help="Random seed (draw choice and Bernoulli indicators).")
@click.option("--prob", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Probability of the credible core (edges in >= PROB of circuits) and superset.")
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=0), help="How many of the most frequent distinct circuits to list.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Directory to write circuits.json (summary), edges.parquet (per-edge frequency and set "
                   "membership), samples.parquet (tidy circuit, draw, edge) and summary.txt. [default: FIT_DIR/circuits]")
@click.option("--export-json/--no-export-json", default=True, show_default=True,
              help="Also write median_circuit.json, credible_core.json and credible_superset.json in the EAP-IG / "
                   "MIB circuit JSON layout, each with the inclusion frequencies as edge scores.")
@click.option("--d-model", type=int, default=None,
              help="Model width written into the EAP-IG JSON 'cfg' (only neuron-level EAP-IG code reads it). "
                   "[default: read from the fitted model's config.json when it is a local directory, else 0]")
def command(fit_dir, n, rule, seed, prob, top, out, export_json, d_model):
    """Sample circuits from the posterior of FIT_DIR (written by `bayescirc fit`) and summarise them.

    Each posterior draw gives one circuit, pruned to edges on a path from input
    to logits. Reported: per-edge inclusion frequency, the median-probability
    circuit (frequency > 0.5), the credible core and superset, the posterior of
    circuit size, the expected Jaccard similarity between two posterior circuits
    and the most frequent distinct circuits.

    \b
    Example:
      bayescirc circuits fit/ --rule slab --out fit/circuits
      bayescirc circuits fit/ --rule topk:50 --n 2000 --seed 1 --out circuits-top50/
    """
    from .._io import atomic_dir, check_replaceable, strict_json
    from ..circuits import sample_circuits
    from ..export import collected_graph, model_width, write_circuit_json
    from ..posterior import load_fit

    out = Path(out) if out else Path(fit_dir) / "circuits"
    check_replaceable(out, CIRCUITS_FILES)
    fit = load_fit(fit_dir)
    samples = sample_circuits(fit, n=n, rule=rule, seed=seed)
    scores_meta = fit.summary.get("metadata") or {}
    if d_model is None:
        d_model = model_width(fit.metadata.get("model") or scores_meta.get("model"))
    graph = collected_graph(scores_meta)  # None: inferred from the edge names
    summary = samples.summary(prob=prob, top=top)
    top_table = samples.top_circuits(top)
    summary["top_circuits"] = [{"rank": int(r.rank), "probability": float(r.probability), "size": int(r.size),
                                "edges": list(r.edges)} for r in top_table.itertuples()]
    summary["median_circuit"] = sorted(samples.median_circuit())
    summary["credible_core"] = sorted(samples.credible_core(prob))
    summary["credible_superset"] = sorted(samples.credible_superset(prob))
    summary["size_distribution"] = {str(k): float(v) for k, v in samples.size_distribution().items()}
    text = samples.to_text(prob=prob, top=top)
    with atomic_dir(out, replaces=CIRCUITS_FILES) as tmp:
        (tmp / "circuits.json").write_text(strict_json(summary, indent=2))  # NaN (e.g. one circuit's Jaccard): null
        samples.edge_table(prob).to_parquet(tmp / "edges.parquet", index=False)
        samples.table().to_parquet(tmp / "samples.parquet", index=False)
        (tmp / "summary.txt").write_text(text + "\n")
        if export_json:
            for name, circuit in (("median_circuit", samples.median_circuit()),
                                  ("credible_core", samples.credible_core(prob)),
                                  ("credible_superset", samples.credible_superset(prob))):
                write_circuit_json(tmp / f"{name}.json", circuit, samples.frequency, graph=graph, d_model=d_model)
    click.echo(text)
    click.echo(f"\nwrote {folder(out)} (circuits.json, edges.parquet, samples.parquet, summary.txt"
               + (", median_circuit.json, credible_core.json, credible_superset.json)" if export_json else ")"))
