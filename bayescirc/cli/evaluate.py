"""`bayescirc evaluate`: faithfulness of posterior circuits on held-out inputs."""

from __future__ import annotations

import click

from . import folder


def _held_out(value):
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    if ":" in value:
        return value
    if "," in value:
        try:
            return [int(v) for v in value.split(",")]
        except ValueError:
            pass
    raise click.BadParameter(f"{value!r}: use N (count), A:B (rows A..B-1) or a comma-separated list of rows.",
                             param_hint="--held-out")


@click.command(name="evaluate")
@click.argument("fit_dir", type=click.Path(file_okay=False))
@click.option("--model", "-m", required=True, help="Model the scores came from: local directory, hub name or shipped name.")
@click.option("--task", "-t", required=True, type=click.Path(dir_okay=False),
              help="Task file (JSONL/CSV); row i is input i of the scores.")
@click.option("--n-circuits", default=100, show_default=True, help="Posterior circuits to sample and evaluate.")
@click.option("--rule", default="slab", show_default=True, metavar="slab|topk:K|threshold:D",
              help="How a posterior draw becomes a circuit (see `bayescirc circuits --help`).")
@click.option("--held-out", default=None, metavar="N|A:B|I,J,...",
              help="Inputs to evaluate on: N = the first N task rows the fit did not see; A:B = rows A..B-1; "
                   "or a list of rows. [default: every task row the fit did not see (summary.json input_ids)]")
@click.option("--metric", default="logit-diff", show_default=True, help="Task metric (as in `bayescirc collect`).")
@click.option("--interval", "interval_prob", default=0.9, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Probability of the central interval of faithfulness over posterior circuits.")
@click.option("--per-input", is_flag=True,
              help="Average per-input ratios instead of the ratio of input-averaged metrics (the default, as in MIB).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... ('auto': a GPU when visible).")
@click.option("--batch-size", type=int, default=None,
              help="Rows (circuit x input pairs) per forward pass. [default: 64]")
@click.option("--seed", default=0, show_default=True, help="Random seed of the circuit sampling.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Directory for faithfulness.json, circuits.parquet and summary.txt. [default: print only]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def command(fit_dir, model, task, n_circuits, rule, held_out, metric, interval_prob, per_input, device, batch_size,
            seed, out, quiet):
    """Faithfulness of circuits sampled from FIT_DIR, on held-out inputs of TASK.

    Each circuit runs with only its edges carrying clean activations (every
    other edge corrupted, as EAP-IG and MIB evaluate). Faithfulness =
    (m(circuit) - m(corrupted)) / (m(full) - m(corrupted)), metrics averaged over
    the held-out inputs. Reported for the median-probability circuit and as a
    distribution over posterior circuits, with an interval.

    \b
    Example:
      bayescirc evaluate fit/ --model models/ioi-toy --task ioi.jsonl --n-circuits 200 --held-out 100
    """
    from .._io import check_replaceable
    from ..faithfulness import FAITHFULNESS_FILES, evaluate

    if out:
        check_replaceable(out, FAITHFULNESS_FILES)
    result = evaluate(fit_dir, model, task, n_circuits=n_circuits, rule=rule, held_out=_held_out(held_out),
                      metric=metric, interval_prob=interval_prob, per_input=per_input, device=device,
                      batch_size=batch_size, seed=seed, progress=not quiet)
    click.echo(result.to_text())
    if out:
        result.save(out)
        click.echo(f"wrote {folder(out)}")
