"""Errors in what the user gave us.

A :class:`BayescircError` is a user error: its message says what was wrong,
where (file, column, row, value) and what to do. The CLI prints it without a
traceback and exits with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class BayescircError(Exception):
    """A problem with the user's input, files or options."""

    exit_code = 2


class ScoresError(BayescircError, ValueError):
    """A scores table or file breaks the scores.parquet contract."""


class TaskError(BayescircError, ValueError):
    """A task file (prompt pairs) is malformed or does not fit the model."""


class ModelError(BayescircError):
    """A model cannot be loaded or lacks what the collector needs."""


class FitError(BayescircError):
    """Data or options that the fit cannot work with."""
