"""`bayescirc task`: generate a task file of clean/corrupted prompt pairs."""

from __future__ import annotations

import click

from ..taskgen import TASK_KINDS, VOCABULARIES, make_task
from ..tasks import write_task


@click.command(name="task")
@click.argument("kind", type=click.Choice(TASK_KINDS))
@click.option("--n", "n", default=500, show_default=True, type=click.IntRange(min=1),
              help="Number of prompt pairs (rows) to write.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Random seed; the same seed gives the same file.")
@click.option("--vocabulary", type=click.Choice(VOCABULARIES), default=None,
              help="'toy': the words of the shipped models (models/ioi-toy, models/induction); IOI rows then use "
                   "only templates and name pairs held out of their training. 'english': plain English names and "
                   "words for real models such as gpt2. [default: toy; english for greater-than]")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Task file to write (JSONL, one prompt pair per line; written atomically).")
def command(kind, n, seed, vocabulary, out):
    """Write N prompt pairs of a task KIND (ioi, induction, greater-than) to a JSONL task file.

    Each line has `clean` and `corrupted` prompts with the same number of
    words, the `answer` the model should give after the clean prompt and a
    `distractor` it should not (each one token, with GPT-2's leading space
    where words are separated by one). Corruptions:

    \b
      ioi           the repeated subject replaced by a third name (ABC)
      induction     the first occurrence of the word to copy replaced by another (the distractor)
      greater-than  the start year 17YY replaced by 1701

    \b
    Examples:
      bayescirc task ioi --n 500 --out ioi.jsonl
      bayescirc task ioi --vocabulary english --out ioi-gpt2.jsonl
      bayescirc task greater-than --n 200 --seed 1 --out gt.jsonl
    """
    if vocabulary is None:
        vocabulary = "english" if kind == "greater-than" else "toy"
    frame = make_task(kind, n, seed=seed, vocabulary=vocabulary)
    path = write_task(frame, out)
    click.echo(f"wrote {path} ({len(frame)} {kind} prompt pairs, {vocabulary} vocabulary, seed {seed})")
    click.echo(f"  e.g. {frame.clean[0]!r} -> {frame.answer[0]!r} (not {frame.distractor[0]!r})")
