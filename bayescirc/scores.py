"""Read, validate and write scores.parquet (schema v1, see :mod:`bayescirc.schema`).

A scores "file" is a parquet file or a directory of parquet part files
(sharded collection) that reads as one table. Every reader validates: a
broken file gets a :class:`~bayescirc.errors.ScoresError` naming the file,
the column, an offending row and the fix.

The fit does not need the per-input table in memory: :func:`sufficient_statistics`
streams the file and keeps, per edge and per *observation pattern* (the set
of methods that scored an input), counts, sums and cross-products of the
scores; see :class:`SufficientStats`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import queue
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema
from ._io import atomic_path, strict_json
from ._moments import DenseBlock, PatternMoments
from ._moments import TooManyMethods as _TooManyMethods
from .errors import ScoresError
from .graph import QKV, edge_table, parse_edge

__all__ = [
    "ScoresWriter",
    "SufficientStats",
    "read_metadata",
    "read_scores",
    "scores_summary",
    "exact_scores",
    "sufficient_statistics",
    "validate_scores",
    "write_scores",
]

ROW_GROUP_SIZE = 1 << 20


class MethodLabelWarning(UserWarning):
    """A method label that looks like a misspelling of ``exact``."""


class EdgeNameWarning(UserWarning):
    """Edge names outside the graph syntax: kept, pooled in a generic group."""


# --- locating files ------------------------------------------------------------------


def _part_files(path: Path) -> list[Path]:
    if not path.exists():
        raise ScoresError(f"{path}: no such file or directory. Pass a scores.parquet file or a directory of part files.")
    if path.is_dir():
        parts = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
        if not parts:
            raise ScoresError(f"{path}: directory holds no *.parquet part files. Point at a scores file or a directory of parts.")
        return parts
    return [path]


def _open(path: Path, dictionary: bool = False) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, read_dictionary=[schema.EDGE, schema.METHOD] if dictionary else None)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ScoresError(f"{path}: not a readable parquet file ({exc}). Write scores with bayescirc.write_scores or pandas.DataFrame.to_parquet.") from None


# --- validation ------------------------------------------------------------------------


def _describe_row(batch: pa.RecordBatch | pa.Table, i: int) -> str:
    parts = []
    for col in schema.REQUIRED_COLUMNS:
        if col in batch.schema.names:
            value = batch.column(col)[i].as_py()
            parts.append(f"{col}={value!r}")
    return ", ".join(parts)


def _check_columns(arrow_schema: pa.Schema, source: str) -> None:
    names = list(arrow_schema.names)
    missing = [c for c in schema.REQUIRED_COLUMNS if c not in names]
    if missing:
        hints = []
        for col in missing:
            close = difflib.get_close_matches(col, names, n=1, cutoff=0.6)
            hints.append(f"'{col}'" + (f" (found '{close[0]}': rename it)" if close else ""))
        raise ScoresError(
            f"{source}: missing column{'s' if len(missing) > 1 else ''} {', '.join(hints)}. "
            f"A scores file needs the columns {list(schema.REQUIRED_COLUMNS)}; it has {names}."
        )
    checks = {
        schema.INPUT_ID: (pa.types.is_integer, "an integer type (int64)", "df['input_id'] = df['input_id'].astype('int64')"),
        schema.EDGE: (_is_stringlike, "strings", "df['edge'] = df['edge'].astype(str)"),
        schema.METHOD: (_is_stringlike, "strings", "df['method'] = df['method'].astype(str)"),
        schema.SCORE: (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "a float type (float32 or float64)",
                       "df['score'] = df['score'].astype('float64')"),
    }
    for col, (ok, expected, fix) in checks.items():
        dtype = arrow_schema.field(col).type
        if not ok(dtype):
            raise ScoresError(f"{source}: column '{col}' has type {dtype}, expected {expected}. Fix it with {fix}.")


def _is_stringlike(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def _plain_strings(data):
    """``data`` (a batch or table) with string-view edge and method columns as plain strings.

    Polars writes string columns as ``string_view`` (Utf8View); the rest of the
    reader, and Arrow's string kernels, work on ``string``.
    """
    for col in (schema.EDGE, schema.METHOD):
        i = data.schema.get_field_index(col)
        if i >= 0 and pa.types.is_string_view(data.schema.field(i).type):
            data = data.set_column(i, col, pc.cast(data.column(i), pa.string()))
    return data


def _check_batch(batch: pa.RecordBatch, source: str, row_offset: int) -> None:
    """Row-level checks that need no other batch: nulls, ids, scores."""
    for col in (schema.INPUT_ID, schema.EDGE, schema.METHOD):  # a null score is reported as non-finite below
        column = batch.column(col)
        if column.null_count:
            i = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise ScoresError(
                f"{source}: column '{col}' is empty (null) at row {row_offset + i} ({_describe_row(batch, i)}); "
                f"{column.null_count} null(s) in this part. Every row needs all four of {list(schema.REQUIRED_COLUMNS)}."
            )
    ids = batch.column(schema.INPUT_ID).to_numpy()
    if len(ids) and ids.dtype == np.uint64 and ids.max() > np.iinfo(np.int64).max:
        i = int(np.flatnonzero(ids > np.iinfo(np.int64).max)[0])
        raise ScoresError(
            f"{source}: column 'input_id' is {ids[i]} at row {row_offset + i}, beyond int64. "
            "input_id is the 0-based index of the input in the task dataset; renumber the inputs from 0."
        )
    if len(ids) and ids.min() < 0:
        i = int(np.flatnonzero(ids < 0)[0])
        raise ScoresError(
            f"{source}: column 'input_id' is negative at row {row_offset + i} ({_describe_row(batch, i)}). "
            "input_id is the 0-based index of the input in the task dataset; renumber the inputs from 0."
        )
    score = pc.fill_null(pc.cast(batch.column(schema.SCORE), pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(score)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ScoresError(
            f"{source}: column 'score' is {score[i]} at row {row_offset + i} ({_describe_row(batch, i)}); "
            f"{int(bad.sum())} non-finite score(s) in this part. Drop or recompute these rows (an overflow in "
            "float16/bf16 collection is the usual cause: collect with --dtype float32)."
        )
    for col in (schema.EDGE, schema.METHOD):
        values = batch.column(col)
        lengths = pc.utf8_length(values.dictionary_decode() if pa.types.is_dictionary(values.type) else values)
        empty = lengths.to_numpy(zero_copy_only=False) == 0
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise ScoresError(f"{source}: column '{col}' is an empty string at row {row_offset + i} ({_describe_row(batch, i)}).")


def _warn_unparsed(edges: list[str], source: str) -> None:
    _, unparsed = edge_table(edges)
    _warn_unparsed_names(unparsed, source)


def _warn_unparsed_names(unparsed: list[str], source: str) -> None:
    if unparsed:
        shown = ", ".join(repr(e) for e in unparsed[:3])
        warnings.warn(
            f"{source}: {len(unparsed)} edge name(s) do not follow the graph syntax "
            f"(e.g. {shown}); expected names like 'a0.h3->a2.h1<q>', 'm1->logits', 'input->m0'. "
            "They are kept and pooled in a generic 'other' group.",
            EdgeNameWarning,
            stacklevel=4,
        )


def _warn_near_exact(methods: list[str], source: str) -> None:
    """Warn about labels that look like ``exact`` but are not: they would be taken as approximate methods."""
    for label in methods:
        base = schema.parse_method(label)[0]
        if base == schema.EXACT:
            continue
        plain = base.strip().lower().replace("_", "-")
        if plain == schema.EXACT or difflib.get_close_matches(plain, [schema.EXACT], n=1, cutoff=0.8):
            warnings.warn(f"{source}: method {label!r} looks like {schema.EXACT!r} but is not spelled so: it is "
                          "treated as an approximate method, so its scores do not anchor the approximation error. "
                          f"Rename it to {schema.EXACT!r} if it holds exact activation-patching scores.",
                          MethodLabelWarning, stacklevel=4)


def _check_declared_methods(metadata: dict, methods: list[str], source: str) -> None:
    declared = list((metadata or {}).get("methods") or {})
    absent = [m for m in declared if m not in methods]
    collect = ((metadata or {}).get("extra") or {}).get("collect") or {}
    if collect.get("exact_inputs") == 0 or collect.get("shard"):  # asked for, but this file holds no exact input
        absent = [m for m in absent if m != schema.EXACT]
    if absent:
        raise ScoresError(
            f"{source}: method(s) {absent} are declared in the file metadata but have no rows. "
            "Re-run the collection of these methods, or drop them from the metadata's 'methods'."
        )


def validate_scores(table: pd.DataFrame | pa.Table, source: str = "scores table", metadata: dict | None = None) -> None:
    """Check a scores table against schema v1; raise :class:`ScoresError` on the first problem.

    Checks, in order: the four required columns and their types, nulls,
    negative ``input_id``, non-finite scores, empty strings, an empty table,
    methods without rows (unused categories of a categorical ``method``
    column, or methods declared in ``metadata``), and duplicate
    ``(input_id, edge, method)`` rows. Edge names outside the graph syntax
    only warn (:class:`EdgeNameWarning`).
    """
    if isinstance(table, pd.DataFrame):
        categories = None
        if schema.METHOD in table and isinstance(table[schema.METHOD].dtype, pd.CategoricalDtype):
            categories = list(table[schema.METHOD].cat.categories)
        table = _to_arrow(table, source)
    else:
        categories = None
        col = table.column(schema.METHOD) if schema.METHOD in table.schema.names else None
        if col is not None and pa.types.is_dictionary(col.type) and col.num_chunks:
            categories = sorted({v for chunk in col.chunks for v in chunk.dictionary.to_pylist()})
    _check_columns(table.schema, source)
    if table.num_rows == 0:
        raise ScoresError(f"{source}: the scores table is empty (no rows). Collect or simulate some scores first.")
    offset = 0
    for batch in table.to_batches():
        _check_batch(batch, source, offset)
        offset += batch.num_rows
    methods = sorted(set(_decoded(table.column(schema.METHOD)).unique().to_pylist()))
    if categories is not None:
        unused = [c for c in categories if c not in methods]
        if unused:
            raise ScoresError(
                f"{source}: method(s) {unused} are categories of the 'method' column but have no rows. "
                "Drop them (df['method'] = df['method'].cat.remove_unused_categories()) or collect them."
            )
    _check_declared_methods(metadata, methods, source)
    _warn_near_exact(methods, source)
    frame = pd.DataFrame({
        "i": table.column(schema.INPUT_ID).to_numpy(),
        "e": _decoded(table.column(schema.EDGE)).to_numpy(zero_copy_only=False),
        "m": _decoded(table.column(schema.METHOD)).to_numpy(zero_copy_only=False),
    })
    dup = frame.duplicated(keep="first").to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise ScoresError(
            f"{source}: duplicate (input_id, edge, method) at row {i} ({_describe_row(table.slice(i, 1), 0)}); "
            f"{int(dup.sum())} duplicate row(s). Each input, edge and method must be scored once: "
            "drop duplicates or check that shards do not overlap."
        )
    _warn_unparsed(sorted(set(frame["e"])), source)


def _decoded(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    if pa.types.is_dictionary(column.type):
        return pc.cast(column, column.type.value_type)
    return column


def _to_arrow(frame: pd.DataFrame, source: str) -> pa.Table:
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ScoresError(f"{source}: cannot convert the table to Arrow ({exc}). Check the column types.") from None


# --- reading ----------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``bayescirc`` metadata of a scores file (of its first part for a directory).

    Files written by other tools have none: the result is then ``{}``.
    """
    parts = _part_files(Path(path))
    meta = _open(parts[0]).schema_arrow.metadata or {}
    raw = meta.get(schema.METADATA_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ScoresError(f"{parts[0]}: the '{schema.METADATA_KEY.decode()}' metadata is not valid JSON.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("methods", {}), dict | type(None)):
        raise ScoresError(f"{parts[0]}: the '{schema.METADATA_KEY.decode()}' metadata must be a JSON object whose "
                          "'methods' (if any) maps method labels to their parameters; write it with "
                          "bayescirc.write_scores(..., metadata=...).")
    return meta


def _iter_batches(parts: list[Path], columns: list[str], filter_ids: tuple[int, int] | None = None,
                  dictionary: bool = False) -> Iterator[tuple[pa.RecordBatch, str, int]]:
    """Yield (batch, part name, row offset in that part), checking each part's columns.

    ``filter_ids = (lo, hi)`` skips row groups whose statistics show no
    ``lo <= input_id < hi``; ``dictionary`` reads string edge and method
    columns dictionary-encoded (indices instead of one string per row).
    """
    for part in parts:
        pf = _open(part, dictionary)
        _check_columns(pf.schema_arrow, str(part))
        offset = 0
        for rg in range(pf.num_row_groups):
            if filter_ids is not None:
                stats = pf.metadata.row_group(rg).column(pf.schema_arrow.get_field_index(schema.INPUT_ID)).statistics
                if stats is not None and stats.has_min_max and (stats.max < filter_ids[0] or stats.min >= filter_ids[1]):
                    offset += pf.metadata.row_group(rg).num_rows
                    continue
            with _decoding(part, rg):
                for batch in pf.iter_batches(columns=columns, row_groups=[rg], batch_size=ROW_GROUP_SIZE):
                    yield _plain_strings(batch), str(part), offset
                    offset += batch.num_rows


@contextlib.contextmanager
def _decoding(part: Path, row_group: int | None = None) -> Iterator[None]:
    """Turn a damaged part's decoding error (a corrupt or truncated page) into a :class:`ScoresError`."""
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        where = f"row group {row_group}" if row_group is not None else "its data"
        raise ScoresError(f"{part}: cannot decode {where} ({exc}); the file is damaged or truncated: "
                          "write or copy it again.") from None


def read_scores(path: str | os.PathLike, columns: list[str] | None = None, validate: bool = True) -> pd.DataFrame:
    """Read a scores file or directory of parts as one validated DataFrame.

    Parameters
    ----------
    path : str or Path
        A ``.parquet`` file or a directory of part files.
    columns : list of str, optional
        Columns to read, default all; the four required columns are always read.
    validate : bool, default True
        Run :func:`validate_scores` (errors name the part file and row).

    Returns
    -------
    DataFrame with ``edge`` and ``method`` as categoricals, ``input_id`` int64.
    """
    path = Path(path)
    parts = _part_files(path)
    tables = []
    for part in parts:
        pf = _open(part)
        _check_columns(pf.schema_arrow, str(part))
        wanted = None
        if columns is not None:
            wanted = list(dict.fromkeys([*schema.REQUIRED_COLUMNS, *columns]))
        with _decoding(part):
            table = _plain_strings(pf.read(columns=wanted))
        if validate:
            validate_scores(table, source=str(part))
        tables.append(table)
    table = pa.concat_tables([_normalise(t) for t in tables], promote_options="permissive")
    source = str(path)
    if validate:
        if len(parts) > 1:
            validate_scores(table, source=source, metadata=read_metadata(path))
        else:
            _check_declared_methods(read_metadata(path), sorted(set(_decoded(table.column(schema.METHOD)).unique().to_pylist())), source)
    frame = table.to_pandas()
    for col in (schema.EDGE, schema.METHOD):
        frame[col] = frame[col].astype("category")
    frame[schema.INPUT_ID] = frame[schema.INPUT_ID].astype("int64")
    return frame


def _normalise(table: pa.Table) -> pa.Table:
    """Cast the required columns to one schema so parts concatenate."""
    cols = {}
    for name in table.schema.names:
        col = table.column(name)
        if name in (schema.EDGE, schema.METHOD):
            col = pc.cast(_decoded(col), pa.string())
        elif name == schema.INPUT_ID:
            col = pc.cast(col, pa.int64())
        elif name == schema.SCORE and not pa.types.is_floating(col.type):
            col = pc.cast(col, pa.float64())
        cols[name] = col
    return pa.table(cols)


# --- writing ------------------------------------------------------------------------------


def _metadata_bytes(metadata: dict | None) -> dict[bytes, bytes]:
    from . import __version__

    meta = {
        "schema_version": schema.SCHEMA_VERSION,
        "sign_convention": schema.SIGN_CONVENTION,
        "aggregation": schema.AGGREGATION,
        "package_version": __version__,
    }
    meta.update(metadata or {})
    meta["schema_version"] = schema.SCHEMA_VERSION
    return {schema.METADATA_KEY: strict_json(meta, sort_keys=True, default=str).encode()}


def _arrow_schema(score_type: pa.DataType, extra: list[pa.Field], metadata: dict | None) -> pa.Schema:
    fields = [
        pa.field(schema.INPUT_ID, pa.int64()),
        pa.field(schema.EDGE, pa.dictionary(pa.int32(), pa.string())),
        pa.field(schema.METHOD, pa.dictionary(pa.int32(), pa.string())),
        pa.field(schema.SCORE, score_type),
        *extra,
    ]
    return pa.schema(fields, metadata=_metadata_bytes(metadata))


class ScoresWriter:
    """Stream rows into a scores file; the file appears only when complete.

    Use as a context manager; each :meth:`write` appends a DataFrame (or a
    dict of columns) as one or more row groups. Rows go to a temporary file
    beside ``path`` that is renamed onto ``path`` on a clean exit and removed
    on an exception, so a crashed collection never leaves a truncated file.

    Parameters
    ----------
    path : str or Path
        Destination ``.parquet`` file.
    metadata : dict, optional
        Fields of the ``bayescirc`` metadata (see ``schema.METADATA_FIELDS``).
    score_dtype : {"float32", "float64"}, default "float32"
    extra_columns : dict of name -> numpy dtype or Arrow type, optional
        Optional columns (e.g. ``clean_metric``) written after the four required ones.
    """

    def __init__(self, path, metadata: dict | None = None, score_dtype: str = "float32",
                 extra_columns: dict[str, str | pa.DataType] | None = None):
        self.path = Path(path)
        self._extra = dict(extra_columns or {})
        extra_fields = [pa.field(name, dt if isinstance(dt, pa.DataType) else pa.from_numpy_dtype(np.dtype(dt)))
                        for name, dt in self._extra.items()]
        self.schema = _arrow_schema(pa.from_numpy_dtype(np.dtype(score_dtype)), extra_fields, metadata)
        self._ctx = None
        self._writer = None
        self.rows = 0

    def __enter__(self) -> ScoresWriter:
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(tmp, self.schema, compression="zstd")
        return self

    def write(self, rows: pd.DataFrame | dict) -> None:
        """Append rows with the four required columns (and the declared extras)."""
        if isinstance(rows, pd.DataFrame):
            rows = {c: rows[c].to_numpy() if not isinstance(rows[c].dtype, pd.CategoricalDtype) else rows[c] for c in rows.columns}
        arrays = []
        for fld in self.schema:
            if fld.name not in rows:
                raise ValueError(f"rows lack column {fld.name!r}")
            values = rows[fld.name]
            if pa.types.is_dictionary(fld.type):
                if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
                    arr = pa.DictionaryArray.from_arrays(
                        pa.array(values.cat.codes.to_numpy(), pa.int32()), pa.array(values.cat.categories.astype(str), pa.string()))
                else:
                    arr = pc.dictionary_encode(pa.array(np.asarray(values, dtype=object), pa.string()))
                    arr = pa.DictionaryArray.from_arrays(pc.cast(arr.indices, pa.int32()), arr.dictionary)
            else:
                values = np.asarray(values)
                arr = pa.array(values.astype(object) if values.dtype.kind in "OUS" else values, fld.type, from_pandas=True)
            arrays.append(arr)
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        self._writer.write_batch(batch, row_group_size=ROW_GROUP_SIZE)
        self.rows += batch.num_rows

    def __exit__(self, exc_type, exc, tb):
        try:
            self._writer.close()
        except BaseException as close_error:
            if exc is None:  # the file is broken: remove it, report the close error
                self._ctx.__exit__(type(close_error), close_error, close_error.__traceback__)
                raise
        return self._ctx.__exit__(exc_type, exc, tb)


def _column_type(column: pd.Series, source: str) -> pa.DataType:
    """The Arrow type an extra column is written with (categoricals as plain strings)."""
    try:
        dtype = pa.Table.from_pandas(column.to_frame(), preserve_index=False).schema.field(0).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ScoresError(f"{source}: extra column {column.name!r} cannot be written to parquet ({exc}).") from None
    return dtype.value_type if pa.types.is_dictionary(dtype) else dtype


def write_scores(table: pd.DataFrame, path: str | os.PathLike, metadata: dict | None = None,
                 score_dtype: str | None = None) -> Path:
    """Validate ``table`` and write it as a schema-v1 scores file (atomically).

    Columns beyond the four required ones are kept. ``score_dtype`` defaults
    to the table's own float type. Returns the path written.
    """
    path = Path(path)
    validate_scores(table, source=f"table for {path}", metadata=metadata)
    extra = {c: _column_type(table[c], f"table for {path}") for c in table.columns if c not in schema.REQUIRED_COLUMNS}
    dtype = score_dtype or ("float32" if table[schema.SCORE].dtype == np.float32 else "float64")  # the contract's two
    with ScoresWriter(path, metadata=metadata, score_dtype=dtype, extra_columns=extra) as writer:
        writer.write(table)
    return path


# --- summaries ------------------------------------------------------------------------------


_NODE_ORDER = {"input": 0, "attn": 1, "mlp": 2, "logits": 3}


def _edge_sort_key(edge: str):
    """EAP-IG order (receiver in forward order, then source) for parseable edges; the rest after, by name."""
    try:
        info = parse_edge(edge)
    except ValueError:
        return (1, 0, 0, 0, 0, 0, edge)

    def node_key(layer, kind, head) -> tuple[int, int]:
        return (layer if layer is not None else 1 << 30, _NODE_ORDER[kind] * (1 << 20) + (head or 0))

    return (0, *node_key(info.receiver_layer, info.receiver_type, info.receiver_head),
            QKV.index(info.qkv) if info.qkv else 0, *node_key(info.source_layer, info.source_type, info.source_head), "")


@dataclass
class SufficientStats:
    """Per-edge sums of scores, grouped by observation pattern.

    For edge ``e`` and pattern ``p`` (the set of methods that scored an input,
    ``patterns[p, m]`` true when method ``m`` is in it), over the inputs with
    that pattern:

    - ``n[e, p]``: number of inputs,
    - ``sums[e, p, m]``: sum of method ``m``'s scores,
    - ``cross[e, p, m, k]``: sum of products of methods ``m`` and ``k``'s scores
      (the diagonal is the sum of squares).

    Entries for methods outside a pattern are zero. With exact scores on a
    subset of inputs this gives, per edge, the exact-only, exact-and-approximate
    and approximate-only moments the collapsed likelihood needs, including the
    cross-products between exact and each approximate method where both exist.
    """

    edges: np.ndarray
    methods: tuple[str, ...]
    patterns: np.ndarray
    n: np.ndarray
    sums: np.ndarray
    cross: np.ndarray
    input_ids: np.ndarray
    metadata: dict = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def per_method(self) -> pd.DataFrame:
        """Long table: edge, method, n, sum, sum_sq, mean, var (ddof=1), over all inputs."""
        rows = []
        in_pattern = self.patterns.astype(bool)
        for m, method in enumerate(self.methods):
            sel = in_pattern[:, m]
            n = self.n[:, sel].sum(1)
            s = self.sums[:, sel, m].sum(1)
            ss = self.cross[:, sel, m, m].sum(1)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(n > 0, s / np.maximum(n, 1), np.nan)
                var = np.where(n > 1, (ss - n * mean**2) / np.maximum(n - 1, 1), np.nan)
            rows.append(pd.DataFrame({"edge": self.edges, "method": method, "n": n, "sum": s, "sum_sq": ss,
                                      "mean": mean, "var": np.maximum(var, 0.0)}))
        out = pd.concat(rows, ignore_index=True)
        return out[out["n"] > 0].reset_index(drop=True)

    def exact_cross(self) -> pd.DataFrame:
        """Per edge and approximate method, moments over inputs that have both exact and approximate scores."""
        exact = [m for m, name in enumerate(self.methods) if schema.is_exact(name)]
        if not exact:
            return pd.DataFrame(columns=["edge", "method", "n", "sum_exact", "sum_exact_sq", "sum_approx", "sum_approx_sq", "sum_cross"])
        x = exact[0]
        rows = []
        in_pattern = self.patterns.astype(bool)
        for m, method in enumerate(self.methods):
            if m == x:
                continue
            sel = in_pattern[:, m] & in_pattern[:, x]
            rows.append(pd.DataFrame({
                "edge": self.edges, "method": method, "n": self.n[:, sel].sum(1),
                "sum_exact": self.sums[:, sel, x].sum(1), "sum_exact_sq": self.cross[:, sel, x, x].sum(1),
                "sum_approx": self.sums[:, sel, m].sum(1), "sum_approx_sq": self.cross[:, sel, m, m].sum(1),
                "sum_cross": self.cross[:, sel, x, m].sum(1),
            }))
        out = pd.concat(rows, ignore_index=True)
        return out[out["n"] > 0].reset_index(drop=True)

    def save(self, path: str | os.PathLike) -> None:
        """Save to an ``.npz`` file (atomic)."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, edges=self.edges.astype(str), methods=np.array(self.methods, dtype=str),
                                    patterns=self.patterns, n=self.n, sums=self.sums, cross=self.cross,
                                    input_ids=self.input_ids, metadata=np.array(json.dumps(self.metadata)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SufficientStats:
        with np.load(path) as z:
            return cls(edges=z["edges"].astype(object), methods=tuple(z["methods"].tolist()), patterns=z["patterns"],
                       n=z["n"], sums=z["sums"], cross=z["cross"], input_ids=z["input_ids"],
                       metadata=json.loads(str(z["metadata"])))


class _Coder:
    """Integer codes for the strings of a column, in order of first appearance, across batches.

    A batch's dictionary is mapped to the codes once and the mapping reused
    while the next batches carry an equal dictionary (one per row group in a
    parquet file), so coding a batch is one ``take`` of its indices.
    """

    def __init__(self):
        self.index: dict[str, int] = {}
        self._dictionary: pa.Array | None = None
        self._mapping = np.zeros(0, np.int64)
        self._identity = True

    @property
    def names(self) -> list[str]:
        return list(self.index)

    def codes(self, column: pa.Array) -> np.ndarray:
        if not pa.types.is_dictionary(column.type):
            column = pc.dictionary_encode(column)
        dictionary = column.dictionary
        if self._dictionary is None or not dictionary.equals(self._dictionary):
            index = self.index
            self._mapping = np.array([index.setdefault(s, len(index)) for s in dictionary.to_pylist()], np.int64)
            self._identity = bool((self._mapping == np.arange(len(self._mapping))).all())
            self._dictionary = dictionary
        indices = column.indices.to_numpy(zero_copy_only=False)
        return indices if self._identity else self._mapping[indices]

    def code_of(self, name: str) -> int | None:
        return self.index.get(name)


def _prefetched(batches: Iterator, depth: int = 2) -> Iterator:
    """Iterate ``batches`` in a background thread, ``depth`` items ahead.

    Parquet decoding releases the GIL, so the next row group is read while
    numpy scatters the current one (the machine's second core does the
    reading). Exceptions of the reader are re-raised here.
    """
    buffer: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in batches:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put((end, exc))

    thread = threading.Thread(target=work, name="bayescirc-parquet-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = buffer.get()
            if exc is not None:
                raise exc
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class _Reader:
    """One streaming pass over the parts: validates each batch and codes its edges and methods."""

    def __init__(self, parts: list[Path], edges: _Coder, methods: _Coder, validate: bool = True):
        self.parts, self.edges, self.methods, self.validate = parts, edges, methods, validate

    def batches(self, filter_ids: tuple[int, int] | None = None, columns=schema.REQUIRED_COLUMNS):
        """Yield ``(batch, part, offset, edge codes, method codes)``."""
        batches = _prefetched(_iter_batches(self.parts, list(columns), filter_ids, dictionary=True))
        try:
            yield from self._coded(batches)
        finally:
            batches.close()  # stops the reader thread when the consumer stops early

    def _coded(self, batches):
        for batch, part, offset in batches:
            if self.validate and not _batch_is_clean(batch):
                _check_batch(batch, part, offset)  # raises with the row and the fix
            e = self.edges.codes(batch.column(schema.EDGE))
            m = self.methods.codes(batch.column(schema.METHOD))
            if self.validate:
                for coder, codes in ((self.edges, e), (self.methods, m)):
                    empty = coder.code_of("")
                    if empty is not None and (codes == empty).any():
                        _check_batch(batch, part, offset)
            yield batch, part, offset, e, m


def _batch_is_clean(batch: pa.RecordBatch) -> bool:
    """Fast version of the checks of :func:`_check_batch` except empty strings (see :class:`_Reader`)."""
    if any(batch.column(col).null_count for col in schema.REQUIRED_COLUMNS):
        return False
    ids = batch.column(schema.INPUT_ID).to_numpy()
    if len(ids) and ids.min() < 0:
        return False
    score = batch.column(schema.SCORE)
    return not pa.types.is_floating(score.type) or bool(np.isfinite(score.to_numpy(zero_copy_only=False)).all())


def _score_dtype(files: list[pq.ParquetFile]) -> np.dtype:
    """float32 for the dense block when every part stores float32 (or narrower) scores, else float64."""
    narrow = all(pa.types.is_floating(t) and t.bit_width <= 32 for t in (f.schema_arrow.field(schema.SCORE).type for f in files))
    return np.dtype(np.float32 if narrow else np.float64)


def _id_range(files: list[pq.ParquetFile]) -> tuple[int, int] | None:
    """``[lo, hi)`` of ``input_id`` from the row-group statistics, or None when some are missing."""
    lo, hi = None, None
    for pf in files:
        col = pf.schema_arrow.get_field_index(schema.INPUT_ID)
        for rg in range(pf.num_row_groups):
            meta = pf.metadata.row_group(rg)
            if meta.num_rows == 0:
                continue
            stats = meta.column(col).statistics
            if stats is None or not stats.has_min_max:
                return None
            lo = stats.min if lo is None else min(lo, stats.min)
            hi = stats.max + 1 if hi is None else max(hi, stats.max + 1)
    return None if lo is None else (int(lo), int(hi))


def _positions(ids: np.ndarray, lo: int, chunk_ids: np.ndarray | None) -> np.ndarray:
    return ids - lo if chunk_ids is None else np.searchsorted(chunk_ids, ids)


def _raise_first_duplicate(reader: _Reader, block_shape, lo: int, hi: int, chunk_ids: np.ndarray | None) -> None:
    """Re-read rows with ``lo <= input_id < hi`` in file order and report the first repeated one."""
    W, M, E = block_shape
    seen = np.zeros(W * M * E, bool)
    for batch, part, offset, e, m in reader.batches((lo, hi)):
        bid = batch.column(schema.INPUT_ID).to_numpy()
        rows = np.flatnonzero((bid >= lo) & (bid < hi))
        flat = (_positions(bid[rows], lo, chunk_ids).astype(np.int64) * M + m[rows]) * E + e[rows]
        repeated = seen[flat]
        _, first = np.unique(flat, return_index=True)
        within = np.ones(len(flat), bool)
        within[first] = False
        bad = np.flatnonzero(repeated | within)
        if len(bad):
            j = bad[0]
            raise ScoresError(
                f"{part}: duplicate (input_id, edge, method) at row {offset + int(rows[j])} "
                f"(input_id={int(bid[rows[j]])}, edge={reader.edges.names[e[rows[j]]]!r}, "
                f"method={reader.methods.names[m[rows[j]]]!r}): each input, edge and method must be scored once. "
                "Drop duplicates or check that shards do not overlap."
            )
        seen[flat] = True
    raise AssertionError("duplicate rows counted but not found")  # pragma: no cover


class _DoesNotFit(Exception):
    """The one-pass dense block would exceed the memory budget."""


def _one_pass(reader: _Reader, id_range: tuple[int, int], dtype: np.dtype, memory_budget: float):
    """Read the file once into one dense block over the whole ``input_id`` range."""
    lo, hi = id_range
    block = None
    cell = DenseBlock.bytes_per_cell(dtype)
    for batch, _, _, e, m in reader.batches():
        bid = batch.column(schema.INPUT_ID).to_numpy()
        if len(bid) == 0:
            continue
        if bid.min() < lo or bid.max() >= hi:  # statistics that do not cover the data
            raise _DoesNotFit
        M, E = len(reader.methods.index), len(reader.edges.index)
        if block is None:
            if (hi - lo) * M * E * cell > memory_budget:
                raise _DoesNotFit
            block = DenseBlock(hi - lo, M, E, dtype)
        elif M > block.shape[1] or E > block.shape[2]:
            M, E = max(M, block.shape[1]), max(E, block.shape[2], int(block.shape[2] * 1.25))
            if (hi - lo) * M * E * cell > memory_budget:
                raise _DoesNotFit
            block.grow(M, E)
        block.scatter(bid - lo, m, e, batch.column(schema.SCORE).to_numpy(zero_copy_only=False))
    if block is None:
        return None
    if block.n_observed() != block.rows:
        _raise_first_duplicate(reader, block.shape, lo, hi, None)
    moments = PatternMoments(block.shape[1], block.shape[2])
    moments.add(block)
    return moments, lo + np.flatnonzero(block.observed.any(axis=(1, 2)))


def _chunked(reader: _Reader, dtype: np.dtype, memory_budget: float):
    """Index the file in one pass, then read it once per chunk of inputs whose dense block fits the budget."""
    ids = []
    for batch, _, _, _, _ in reader.batches():
        bid = batch.column(schema.INPUT_ID).to_numpy()
        if len(bid):
            heads = np.concatenate([[True], bid[1:] != bid[:-1]])  # sorted files: one id per run
            ids.append(np.unique(bid[heads]))
    if not ids:
        return None
    input_ids = np.unique(np.concatenate(ids))
    reader = _Reader(reader.parts, reader.edges, reader.methods, validate=False)
    M, E = len(reader.methods.index), len(reader.edges.index)
    chunk = int(max(1, min(len(input_ids), memory_budget // (M * E * DenseBlock.bytes_per_cell(dtype)))))
    moments = PatternMoments(M, E)
    for start in range(0, len(input_ids), chunk):
        chunk_ids = input_ids[start:start + chunk]
        lo, hi = int(chunk_ids[0]), int(chunk_ids[-1]) + 1
        lookup = None if hi - lo == len(chunk_ids) else chunk_ids
        block = DenseBlock(len(chunk_ids), M, E, dtype)
        for batch, _, _, e, m in reader.batches((lo, hi)):
            bid = batch.column(schema.INPUT_ID).to_numpy()
            score = batch.column(schema.SCORE).to_numpy(zero_copy_only=False)
            keep = (bid >= lo) & (bid < hi)
            if not keep.all():
                bid, e, m, score = bid[keep], e[keep], m[keep], score[keep]
            if len(bid):
                block.scatter(_positions(bid, lo, lookup), m, e, score)
        if block.n_observed() != block.rows:
            _raise_first_duplicate(reader, block.shape, lo, hi, lookup)
        moments.add(block)
    return moments, input_ids


def sufficient_statistics(path: str | os.PathLike, memory_budget: float = 2 * 2**30) -> SufficientStats:
    """Stream a scores file into :class:`SufficientStats`, validating as it reads.

    Rows are scattered into a dense ``(inputs, methods, edges)`` block of
    scores (float32 when the file stores float32) and the per-pattern moments
    are summed from it in float64 (see :mod:`bayescirc._moments`). When the
    block for the file's whole ``input_id`` range fits in ``memory_budget``
    bytes (known from the parquet statistics: GPT-2 small, 1,000 inputs and 3
    methods take about 0.5 GB), the file is read once. Otherwise it is read
    once to index it and once more per chunk of inputs (a file sorted by
    ``input_id``, as the collector and simulator write it, is then read about
    twice in all); peak memory stays near ``memory_budget`` plus a few row
    groups, whatever the file's size.
    """
    path = Path(path)
    parts = _part_files(path)
    source = str(path)
    metadata = read_metadata(path)
    files = []
    for part in parts:
        pf = _open(part)
        _check_columns(pf.schema_arrow, str(part))
        files.append(pf)
    dtype = _score_dtype(files)
    id_range = _id_range(files)
    del files
    result = None
    try:
        if id_range is not None:
            reader = _Reader(parts, _Coder(), _Coder())
            try:
                result = _one_pass(reader, id_range, dtype, memory_budget)
            except _DoesNotFit:
                result = None
        if result is None:
            reader = _Reader(parts, _Coder(), _Coder())
            result = _chunked(reader, dtype, memory_budget)
    except _TooManyMethods as exc:
        raise ScoresError(f"{source}: {exc}; split the methods over several files and fit them apart.") from None
    if result is None:
        raise ScoresError(f"{parts[0] if len(parts) == 1 else parts[0].parent}: the scores file is empty (no rows). "
                          "Collect or simulate some scores first.")
    moments, input_ids = result
    return _assemble(moments, reader.edges.names, reader.methods.names, input_ids, metadata, source)


def _assemble(moments: PatternMoments, edge_names: list[str], method_names: list[str], input_ids: np.ndarray,
              metadata: dict, source: str) -> SufficientStats:
    """Order edges (graph order), methods (exact first) and patterns (most methods first) and build the result."""
    codes = moments.codes()
    present = np.flatnonzero(moments.edge_counts() > 0)  # dictionary entries without rows are no edges
    keys = {i: _edge_sort_key(edge_names[i]) for i in present}
    edge_idx = np.array(sorted(present, key=keys.__getitem__), dtype=np.int64)
    used = 0
    for c in codes:
        used |= c
    method_idx = np.array(sorted((m for m in range(len(method_names)) if used >> m & 1),
                                 key=lambda m: (not schema.is_exact(method_names[m]), method_names[m])), dtype=np.int64)
    edges = [edge_names[i] for i in edge_idx]
    methods = [method_names[m] for m in method_idx]
    _check_declared_methods(metadata, methods, source)
    _warn_near_exact(methods, source)
    _warn_unparsed_names([edge_names[i] for i in edge_idx if keys[i][0] == 1], source)
    final = {c: sum(1 << j for j, m in enumerate(method_idx) if c >> int(m) & 1) for c in codes}
    codes = sorted(codes, key=lambda c: (-bin(final[c]).count("1"), final[c]))
    M = len(methods)
    patterns = np.array([[bool(final[c] >> j & 1) for j in range(M)] for c in codes], dtype=bool).reshape(len(codes), M)
    n, sums, cross = moments.arrays(codes, method_idx, edge_idx)
    return SufficientStats(edges=np.array(edges, dtype=object), methods=tuple(methods), patterns=patterns,
                           n=n, sums=sums, cross=cross, input_ids=input_ids.astype(np.int64), metadata=metadata)


def scores_summary(path: str | os.PathLike) -> dict:
    """Rows, inputs, edges and per-method counts of a scores file, plus its metadata."""
    stats = sufficient_statistics(path)
    per = stats.per_method()
    methods = {m: {"inputs": int(per.loc[per.method == m, "n"].max()), "edges": int((per.method == m).sum()),
                   "rows": int(per.loc[per.method == m, "n"].sum()),
                   "mean_abs_edge_mean": float(per.loc[per.method == m, "mean"].abs().mean())}
               for m in stats.methods}
    return {
        "path": str(path),
        "rows": int(sum(v["rows"] for v in methods.values())),
        "inputs": int(len(stats.input_ids)),
        "edges": int(stats.n_edges),
        "methods": methods,
        "metadata": stats.metadata,
    }


def exact_scores(path: str | os.PathLike, edges, method: str = schema.EXACT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One method's per-input scores as a dense ``(edges, inputs)`` matrix (the exact scores, for the Student-t fit and the PPC).

    Parameters
    ----------
    path : str or Path
        A scores file or directory of parts, already checked by :func:`sufficient_statistics`.
    edges : sequence of str
        Row order of the result (``SufficientStats.edges``); rows of other edges are ignored.
    method : str, default "exact"

    Returns
    -------
    ``(values, mask, input_ids)``: float64 ``(E, N)`` scores, ``(E, N)`` bool
    marking the scored cells, and the ``N`` sorted input ids that have at least
    one score of ``method``. Only row groups whose ``method`` statistics can
    hold ``method`` are read.
    """
    parts = _part_files(Path(path))
    edge_index = pd.Index(np.asarray(edges, dtype=object).astype(str))
    rows, ids, values = [], [], []
    mapping, last = None, None
    for batch, _, _ in _prefetched(_iter_method_batches(parts, method)):
        col = batch.column(schema.METHOD)
        if not pa.types.is_dictionary(col.type):
            col = pc.dictionary_encode(col)
        code = col.dictionary.to_pylist().index(method) if method in col.dictionary.to_pylist() else -1
        if code < 0:
            continue
        keep = np.flatnonzero(col.indices.to_numpy(zero_copy_only=False) == code)
        if not len(keep):
            continue
        edge_col = batch.column(schema.EDGE)
        if not pa.types.is_dictionary(edge_col.type):
            edge_col = pc.dictionary_encode(edge_col)
        if last is None or not edge_col.dictionary.equals(last):
            mapping, last = edge_index.get_indexer(edge_col.dictionary.to_pylist()), edge_col.dictionary
        e = mapping[edge_col.indices.to_numpy(zero_copy_only=False)[keep]]
        ok = e >= 0
        rows.append(e[ok])
        ids.append(batch.column(schema.INPUT_ID).to_numpy()[keep][ok])
        values.append(batch.column(schema.SCORE).to_numpy(zero_copy_only=False)[keep][ok].astype(np.float64))
    E = len(edge_index)
    if not rows:
        return np.zeros((E, 0)), np.zeros((E, 0), bool), np.zeros(0, np.int64)
    bid = np.concatenate(ids)
    input_ids = np.unique(bid)
    cols = np.searchsorted(input_ids, bid)
    e = np.concatenate(rows)
    out = np.zeros((E, len(input_ids)))
    mask = np.zeros((E, len(input_ids)), bool)
    out[e, cols] = np.concatenate(values)
    mask[e, cols] = True
    return out, mask, input_ids.astype(np.int64)


def _iter_method_batches(parts: list[Path], method: str) -> Iterator[tuple[pa.RecordBatch, str, int]]:
    """Batches of the row groups whose ``method`` statistics do not rule ``method`` out."""
    for part in parts:
        pf = _open(part, dictionary=True)
        col = pf.schema_arrow.get_field_index(schema.METHOD)
        for rg in range(pf.num_row_groups):
            stats = pf.metadata.row_group(rg).column(col).statistics
            if stats is not None and stats.has_min_max and isinstance(stats.min, str) and not stats.min <= method <= stats.max:
                continue
            with _decoding(part, rg):
                batches = pf.iter_batches(columns=list(schema.REQUIRED_COLUMNS), row_groups=[rg],
                                          batch_size=ROW_GROUP_SIZE)
                for batch in batches:
                    yield _plain_strings(batch), str(part), 0
