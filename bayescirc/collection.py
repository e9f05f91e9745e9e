"""``collect``: per-input edge scores of a model on a task, streamed to scores.parquet.

Inputs are tokenised with the model's default beginning-of-sequence handling
(``model.to_tokens``), checked (equal clean and corrupted lengths, single-token
answers), grouped by token length so that no batch is ever padded (padding
cannot change a score), and scored by :class:`bayescirc.patching.Engine`.
Rows go to the file batch by batch (one row group each), so memory holds one
batch of scores, never edges x inputs x methods.

Sharding: ``shard=(k, n)`` scores the k-th (1-based) of n contiguous slices of
the inputs and writes ``OUT/part-k-of-n.parquet``; a directory of parts reads
as one table (:func:`bayescirc.scores.read_scores`). A part that already exists
with the same settings is complete (parts are written atomically) and is
skipped, so re-running an interrupted job resumes it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from . import schema
from .errors import BayescircError, ModelError, TaskError

__all__ = ["collect", "prepare_inputs", "parse_methods", "parse_shard", "part_path", "EXACT_ROWS_PER_INPUT"]

DEFAULT_METHODS = (schema.EXACT, schema.EAP, schema.EAP_IG_INPUTS)
DEFAULT_IG_STEPS = 5
DEFAULT_BATCH = 32
EXACT_ROWS_PER_INPUT = 8  # exact passes patch batch_size x this many (input, edge) rows (no gradients kept)
_STEP_METHODS = (schema.EAP_IG_INPUTS, schema.EAP_IG_ACTIVATIONS)


def parse_methods(methods) -> list[str]:
    """``"exact,eap"`` or a sequence -> list of known method names (order kept, duplicates dropped)."""
    from .patching import SCORING_METHODS

    if isinstance(methods, str):
        methods = methods.split(",")
    names = list(dict.fromkeys(m.strip() for m in methods if m and m.strip()))
    unknown = [m for m in names if m not in SCORING_METHODS]
    if unknown or not names:
        raise BayescircError(f"unknown method(s) {unknown or methods!r}; choose from {list(SCORING_METHODS)} "
                             "(comma-separated, e.g. exact,eap,eap-ig-inputs).")
    return names


def parse_shard(shard) -> tuple[int, int] | None:
    """``"2/4"`` or ``(2, 4)`` -> ``(2, 4)``: the 2nd of 4 slices (1-based); ``None`` stays ``None``."""
    if shard is None:
        return None
    if isinstance(shard, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if match is None:
            raise BayescircError(f"--shard {shard!r}: expected k/n, e.g. 1/4 for the first of four slices.")
        shard = (int(match[1]), int(match[2]))
    k, n = (int(v) for v in shard)
    if not 1 <= k <= n:
        raise BayescircError(f"shard {k}/{n}: k must be between 1 and n (shards are numbered 1..n).")
    return k, n


def part_path(out: str | os.PathLike, shard: tuple[int, int]) -> Path:
    """``OUT/part-k-of-n.parquet``."""
    return Path(out) / f"part-{shard[0]}-of-{shard[1]}.parquet"


def _read(task, n_inputs=None) -> pd.DataFrame:
    """The task table; a table that :func:`read_task` already normalised is used as is."""
    from .tasks import TASK_COLUMNS, read_task

    if isinstance(task, pd.DataFrame) and {*TASK_COLUMNS, "answer_id", "distractor_id"} <= set(task.columns):
        return task if n_inputs is None else task.iloc[:n_inputs].reset_index(drop=True)
    return read_task(task, n_inputs=n_inputs)


# --- inputs --------------------------------------------------------------------------------


def _tokens_str(tokenizer, ids) -> str:
    try:
        return repr(tokenizer.convert_ids_to_tokens(list(ids)))
    except Exception:  # noqa: BLE001 - fall back to ids
        return repr(list(ids))


def _answer_id(model, where: str, column: str, text, token_id, prompt: str) -> int:
    tokenizer = model.tokenizer
    vocab = int(model.cfg.d_vocab)
    if token_id is not None and not pd.isna(token_id):
        if not 0 <= int(token_id) < vocab:
            raise TaskError(f"{where}: {column} token id {int(token_id)} is outside the model's vocabulary (0..{vocab - 1}).")
        return int(token_id)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise TaskError(f"{where}: {column} {text!r} is {len(ids)} tokens {_tokens_str(tokenizer, ids)}, "
                        f"not one. The metric compares single next tokens after the prompt {prompt!r}; choose a "
                        "one-token answer (with GPT-2 tokenizers usually with its leading space, e.g. ' Mary').")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and str(text).strip() != str(tokenizer.unk_token):
        raise TaskError(f"{where}: {column} {text!r} is not in the model's vocabulary: it tokenises to the unknown "
                        f"token {tokenizer.unk_token!r}, which every such word shares. Is the task meant for another "
                        "model? Choose an answer the model's tokenizer knows.")
    return int(ids[0])


def prepare_inputs(model, task, *, input_ids=None, n_inputs: int | None = None, batch_size: int | None = None):
    """Tokenise and check a task; group inputs by token length.

    Returns ``(batches, table)``: :class:`bayescirc.patching.Batch` objects
    (each of one token length, at most ``batch_size`` inputs when given, ids
    ascending within a length) and the task table. Raises :class:`TaskError`
    naming the row for mismatched clean/corrupted lengths (with both token
    lists), multi-token answers and prompts longer than the model's context.
    Every row is checked before anything is scored.
    """
    import torch

    from .patching import Batch
    from .tasks import row_location

    table = _read(task, n_inputs)
    rows = range(len(table)) if input_ids is None else [int(i) for i in input_ids]
    n_ctx = int(getattr(model.cfg, "n_ctx", 1 << 30))
    groups: dict[int, list] = {}
    for i in rows:
        if not 0 <= i < len(table):
            raise TaskError(f"input {i} is not a row of the task (it has {len(table)} rows).")
        rec, where = table.iloc[i], row_location(table, i)
        clean = model.to_tokens(rec["clean"], truncate=False)[0].tolist()
        corrupted = model.to_tokens(rec["corrupted"], truncate=False)[0].tolist()
        if len(clean) != len(corrupted):
            raise TaskError(
                f"{where}: clean and corrupted prompts tokenise to different lengths ({len(clean)} vs {len(corrupted)} "
                f"tokens): clean {_tokens_str(model.tokenizer, clean)}, corrupted {_tokens_str(model.tokenizer, corrupted)}. "
                "Patching compares the two runs position by position; edit the prompts so they align token by token.")
        if len(clean) > n_ctx:
            raise TaskError(f"{where}: the prompt is {len(clean)} tokens, longer than the model's context ({n_ctx}).")
        answer = _answer_id(model, where, "answer", rec["answer"], rec.get("answer_id"), rec["clean"])
        distractor = _answer_id(model, where, "distractor", rec["distractor"], rec.get("distractor_id"), rec["clean"])
        groups.setdefault(len(clean), []).append((i, clean, corrupted, answer, distractor))
    device = next(model.parameters()).device
    batches = []
    for length in sorted(groups, key=lambda n: groups[n][0][0]):
        members = groups[length]
        step = batch_size or len(members)
        for start in range(0, len(members), step):
            part = members[start:start + step]
            batches.append(Batch(
                ids=np.array([p[0] for p in part], dtype=np.int64),
                clean=torch.tensor([p[1] for p in part], device=device),
                corrupted=torch.tensor([p[2] for p in part], device=device),
                answer=torch.tensor([p[3] for p in part], device=device),
                distractor=torch.tensor([p[4] for p in part], device=device),
            ))
    return batches, table


# --- collect -----------------------------------------------------------------------------------


def _describe_model(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or type(model).__name__)


def _labels(methods: list[str], ig_steps: int) -> dict[str, tuple[str, dict]]:
    out = {}
    for m in methods:
        params = {"steps": ig_steps} if m in _STEP_METHODS else {}
        label = schema.method_label(m, steps=ig_steps) if params and ig_steps != DEFAULT_IG_STEPS else m
        out[label] = (m, params)
    return out


def _settings_match(existing: dict, metadata: dict) -> bool:
    keys = ("model", "task", "metric", "methods", "n_inputs", "seed")
    old = (existing.get("extra") or {}).get("collect") or {}
    new = (metadata.get("extra") or {}).get("collect") or {}
    return all(existing.get(k) == metadata.get(k) for k in keys) and all(old.get(k) == v for k, v in new.items())


def _check_out(out: Path, shard: tuple[int, int] | None, task) -> None:
    """Refuse an ``out`` that would fail after the model loads or overwrite something that is not ours."""
    from .scores import read_metadata

    if not out.exists() or out.is_dir():
        return
    if shard is not None:
        raise BayescircError(f"--out {out} is a file, but with --shard --out must be a directory (it receives "
                             f"{part_path('OUT', shard).name}); choose a directory.")
    if isinstance(task, (str, os.PathLike)) and Path(task).exists() and out.resolve() == Path(task).resolve():
        raise BayescircError(f"--out {out} is the task file; refusing to overwrite it. Choose another --out.")
    try:
        ours = bool(read_metadata(out))
    except BayescircError:
        ours = False
    if not ours:
        raise BayescircError(f"--out {out} exists and is not a bayescirc scores file; refusing to overwrite it. "
                             "Delete it or choose another --out.")


_PART = re.compile(r"part-(\d+)-of-(\d+)\.parquet")


def _check_layout(out: Path, shard: tuple[int, int], given: bool) -> None:
    """Refuse a part whose inputs would overlap the parts of another k/n split already in ``out``."""
    if not out.is_dir():
        return
    others = sorted(p.name for p in out.iterdir()
                    if (m := _PART.fullmatch(p.name)) and int(m[2]) != shard[1])
    if others:
        what = f"--shard {shard[0]}/{shard[1]}" if given else "a run without --shard (one part, part-1-of-1)"
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise BayescircError(f"{out} already holds parts of another split ({shown}); {what} would overlap their "
                             "inputs and the directory would no longer read as one table. Use the same n as those "
                             "parts, or another --out.")


def collect(model, task, methods=DEFAULT_METHODS, *, out=None, metric: str = "logit-diff", device: str = "auto",
            dtype=None, batch_size: int | None = None, ig_steps: int = DEFAULT_IG_STEPS, exact_inputs: int | None = None,
            n_inputs: int | None = None, seed: int = 0, shard=None, progress: bool = True,
            return_table: bool = True) -> pd.DataFrame | None:
    """Score every edge of ``model`` on every input of ``task``; return (and write) the scores table.

    Parameters
    ----------
    model : str, Path, HookedTransformer or TransformerBridge
        A Hugging Face directory, a hub name, or a loaded model (see :func:`bayescirc.bridge.load_model`).
    task : str, Path or DataFrame
        Task file or table in either layout (see :func:`bayescirc.tasks.read_task`).
    methods : sequence of str or comma-separated str, default ("exact", "eap", "eap-ig-inputs")
        Any of ``exact``, ``eap``, ``eap-ig-inputs``, ``eap-ig-activations``, ``clean-corrupted``
        (definitions in :mod:`bayescirc.patching`).
    out : path, optional
        ``scores.parquet`` to write; with ``shard`` (or an existing directory) a directory
        receiving ``part-k-of-n.parquet``. Refused before anything loads: an existing file
        that is not a bayescirc scores file (e.g. the task), a file with ``shard``, and a
        directory holding the parts of a split into another number of shards.
    metric : {"logit-diff", "prob-diff", "kl"}, default "logit-diff"
    device : {"auto", "cpu", "cuda", "cuda:N", ...}, default "auto"
        Checked before loading. With a loaded model, anything but ``auto`` must be where the model is.
    dtype : str or torch.dtype, optional
        Model dtype when loading (default float32); scores are float64 for float64 models, else float32.
        With a loaded model, a dtype other than the model's is refused (a loaded model is not converted).
    batch_size : int, optional
        Inputs per forward/backward pass of the gradient methods; exact patching runs
        ``batch_size x 8`` patched rows per pass. Default automatic: 32, halved on out-of-memory.
    ig_steps : int, default 5
        Steps of ``eap-ig-inputs`` and ``eap-ig-activations``.
    exact_inputs : int, optional
        Exact scores on the first K inputs only (approximations on all).
    n_inputs : int, optional
        Use the first N rows of the task.
    seed : int, default 0
        Seeds torch (recorded in the metadata; scoring itself is deterministic).
    shard : "k/n" or (k, n), optional
        Score the k-th of n contiguous slices of the inputs into ``out/part-k-of-n.parquet``
        (n at most the number of inputs); an existing part with the same settings (dtype
        included) is complete and is skipped (resume).
    progress : bool, default True
        tqdm bar in edges x inputs.
    return_table : bool, default True
        With ``out``, False skips reading the written table back and returns None
        (very large runs: the file is the result).

    Returns
    -------
    DataFrame in the scores schema v1 plus ``clean_metric`` and ``corrupted_metric``
    (None when ``return_table`` is False and ``out`` is given).
    """
    import torch

    from . import __version__  # noqa: F401 - recorded by the writer
    from .bridge import _first_parameter, _is_loaded_model, _torch_dtype, check_load_options, load_model, scoring_mode
    from .metrics import check_metric
    from .patching import Engine
    from .scores import ScoresWriter, read_metadata, read_scores

    try:
        check_metric(metric)
    except ValueError as exc:
        raise BayescircError(str(exc)) from None
    methods = parse_methods(methods)
    if ig_steps < 1:
        raise BayescircError(f"ig_steps must be >= 1, got {ig_steps}.")
    if exact_inputs is not None and exact_inputs < 0:
        raise BayescircError(f"exact_inputs must be >= 0, got {exact_inputs}.")
    if batch_size is not None and batch_size < 1:
        raise BayescircError(f"batch_size must be >= 1, got {batch_size}.")
    check_load_options(model, device=device, dtype=dtype)
    given_shard = shard = parse_shard(shard)
    if out is not None:
        _check_out(Path(out), shard, task)
    if out is not None and shard is None and Path(out).is_dir():
        shard = (1, 1)
    if out is not None and shard:
        _check_layout(Path(out), shard, given_shard is not None)
    target = None if out is None else (part_path(out, shard) if shard else Path(out))
    labels = _labels(methods, ig_steps)

    table = _read(task, n_inputs)
    n_total = len(table)
    if given_shard and given_shard[1] > n_total:
        raise BayescircError(f"--shard {given_shard[0]}/{given_shard[1]}: the task has only {n_total} inputs to split; "
                             f"use at most {n_total} shards.")
    ids = np.arange(n_total)
    if shard:
        ids = np.array_split(ids, shard[1])[shard[0] - 1]
    param = _first_parameter(model) if _is_loaded_model(model) else None
    run_dtype = param.dtype if param is not None else _torch_dtype(dtype)
    metadata = {
        "model": _describe_model(model),
        "task": "DataFrame" if isinstance(task, pd.DataFrame) else str(task),
        "metric": metric,
        "methods": {label: params for label, (_, params) in labels.items()},
        "n_inputs": int(n_total),
        "seed": seed,
        "extra": {"collect": {"exact_inputs": exact_inputs if exact_inputs is None else min(exact_inputs, n_total),
                              "shard": list(shard) if shard else None,
                              "ig_steps": ig_steps, "input_ids": [int(ids[0]), int(ids[-1]) + 1] if len(ids) else [],
                              "dtype": str(run_dtype).replace("torch.", "")}},
    }
    if target is not None and shard and target.exists():
        existing = read_metadata(target)
        if not _settings_match(existing, metadata):
            raise BayescircError(f"{target} exists with other settings (model, task, metric, methods, inputs, seed or dtype); "
                                 "delete it or choose another --out to collect anew.")
        return read_scores(target) if return_table else None

    torch.manual_seed(seed)
    loaded = load_model(model, device=device, dtype=dtype, progress=progress)
    with scoring_mode(loaded) as graph:
        engine = Engine(loaded, graph, metric)
        metadata["extra"]["collect"].update(n_layers=graph.n_layers, n_heads=graph.n_heads, n_edges=graph.n_edges,
                                            parallel_attn_mlp=graph.parallel_attn_mlp,
                                            dtype=str(engine.dtype).replace("torch.", ""), device=str(engine.device))
        batches, _ = prepare_inputs(loaded, table, input_ids=ids)
        score_dtype = "float64" if engine.dtype == torch.float64 else "float32"
        n_exact = len(ids) if exact_inputs is None else int(np.sum(ids < exact_inputs))
        total = graph.n_edges * (len(ids) * sum(1 for m in methods if m != schema.EXACT)
                                 + (n_exact if schema.EXACT in methods else 0))
        writer = ScoresWriter(target, metadata=metadata, score_dtype=score_dtype,
                              extra_columns={schema.CLEAN_METRIC: score_dtype, schema.CORRUPTED_METRIC: score_dtype}
                              ) if target is not None else None
        frames = []
        state = {"size": batch_size or DEFAULT_BATCH}
        bar = _progress_bar(progress, total)
        try:
            if writer is not None:
                writer.__enter__()
            for group in batches:
                start = 0
                while start < len(group):
                    size = state["size"]
                    sub = group.take(np.arange(start, min(len(group), start + size)))
                    try:
                        rows = _score_batch(engine, sub, labels, exact_inputs, size, bar)
                    except Exception as exc:  # noqa: BLE001 - back off on OOM only
                        from .patching import is_oom

                        if not is_oom(exc) or size == 1:
                            raise
                        state["size"] = max(1, size // 2)
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        continue
                    if writer is not None:
                        writer.write(rows)
                    else:
                        frames.append(rows)
                    start += len(sub)
        except BaseException as exc:
            if writer is not None:
                writer.__exit__(type(exc), exc, exc.__traceback__)
            raise
        finally:
            bar.close()
        if writer is not None:
            writer.__exit__(None, None, None)
    if target is not None:
        return read_scores(target) if return_table else None
    frame = pd.concat(frames, ignore_index=True)
    for col in (schema.EDGE, schema.METHOD):
        frame[col] = frame[col].astype("category")
    return frame


def _progress_bar(progress: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=" edge-inputs", unit_scale=True, disable=not progress, dynamic_ncols=True,
                desc="collect")


def _score_batch(engine, batch, labels: dict, exact_inputs, size: int, bar) -> pd.DataFrame:
    """Long-format rows for one batch: every requested method on every edge and input."""
    bases = {base for base, _ in labels.values()}
    exact_mask = np.ones(len(batch), bool) if exact_inputs is None else batch.ids < exact_inputs
    want_exact = schema.EXACT in bases and exact_mask.any()
    run = engine.prepare(batch, resid=want_exact, grads=bool(bases & {schema.EAP, schema.CLEAN_CORRUPTED}))
    E = len(engine.edges)
    parts = []
    for label, (base, params) in labels.items():
        if base == schema.EXACT:
            if not want_exact:
                continue
            keep = np.flatnonzero(exact_mask)
            sub = batch.take(keep)
            sub_run = _take_run(run, keep)
            scores = engine.exact_scores(sub, sub_run, rows=size * EXACT_ROWS_PER_INPUT, progress=bar.update)
            index = keep
        else:
            scores = engine.gradient_scores(base, batch, run, steps=params.get("steps", DEFAULT_IG_STEPS))
            index = np.arange(len(batch))
            bar.update(E * len(batch))
        values = scores.detach().cpu().numpy()
        parts.append(pd.DataFrame({
            schema.INPUT_ID: np.repeat(batch.ids[index], E),
            schema.EDGE: np.tile(np.asarray(engine.edges, dtype=object), len(index)),
            schema.METHOD: label,
            schema.SCORE: values.reshape(-1),
            schema.CLEAN_METRIC: np.repeat(run.clean_metric.cpu().numpy()[index], E),
            schema.CORRUPTED_METRIC: np.repeat(run.corrupted_metric.cpu().numpy()[index], E),
        }))
    frame = pd.concat(parts, ignore_index=True)
    return frame.sort_values(schema.INPUT_ID, kind="stable", ignore_index=True)


def _take_run(run, keep: np.ndarray):
    import torch

    from .patching import Run

    if len(keep) == run.clean_out.shape[0]:
        return run
    t = torch.as_tensor(keep, device=run.clean_out.device)
    return Run(clean_out=run.clean_out[t], corr_out=run.corr_out[t], clean_metric=run.clean_metric[t],
               corrupted_metric=run.corrupted_metric[t], clean_logprobs=run.clean_logprobs[t],
               resid_pre=[r[t] for r in run.resid_pre], resid_final=run.resid_final[t],
               grads=None if run.grads is None else run.grads[t])


def default_model():
    """The shipped ``ioi-toy`` model directory, or a :class:`ModelError` saying it is missing."""
    from .bridge import DEFAULT_MODEL, shipped_model

    try:
        return shipped_model(DEFAULT_MODEL)
    except ModelError as exc:
        raise ModelError(f"no --model given and the default shipped model {DEFAULT_MODEL!r} is missing from this "
                         f"installation ({exc}). Pass --model with a Hugging Face model directory or hub name.") from None
