"""Task files: clean/corrupted prompt pairs with the answer the metric compares.

Two layouts are read, from JSONL, CSV or a DataFrame:

- bayescirc: ``clean``, ``corrupted``, ``answer``, ``distractor`` (strings;
  ``answer`` and ``distractor`` are each one token continuing the prompt, e.g.
  ``" Mary"`` with its leading space for GPT-2's tokenizer);
- EAP-IG's CSV: ``clean``, ``corrupted``, ``correct_idx``, ``incorrect_idx``
  (token ids of the answer and the distractor).

:func:`read_task` returns one table with ``clean``, ``corrupted``, ``answer``,
``distractor`` and nullable ``answer_id``/``distractor_id``; the collector
tokenises with the model and checks single-token answers and equal clean and
corrupted lengths (it needs the tokenizer for that).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ._io import atomic_path
from .errors import TaskError

__all__ = ["TASK_COLUMNS", "EAPIG_COLUMNS", "read_task", "write_task"]

TASK_COLUMNS = ("clean", "corrupted", "answer", "distractor")
EAPIG_COLUMNS = ("clean", "corrupted", "correct_idx", "incorrect_idx")


def _load(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise TaskError(f"{path}: no such task file. Make one with `bayescirc task ioi --out {path}` or pass a JSONL/CSV file.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            rows = []
            with open(path, encoding="utf-8") as fh:
                for number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise TaskError(f"{path}: line {number} is not valid JSON ({exc.msg}). Each line must be one JSON object.") from None
                    if not isinstance(rows[-1], dict):
                        raise TaskError(f"{path}: line {number} is not a JSON object with the task's columns.")
            return pd.DataFrame(rows)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise TaskError(f"{path}: cannot parse the task file ({exc}).") from None
    raise TaskError(f"{path}: unknown task file type {suffix!r}; use .jsonl or .csv.")


def read_task(task: str | os.PathLike | pd.DataFrame, n_inputs: int | None = None) -> pd.DataFrame:
    """Read and check a task, in either layout; row ``i`` is input ``i`` of the scores file.

    Parameters
    ----------
    task : path or DataFrame
        JSONL/CSV file or a DataFrame with the columns of one layout.
    n_inputs : int, optional
        Keep only the first ``n_inputs`` rows.

    Returns
    -------
    DataFrame with ``clean``, ``corrupted``, ``answer``, ``distractor`` (str or
    missing) and ``answer_id``, ``distractor_id`` (Int64 or missing).
    """
    source = "task table" if isinstance(task, pd.DataFrame) else str(task)
    frame = task.copy() if isinstance(task, pd.DataFrame) else _load(Path(task))
    if frame.empty:
        raise TaskError(f"{source}: the task has no rows. It needs one row per clean/corrupted prompt pair.")
    columns = set(frame.columns)
    if set(TASK_COLUMNS) <= columns:
        out = frame[list(TASK_COLUMNS)].copy()
        out["answer_id"] = pd.array([pd.NA] * len(out), dtype="Int64")
        out["distractor_id"] = pd.array([pd.NA] * len(out), dtype="Int64")
        text_columns = TASK_COLUMNS
    elif set(EAPIG_COLUMNS) <= columns:
        out = frame[["clean", "corrupted"]].copy()
        out["answer"] = None
        out["distractor"] = None
        for src, dst in (("correct_idx", "answer_id"), ("incorrect_idx", "distractor_id")):
            try:
                values = pd.to_numeric(frame[src], errors="raise")
            except (ValueError, TypeError):
                bad = frame[src][pd.to_numeric(frame[src], errors="coerce").isna()].index[0]
                raise TaskError(f"{source}: column '{src}' must hold token ids (integers); row {bad} has {frame[src][bad]!r}.") from None
            if (values % 1 != 0).any() or (values < 0).any():
                bad = values[(values % 1 != 0) | (values < 0)].index[0]
                raise TaskError(f"{source}: column '{src}' must hold non-negative integer token ids; row {bad} has {values[bad]!r}.")
            out[dst] = values.astype("Int64")
        text_columns = ("clean", "corrupted")
    else:
        have = sorted(map(str, columns))
        missing = [c for c in TASK_COLUMNS if c not in columns]
        raise TaskError(
            f"{source}: missing column(s) {missing} (it has {have}). A task needs the columns {list(TASK_COLUMNS)}, "
            f"or EAP-IG's layout {list(EAPIG_COLUMNS)}."
        )
    for col in text_columns:
        values = out[col]
        bad = values.map(lambda v: not isinstance(v, str) or v == "")
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise TaskError(f"{source}: column '{col}' must be a non-empty string; row {row} has {values.iloc[row]!r}.")
    out = out.reset_index(drop=True)
    if n_inputs is not None:
        if n_inputs < 1:
            raise TaskError(f"n_inputs must be >= 1, got {n_inputs}.")
        out = out.iloc[:n_inputs].reset_index(drop=True)
    return out


def write_task(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a task in the bayescirc layout as JSONL (atomically), after checking it."""
    read_task(frame)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in frame.to_dict(orient="records"):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
