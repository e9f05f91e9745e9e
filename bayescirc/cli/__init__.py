"""The ``bayescirc`` command line: a thin layer over the Python functions of the same names.

Each command lives in its own module ``bayescirc/cli/<name>.py`` defining a
click command called ``command``; modules load only when their command runs,
so ``bayescirc --help`` starts fast (no torch or JAX import). User errors
(:class:`~bayescirc.errors.BayescircError`) print one line and exit with
status 2, without a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings

import click

from ..errors import BayescircError

# name -> one-line purpose, in pipeline order. A command is listed when its module exists.
COMMANDS = {
    "task": "Generate a task file of clean/corrupted prompt pairs (IOI, induction, greater-than).",
    "collect": "Score every edge on every input of a task: exact patching and EAP variants -> scores.parquet.",
    "simulate": "Write a synthetic scores.parquet with known truth (for testing and calibration).",
    "inspect": "Validate a scores.parquet and summarise its inputs, edges, methods and metadata.",
    "fit": "Fit the hierarchical model to scores.parquet: inclusion probabilities and variance components.",
    "circuits": "Sample circuits from a fit's posterior: inclusion, credible sets, export to EAP-IG/MIB JSON.",
    "stability": "Bootstrap and cross-method stability of circuits, conventional and Bayesian side by side.",
    "evaluate": "Faithfulness of posterior circuits on held-out inputs (needs the model).",
    "plot": "Diagnostic plots of a fit: traces, forest, variance decomposition, circuit graph.",
    "report": "One self-contained HTML report of a fit, its diagnostics and its circuit.",
    "demo": "Run collect -> fit -> circuits -> report on the shipped IOI model.",
}


class LazyGroup(click.Group):
    """Loads ``bayescirc.cli.<name>`` only when the command is used."""

    def list_commands(self, ctx):
        return [name for name in COMMANDS if importlib.util.find_spec(f"{__name__}.{name}") is not None]

    def get_command(self, ctx, name):
        if name not in self.list_commands(ctx):
            return None
        return importlib.import_module(f"{__name__}.{name}").command

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands (in pipeline order)"):
                formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BayescircError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def folder(path) -> str:
    """A folder as the messages name it: ``fit/`` however the user typed it (``fit``, ``fit/``)."""
    return str(path).rstrip("/") + "/"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="bayescirc")
def cli():
    """Uncertainty-aware circuit discovery for transformer models.

    \b
    A typical run:
      bayescirc task ioi --n 500 --out ioi.jsonl
      bayescirc collect --model models/ioi-toy --task ioi.jsonl --out scores.parquet
      bayescirc fit scores.parquet --out fit/
      bayescirc circuits fit/
      bayescirc report fit/ --out report.html

    Run `bayescirc COMMAND --help` for each command's options.
    """


def main(argv=None):
    warnings.showwarning = _show_warning
    return cli.main(args=argv, prog_name="bayescirc")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
