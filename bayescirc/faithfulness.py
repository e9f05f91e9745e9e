"""Faithfulness of posterior circuits on held-out inputs, with an interval over posterior draws.

A circuit ``C`` is evaluated as EAP-IG and MIB do: the model runs on the clean
input with the circuit's edges carrying clean activations and every other edge
the corrupted one. With ``m`` the task metric (e.g. logit difference),

    faithfulness(C) = (m(C) - m(corrupted)) / (m(full) - m(corrupted))

where ``m(full)`` is the clean run and ``m(corrupted)`` the fully corrupted run.
By default each ``m`` is averaged over the held-out inputs first (a ratio of
means, MIB's normalisation, stable when a single input's denominator is near
zero); ``per_input=True`` averages the per-input ratios instead. 1 means the
circuit recovers the full model's behaviour, 0 that it does no better than the
corrupted run.

:func:`circuit_faithfulness` is the arithmetic; :func:`evaluate` samples circuits from a
fit, runs them through the collector's patching machinery
(:func:`bayescirc.patching.evaluate_circuits`, distinct circuits batched once
each) and reports the median-probability circuit's faithfulness and the
distribution over posterior circuits.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import atomic_dir, strict_json
from .errors import BayescircError
from .metrics import check_metric

__all__ = ["FaithfulnessResult", "circuit_faithfulness", "evaluate", "held_out_inputs", "interval"]

FAITHFULNESS_FILES = ("faithfulness.json", "circuits.parquet", "summary.txt")
"""What ``FaithfulnessResult.save`` writes."""


def circuit_faithfulness(values: np.ndarray, clean: np.ndarray, corrupted: np.ndarray, *, per_input: bool = False) -> np.ndarray:
    """Faithfulness of each circuit.

    Parameters
    ----------
    values : array ``[circuits, inputs]``
        Metric with only the circuit's edges clean.
    clean, corrupted : array ``[inputs]``
        Metric of the full (clean) model and of the fully corrupted run.
    per_input : bool, default False
        False: ratio of input-averaged metrics; True: mean of per-input ratios.

    Returns
    -------
    array ``[circuits]``
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    clean = np.asarray(clean, dtype=np.float64)
    corrupted = np.asarray(corrupted, dtype=np.float64)
    if values.shape[1] != clean.shape[0] or clean.shape != corrupted.shape:
        raise ValueError(f"shapes differ: values {values.shape}, clean {clean.shape}, corrupted {corrupted.shape}")
    if values.shape[1] == 0:
        raise BayescircError("no held-out inputs to evaluate faithfulness on.")
    if per_input:
        gap = clean - corrupted
        if np.any(gap == 0):
            i = int(np.flatnonzero(gap == 0)[0])
            raise BayescircError(f"input {i}: the full and corrupted metrics are equal ({clean[i]!r}), so a per-input "
                                 "ratio is undefined; use the ratio of means (per_input=False) or drop the input.")
        return ((values - corrupted) / gap).mean(axis=1)
    gap = clean.mean() - corrupted.mean()
    if gap == 0:
        raise BayescircError(f"the mean full-model metric equals the mean corrupted metric ({clean.mean()!r}): "
                             "the task shows no effect to recover, so faithfulness is undefined.")
    return (values.mean(axis=1) - corrupted.mean()) / gap


def interval(samples: np.ndarray, prob: float = 0.9) -> tuple[float, float]:
    """Central (equal-tailed) ``prob`` interval of ``samples``."""
    if not 0 < prob < 1:
        raise BayescircError(f"interval probability {prob!r} must be in (0, 1).")
    lo, hi = np.quantile(np.asarray(samples, dtype=np.float64), [(1 - prob) / 2, (1 + prob) / 2])
    return float(lo), float(hi)


def held_out_inputs(held_out, n_task: int, n_fit: int | None, fitted: Sequence[int] | None = None) -> list[int]:
    """Task rows to evaluate on.

    ``None``: every task row the fit did not see; an int ``N``: the first ``N``
    of those; ``"A:B"``: rows ``A .. B-1``; a sequence of ints: those rows.
    ``fitted``: the task rows (``input_id``) the fit saw; without it (fits
    saved before it was recorded) the fit is taken to have seen rows
    ``0 .. n_fit-1``. Explicit rows that the fit saw are kept, with a warning.
    """
    seen = set(range(int(n_fit or 0))) if fitted is None else {int(r) for r in fitted}
    if held_out is None or isinstance(held_out, (int, np.integer)):
        if held_out is not None and held_out < 1:
            raise BayescircError(f"held_out={held_out}: ask for at least one held-out input.")
        unseen = [r for r in range(n_task) if r not in seen]
        wanted = len(unseen) if held_out is None else int(held_out)
        if not unseen or wanted > len(unseen):
            raise BayescircError(f"the task has {n_task} inputs and the fit saw {len(seen & set(range(n_task)))} of "
                                 f"them: {len(unseen)} left, {wanted} asked for. Pass a longer task, or held-out "
                                 "rows explicitly (e.g. --held-out 0:50, which may overlap the fit's inputs).")
        return unseen[:wanted]
    if isinstance(held_out, str):
        a, sep, b = held_out.partition(":")
        try:
            rows = list(range(int(a), int(b))) if sep else [int(a)]
        except ValueError:
            raise BayescircError(f"held-out {held_out!r}: use N (count), A:B (rows A..B-1) or a list of rows.") from None
    else:
        rows = [int(r) for r in held_out]
    bad = [r for r in rows if not 0 <= r < n_task]
    if not rows or bad:
        raise BayescircError(f"held-out rows must be within the task's {n_task} rows; got {bad[:3] or 'none'}.")
    overlap = [r for r in rows if r in seen]
    if overlap:
        warnings.warn(f"{len(overlap)} of the {len(rows)} held-out rows were fitted (e.g. row {overlap[0]}): their "
                      "faithfulness is not out of sample.", FaithfulnessWarning, stacklevel=3)
    return rows


class FaithfulnessWarning(UserWarning):
    """Faithfulness that is in-sample, rests on a near-zero denominator, or uses another model or task than the fit."""


def _check_provenance(fit, model, task) -> None:
    """Warn when ``model`` or ``task`` (given as paths) is not the one the fit's scores were collected with.

    Compared by name (a model directory or task file may have moved since), from
    the scores' metadata; a loaded model, a task table or a fit without that
    record is not checked. Circuits from one model's scores mean little on another.
    """
    recorded = fit.metadata.get("scores_metadata") or {}
    for what, given in (("model", model), ("task", task)):
        before = recorded.get(what)
        if not isinstance(given, (str, os.PathLike)) or not isinstance(before, str) or before == "DataFrame":
            continue
        if Path(os.fspath(given)).resolve().name != Path(before).resolve().name:
            warnings.warn(f"the fit's scores were collected with {what} {before!r}, but this evaluation uses "
                          f"{os.fspath(given)!r}: the circuits describe the first; check --{what}.",
                          FaithfulnessWarning, stacklevel=3)


@dataclass
class FaithfulnessResult:
    """Faithfulness of sampled posterior circuits.

    Attributes
    ----------
    circuits : DataFrame
        One row per sampled circuit: ``circuit``, ``draw``, ``size``, ``faithfulness``.
    median_circuit : dict
        ``size`` and ``faithfulness`` of the median-probability circuit.
    inputs : list of int
        Held-out task rows evaluated.
    metrics : dict
        Mean full-model and corrupted metric over the held-out inputs.
    settings : dict
    """

    circuits: pd.DataFrame
    median_circuit: dict
    inputs: list
    metrics: dict
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        f = self.circuits["faithfulness"].to_numpy()
        prob = self.settings.get("interval_prob", 0.9)
        lo, hi = interval(f, prob)
        return {"median_circuit": self.median_circuit, "posterior": {
                    "mean": float(f.mean()), "sd": float(f.std()), "median": float(np.median(f)),
                    "interval_prob": prob, "low": lo, "high": hi, "n_circuits": int(len(f)),
                    "n_distinct": int(self.circuits["distinct"].nunique()) if "distinct" in self.circuits else None},
                "n_inputs": len(self.inputs), "metrics": self.metrics, "settings": self.settings}

    def to_text(self) -> str:
        s = self.summary()
        p, m = s["posterior"], s["median_circuit"]
        return "\n".join([
            f"faithfulness on {s['n_inputs']} held-out inputs (metric {self.settings.get('metric')}; "
            f"full {self.metrics['clean_mean']:.3f}, corrupted {self.metrics['corrupted_mean']:.3f})",
            f"median-probability circuit ({m['size']} edges): {m['faithfulness']:.3f}",
            f"posterior circuits ({p['n_circuits']} draws, rule {self.settings.get('rule')}): mean {p['mean']:.3f}, "
            f"median {p['median']:.3f}, {p['interval_prob']:.0%} interval [{p['low']:.3f}, {p['high']:.3f}]",
        ])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``faithfulness.json``, ``circuits.parquet`` and ``summary.txt`` atomically."""
        directory = Path(directory)
        with atomic_dir(directory, replaces=FAITHFULNESS_FILES) as tmp:
            (tmp / "faithfulness.json").write_text(strict_json(self.summary(), indent=2, default=str))
            self.circuits.to_parquet(tmp / "circuits.parquet", index=False)
            (tmp / "summary.txt").write_text(self.to_text() + "\n")
        return directory


def _warn_small_denominators(clean: np.ndarray, corrupted: np.ndarray, rows: np.ndarray, per_input: bool) -> None:
    """Warn when faithfulness divides by a gap between clean and corrupted runs that is noise-sized."""
    gap = clean - corrupted
    if per_input:
        tiny = np.abs(gap) < 0.01 * np.median(np.abs(gap))
        if tiny.any():
            warnings.warn(f"{int(tiny.sum())} held-out input(s) (e.g. row {int(rows[np.flatnonzero(tiny)[0]])}) have a "
                          "clean-corrupted gap under 1% of the median: their per-input ratios dominate the average. "
                          "Drop them (--held-out) or use the ratio of means (without --per-input).",
                          FaithfulnessWarning, stacklevel=3)
    elif len(gap) > 1 and abs(gap.mean()) < 2 * gap.std(ddof=1) / np.sqrt(len(gap)):
        warnings.warn(f"the mean clean-corrupted gap ({gap.mean():.3g}) is within 2 standard errors of 0 on these "
                      f"{len(gap)} inputs: the model barely separates clean from corrupted, so faithfulness is "
                      "unstable. Use more held-out inputs or another task.", FaithfulnessWarning, stacklevel=3)


def evaluate(fit, model, task, *, n_circuits: int = 100, rule: str = "slab", held_out=None,
             metric: str = "logit-diff", interval_prob: float = 0.9, per_input: bool = False, device: str = "auto",
             dtype=None, batch_size: int | None = None, seed: int = 0, progress: bool = True) -> FaithfulnessResult:
    """Faithfulness of circuits sampled from a fit, on held-out inputs of a task.

    Parameters
    ----------
    fit : FitResult or fit directory
    model : path, hub name or loaded model
        The model the scores were collected on.
    task : path or DataFrame
        The task; row ``i`` is input ``i`` (see :func:`bayescirc.tasks.read_task`).
    n_circuits : int, default 100
        Posterior circuits to sample (:func:`bayescirc.circuits.sample_circuits`).
    rule : {"slab", "topk:K", "threshold:D"}, default "slab"
    held_out : None, int, "A:B" or list of int
        Inputs to evaluate on (:func:`held_out_inputs`); default the task rows after the fit's inputs.
    metric : str, default "logit-diff"
    interval_prob : float, default 0.9
        Probability of the central interval over posterior circuits.
    per_input : bool, default False
        Average per-input ratios instead of the ratio of averaged metrics.
    device, dtype, batch_size, progress
        Passed to :func:`bayescirc.patching.evaluate_circuits`.
    seed : int, default 0

    Returns
    -------
    FaithfulnessResult
    """
    from .circuits import CircuitWarning, sample_circuits
    from .posterior import FitResult, load_fit
    from .tasks import read_task

    try:
        from .patching import evaluate_circuits
    except ImportError as exc:
        raise BayescircError(f"evaluating circuits needs bayescirc.patching (the collector's patching), "
                             f"which is not available ({exc}).") from None
    if isinstance(fit, (str, os.PathLike)):
        fit = load_fit(fit)
    if not isinstance(fit, FitResult):
        raise BayescircError(f"evaluate needs a FitResult or a fit directory, got {type(fit).__name__}.")
    if not 0 < interval_prob < 1:
        raise BayescircError(f"interval probability {interval_prob} must be in (0, 1), e.g. 0.9.")
    try:
        check_metric(metric)
    except ValueError as exc:
        raise BayescircError(str(exc)) from None
    table = read_task(task)
    _check_provenance(fit, model, task)
    n_fit = fit.summary.get("n_inputs") or fit.metadata.get("n_inputs")
    inputs = held_out_inputs(held_out, len(table), n_fit, fit.summary.get("input_ids"))
    samples = sample_circuits(fit, n=n_circuits, rule=rule, seed=seed)
    # the median-probability circuit of the whole posterior (what `circuits` reports), not of the n sampled;
    # the same edges as above, so any warning about them has been given once already
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CircuitWarning)
        median = sample_circuits(fit, rule=rule, seed=seed).median_circuit()
    packed = np.packbits(samples.indicators, axis=1)
    _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    circuits = [set(samples.edges[j] for j in np.flatnonzero(samples.indicators[i])) for i in first]
    circuits.append(set(median))
    result = evaluate_circuits(model, task if not isinstance(task, pd.DataFrame) else table, circuits, metric=metric,
                               inputs=inputs, device=device, dtype=dtype, batch_size=batch_size, progress=progress)
    values = np.asarray(result.values, dtype=np.float64)
    if values.shape[0] != len(circuits):
        raise RuntimeError(f"evaluate_circuits returned {values.shape[0]} rows for {len(circuits)} circuits")
    _warn_small_denominators(np.asarray(result.clean, float), np.asarray(result.corrupted, float),
                             np.asarray(getattr(result, "input_ids", inputs)), per_input)
    f = circuit_faithfulness(values, result.clean, result.corrupted, per_input=per_input)
    per_circuit = pd.DataFrame({"circuit": np.arange(samples.n_circuits), "draw": samples.draws,
                                "size": samples.sizes, "distinct": inverse, "faithfulness": f[inverse]})
    clean, corrupted = np.asarray(result.clean, float), np.asarray(result.corrupted, float)
    return FaithfulnessResult(
        circuits=per_circuit, median_circuit={"size": len(median), "faithfulness": float(f[-1])},
        inputs=[int(i) for i in np.asarray(getattr(result, "input_ids", inputs))],
        metrics={"clean_mean": float(clean.mean()), "corrupted_mean": float(corrupted.mean())},
        settings={"n_circuits": n_circuits, "rule": samples.rule, "metric": metric, "interval_prob": interval_prob,
                  "per_input": per_input, "seed": seed, "held_out": held_out if not isinstance(held_out, Sequence)
                  or isinstance(held_out, str) else list(held_out)})
