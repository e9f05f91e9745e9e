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

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import atomic_path, strict_json
from .errors import TaskError

__all__ = ["TASK_COLUMNS", "EAPIG_COLUMNS", "read_task", "write_task"]

TASK_COLUMNS = ("clean", "corrupted", "answer", "distractor")
EAPIG_COLUMNS = ("clean", "corrupted", "correct_idx", "incorrect_idx")


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, list[int]]:
    """One object per non-blank line; returns the rows and the 1-based file line of each."""
    rows, lines = [], []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}: line {number} is not valid JSON ({exc.msg}). Each line must be one JSON object.") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}: line {number} is not a JSON object with the task's columns.")
            rows.append(row)
            lines.append(number)
    return pd.DataFrame(rows), lines


def _read_csv(path: Path, sep: str) -> tuple[pd.DataFrame, list[int]]:
    """Header plus one record per row, every field a string; returns the rows and the file line each starts on.

    A record whose field count differs from the header's is refused: an
    unquoted comma inside a prompt would otherwise shift its fields into the
    wrong columns (or, in pandas, into the index) without a word.
    """
    kind = "TSV" if sep == "\t" else "CSV"
    records, lines = [], []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=sep, strict=True)
        header, header_line, end = None, 0, 0
        try:
            for record in reader:
                start, end = end + 1, reader.line_num
                if not record:
                    continue  # a blank line
                if header is None:
                    header, header_line = record, start
                elif len(record) != len(header):
                    raise TaskError(
                        f"{path}: line {start} has {len(record)} fields but the header has {len(header)}. Quote "
                        f"fields that contain {sep!r} (e.g. \"When Amy and Bob went, ...\"), or use a JSONL task file.")
                else:
                    records.append(record)
                    lines.append(start)
        except csv.Error as exc:
            raise TaskError(f"{path}: line {end + 1} is not valid {kind} ({exc}). Quote fields with "
                            "'\"', doubling quotes inside them, or use a JSONL task file.") from None
    if header is None:
        raise TaskError(f"{path}: the file is empty. A task {kind} needs a header line with the columns "
                        f"{list(TASK_COLUMNS)} and one line per prompt pair.")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise TaskError(f"{path}: line {header_line} names column(s) {repeated} more than once; give each column one name.")
    return pd.DataFrame(records, columns=header, dtype=object), lines


def _load(path: Path) -> tuple[pd.DataFrame, list[int]]:
    """The rows of a task file and the file line of each, for error messages."""
    if not path.exists():
        raise TaskError(f"{path}: no such task file. Make one with `bayescirc task ioi --out {path}` or pass a JSONL/CSV file.")
    if path.is_dir():
        raise TaskError(f"{path}: is a directory, not a task file. Pass a .jsonl or .csv file.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            return _read_jsonl(path)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: cannot parse the task file ({exc}). Save it as UTF-8.") from None
    except OSError as exc:
        raise TaskError(f"{path}: cannot read the task file ({exc.strerror}).") from None
    raise TaskError(f"{path}: unknown task file type {suffix!r}; use .jsonl or .csv.")


def _where(lines: list[int] | None, position: int) -> str:
    """Where row ``position`` (0-based) is: its file line, or its row in a DataFrame."""
    return f"row {position}" if lines is None else f"line {lines[position]}"


_MAX_TOKEN_ID = 2**63 - 1


def _token_id(value) -> int | None:
    """``value`` as a token id (an integer from 0 to 2**63-1), or None when it is not one.

    Integer-valued floats and numeric strings count (CSV holds text, pandas
    writes integer columns with gaps as ``5.0``); booleans, fractions,
    negatives and numbers too large for int64 do not.
    """
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text or "_" in text:
            return None
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, float | np.floating):
        if not math.isfinite(value) or value % 1:
            return None
        value = int(value)
    if isinstance(value, int | np.integer) and 0 <= value <= _MAX_TOKEN_ID:
        return int(value)
    return None


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
    if isinstance(task, pd.DataFrame):
        source, frame, lines = "task table", task.copy(), None
    else:
        source = str(task)
        frame, lines = _load(Path(task))
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
            raw = frame[src].tolist()
            ids = [_token_id(v) for v in raw]
            if None in ids:
                row = ids.index(None)
                raise TaskError(f"{source}: column '{src}' must hold token ids (integers from 0 to 2**63-1, not "
                                f"true/false); {_where(lines, row)} has {raw[row]!r}.")
            out[dst] = pd.array(ids, dtype="Int64")
        text_columns = ("clean", "corrupted")
    else:
        have = sorted(map(str, columns))
        missing = [c for c in TASK_COLUMNS if c not in columns]
        raise TaskError(
            f"{source}: missing column(s) {missing} (it has {have}). A task needs the columns {list(TASK_COLUMNS)}, "
            f"or EAP-IG's layout {list(EAPIG_COLUMNS)}."
        )
    for col in text_columns:
        values = out[col].tolist()
        bad = [not isinstance(v, str) or v == "" for v in values]
        if any(bad):
            row = bad.index(True)
            raise TaskError(f"{source}: column '{col}' must be a non-empty string; {_where(lines, row)} has {values[row]!r}.")
    out = out.reset_index(drop=True)
    if n_inputs is not None:
        if n_inputs < 1:
            raise TaskError(f"n_inputs must be >= 1, got {n_inputs}.")
        out = out.iloc[:n_inputs].reset_index(drop=True)
    if lines is not None:  # so later checks (tokenisation in collect) can name the file line
        out.attrs.update(source=source, lines=list(lines[:len(out)]))
    return out


def row_location(table: pd.DataFrame, row: int) -> str:
    """Where task row ``row`` came from: ``ioi.jsonl line 12 (row 10)`` for a file :func:`read_task` read, else ``row 10``."""
    lines = table.attrs.get("lines")
    if lines is not None and 0 <= row < len(lines):
        return f"{table.attrs.get('source', 'task')} line {lines[row]} (row {row})"
    return f"row {row}"


def write_task(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a task in the bayescirc layout as JSONL (atomically), after checking it.

    Missing values (NaN) in extra columns are written as JSON ``null``, which strict parsers read.
    """
    read_task(frame)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in frame.to_dict(orient="records"):
                fh.write(strict_json(row, ensure_ascii=False) + "\n")
    return path
