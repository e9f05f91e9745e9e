"""`bayescirc demo`: the whole pipeline on the shipped IOI model, in a few minutes on a laptop."""

from __future__ import annotations

import click


@click.command(name="demo")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Directory for scores.parquet, fit/, circuit.json and report.html.")
@click.option("--model", "-m", default=None,
              help="Model directory or hub name. [default: the shipped ioi-toy model, with its task.jsonl]")
@click.option("--task", "-t", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Task file (clean/corrupted prompt pairs). [default: MODEL/task.jsonl]")
@click.option("--n-inputs", "n_inputs", type=int, default=200, show_default=True,
              help="Inputs scored by the approximate methods (EAP, EAP-IG).")
@click.option("--exact-inputs", type=int, default=50, show_default=True,
              help="Of those, the first K also scored by exact activation patching (one patched run per edge and input).")
@click.option("--draws", type=int, default=300, show_default=True, help="Draws per chain in the fit.")
@click.option("--chains", type=int, default=2, show_default=True, help="Chains of the fit (SVI: chains x draws samples).")
@click.option("--inference", type=click.Choice(["auto", "nuts", "svi"]), default="auto", show_default=True,
              help="The fit's inference (bayescirc fit --inference): auto is NUTS up to 5,000 edges; on one or two "
                   "inputs NUTS can stall at its maximum tree depth, use svi then.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every stage.")
@click.option("--device", default="auto", show_default=True, help="Torch device for collection: auto, cpu, cuda.")
@click.option("--no-progress", "--quiet", "-q", "no_progress", is_flag=True, help="Hide the progress bars.")
def command(out, model, task, n_inputs, exact_inputs, draws, chains, inference, seed, device, no_progress):
    """Run collect -> fit -> circuits -> report on the shipped IOI model and say where
    the report and the circuit are.

    With the defaults this takes a few minutes on two CPU cores. Each stage is
    the public command of the same name, so the files it writes are the ones
    you would get from the commands below (of the circuits stage the demo keeps
    median_circuit.json, as OUT/circuit.json):

    \b
      bayescirc collect --model MODEL --task MODEL/task.jsonl --n-inputs 200 --exact-inputs 50 --out OUT/scores.parquet
      bayescirc fit OUT/scores.parquet --draws 300 --out OUT/fit
      bayescirc circuits OUT/fit --out OUT/circuits
      bayescirc report OUT/fit --scores OUT/scores.parquet --out OUT/report.html
    """
    from ..pipeline import demo

    demo(out, model=model, task=task, n_inputs=n_inputs, exact_inputs=exact_inputs, chains=chains, draws=draws,
         inference=inference, seed=seed, device=device, progress=not no_progress, echo=click.echo)
