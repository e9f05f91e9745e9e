"""``bayescirc collect``: a thin layer over :func:`bayescirc.collection.collect`."""

from __future__ import annotations

import click

METHOD_HELP = ("exact: activation patching of each edge alone (clean run, only this edge carries the corrupted "
               "activation); eap: first-order estimate at the clean run; eap-ig-inputs: gradients averaged over "
               "--ig-steps interpolations of the input embeddings; eap-ig-activations: over interpolations of "
               "each layer's outputs; clean-corrupted: gradients averaged at the clean and corrupted runs.")


@click.command(context_settings={"max_content_width": 100})
@click.option("--model", "model", default=None, metavar="DIR|NAME",
              help="Hugging Face model directory (save_pretrained) or hub name. Default: the shipped 'ioi-toy' model.")
@click.option("--task", "task", required=True, type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="JSONL or CSV of prompt pairs: columns clean, corrupted, answer, distractor (one-token answers), "
                   "or EAP-IG's CSV (clean, corrupted, correct_idx, incorrect_idx).")
@click.option("--methods", default="exact,eap,eap-ig-inputs", show_default=True, metavar="LIST",
              help="Comma-separated scoring methods. " + METHOD_HELP)
@click.option("--out", required=True, type=click.Path(), metavar="PATH",
              help="scores.parquet to write (an existing file is replaced only if it is a bayescirc scores file); "
                   "with --shard, a directory that receives part-k-of-n.parquet.")
@click.option("--metric", default="logit-diff", show_default=True, type=click.Choice(["logit-diff", "prob-diff", "kl"]),
              help="Task metric at the last prompt position; every score is metric(patched) - metric(clean).")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where the model runs; auto picks cuda when a GPU is visible.")
@click.option("--dtype", default=None, metavar="DTYPE",
              help="Model dtype: float32 (default), float64, bfloat16 or float16. Scores are written as float32 "
                   "(float64 for float64 models).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, metavar="N",
              help="Inputs per forward/backward pass (exact patching runs 8x as many patched rows per pass). "
                   "Default: automatic, starting at 32 and halving on out-of-memory.")
@click.option("--ig-steps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interpolation steps of eap-ig-inputs and eap-ig-activations.")
@click.option("--exact-inputs", type=click.IntRange(min=0), default=None, metavar="K",
              help="Exact scores on the first K inputs only (the approximations still run on all); "
                   "exact costs about one partial forward pass per edge and input. Default: all inputs.")
@click.option("--n-inputs", type=click.IntRange(min=1), default=None, metavar="N",
              help="Use only the first N rows of the task. Default: all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for torch, recorded in the file.")
@click.option("--shard", default=None, metavar="k/n",
              help="Score the k-th (1..n) of n contiguous slices of the inputs into OUT/part-k-of-n.parquet. "
                   "Re-running skips a part that is already complete (resume); read the directory as one table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def command(model, task, methods, out, metric, device, dtype, batch_size, ig_steps, exact_inputs, n_inputs, seed,
            shard, quiet):
    """Score every edge of MODEL on every input of TASK and write per-input scores.

    One row per (input, edge, method) in scores.parquet (schema v1), with each
    input's clean and corrupted metric, and the run's settings in the file
    metadata. Edge u->v's score estimates metric(clean run with only v's input
    receiving corrupted_u - clean_u) - metric(clean run); scores are per input,
    never averaged.

    \b
    Examples:
      bayescirc collect --model models/ioi-toy --task ioi.jsonl --out scores.parquet
      bayescirc collect --task ioi.jsonl --methods eap,eap-ig-inputs --ig-steps 10 --out s.parquet
      bayescirc collect --model gpt2 --task ioi.jsonl --exact-inputs 50 --device cuda --out s.parquet
      bayescirc collect --task ioi.jsonl --shard 2/4 --out parts/   # 4 jobs, then read parts/ as one table
    """
    from pathlib import Path

    from ..collection import collect, default_model, parse_shard, part_path

    parsed = parse_shard(shard) or ((1, 1) if Path(out).is_dir() else None)
    target = part_path(out, parsed) if parsed else Path(out)
    resumed = parsed is not None and target.exists()
    model = model if model is not None else default_model()
    collect(model, task, methods=methods, out=out, metric=metric, device=device, dtype=dtype,
                    batch_size=batch_size, ig_steps=ig_steps, exact_inputs=exact_inputs, n_inputs=n_inputs, seed=seed,
                    shard=shard, progress=not quiet, return_table=False)
    import pyarrow.parquet as pq

    from ..scores import read_metadata

    rows = pq.ParquetFile(target).metadata.num_rows
    meta = read_metadata(target)
    info = (meta.get("extra") or {}).get("collect") or {}
    span = info.get("input_ids") or [0, 0]
    if resumed:
        click.echo(f"{target} is already complete ({rows:,} scores): skipped (resume)")
        return
    click.echo(f"wrote {rows:,} scores (inputs {span[0]}..{span[1] - 1}, {info.get('n_edges', '?'):,} edges, "
               f"methods {', '.join(meta.get('methods') or [])}) to {target}")
