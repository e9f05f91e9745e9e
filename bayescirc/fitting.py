"""``fit``: per-input scores -> posterior of the hierarchical model -> :class:`~bayescirc.posterior.FitResult`.

The steps, each a small function below:

1. per-edge sufficient statistics (streamed from the file; a DataFrame is
   written to a temporary parquet file first), degenerate methods dropped;
2. a MAP estimate of the globals on a wide ``log tau`` grid, then per-edge
   grids refined around each edge's conditional posterior of ``log tau``;
3. NUTS or SVI over the globals of :func:`bayescirc.model.collapsed_model`
   (every per-edge quantity integrated out);
4. per posterior draw, ``mu``, ``tau``, ``delta`` and the Rao-Blackwellised
   inclusion probability drawn from their exact conditionals;
5. the edges table, the variance decomposition, diagnostics and a posterior
   predictive check of the intrinsic-variation likelihood.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from . import schema
from .errors import BayescircError, FitError
from .graph import edge_table
from .posterior import FitResult
from .scores import SufficientStats, _part_files, exact_scores, sufficient_statistics, write_scores

__all__ = ["fit", "FitWarning", "INFERENCES", "LIKELIHOODS", "INCLUSION_RULES", "ERROR_POOLINGS", "APPROX_ONLY", "hdi", "parse_threshold"]

INFERENCES = ("auto", "nuts", "svi")
LIKELIHOODS = ("gaussian", "student-t")
ERROR_POOLINGS = ("type", "method")
APPROX_ONLY = ("auto", "full", "mean")
INCLUSION_RULES = ("slab", "threshold")
SAME_SCORE = 1e-6  # x the typical score size: inputs whose scores differ by less are copies of one another
NUTS_MAX_EDGES = 5000  # "auto" uses NUTS up to this many edges, SVI above
DRAWS = 1000  # default draws per chain
LARGE_SVI_DRAWS = 500  # default total SVI draws above NUTS_MAX_EDGES: per-edge draws cost draws x edges
SVI_EDGE_DRAWS_PER_GLOBAL = 20  # above NUTS_MAX_EDGES: per-edge draws per draw of the globals (they share its grid)
GLOBAL_SITES = ("alpha", "beta", "sigma", "omega", "slab_sd", "pi", "tau_loc", "tau_spread", "type_sd", "type_z",
                "layer_sd", "layer_z")


class FitWarning(UserWarning):
    """Something about the data or the fit that the user must know (also listed in summary.json)."""


# --- options -------------------------------------------------------------------------------------


def _choice(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise FitError(f"{name}={value!r} is not one of {list(valid)}.")
    return value


def parse_threshold(value) -> tuple[float | None, float | None]:
    """``0.2`` -> (0.2, None) in metric units; ``"5%"`` -> (None, 0.05) as a fraction of the mean total effect."""
    if value is None:
        return None, None
    if isinstance(value, (int, float)):
        number, percent = float(value), False
    else:
        text = str(value).strip()
        match = re.fullmatch(r"([0-9.eE+-]+)\s*(%?)", text)
        if match is None:
            raise FitError(f"threshold {value!r} is not a number or a percentage such as '5%'.")
        number, percent = float(match[1]), bool(match[2])
    if not math.isfinite(number) or number <= 0:
        raise FitError(f"threshold {value!r} must be a positive number (metric units) or percentage.")
    return (None, number / 100) if percent else (number, None)


# --- data -------------------------------------------------------------------------------------------


def _load(scores, workdir: Path) -> tuple[SufficientStats, Path]:
    """Sufficient statistics of a scores path or DataFrame, and the path they came from."""
    if isinstance(scores, pd.DataFrame):
        path = workdir / "scores.parquet"
        write_scores(scores, path)
    elif isinstance(scores, (str, os.PathLike)):
        path = Path(scores)
    else:
        raise FitError(f"scores must be a path to a scores.parquet file/directory or a DataFrame, got {type(scores).__name__}.")
    return sufficient_statistics(path), path


def _exact_matrix(path: Path, stats: SufficientStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact per-input scores as (edges x exact inputs) values and mask, and the input ids."""
    exact = [m for m in stats.methods if schema.is_exact(m)]
    E = len(stats.edges)
    if not exact:
        return np.zeros((E, 0)), np.zeros((E, 0), bool), np.zeros(0, np.int64)
    values, mask, ids = exact_scores(path, stats.edges, exact[0])
    return np.asarray(values, float), mask, ids


def _total_effect(path: Path) -> float | None:
    """Mean over inputs of corrupted minus clean metric, when the scores file carries them."""
    names = pq.ParquetFile(_part_files(path)[0]).schema_arrow.names
    if schema.CLEAN_METRIC not in names or schema.CORRUPTED_METRIC not in names:
        return None
    frames = [pq.read_table(p, columns=[schema.INPUT_ID, schema.CLEAN_METRIC, schema.CORRUPTED_METRIC]).to_pandas()
              for p in _part_files(path)]
    frame = pd.concat(frames).drop_duplicates(schema.INPUT_ID)
    return float((frame[schema.CORRUPTED_METRIC] - frame[schema.CLEAN_METRIC]).mean())


def _drop_methods(stats: SufficientStats, drop: list[int]) -> SufficientStats:
    keep = [k for k in range(len(stats.methods)) if k not in drop]
    return replace(stats, methods=tuple(stats.methods[k] for k in keep), patterns=stats.patterns[:, keep],
                   sums=stats.sums[:, :, keep], cross=stats.cross[:, :, keep][:, :, :, keep])


def _degenerate_methods(stats: SufficientStats) -> tuple[SufficientStats, list[str]]:
    """Drop methods whose scores are all zero (they carry no information); say so."""
    notes = []
    per = stats.per_method()
    drop = []
    for k, m in enumerate(stats.methods):
        rows = per[per.method == m]
        if len(rows) and float(rows["sum_sq"].sum()) == 0.0:
            drop.append(k)
            notes.append(f"method {m!r} scored every edge and input as exactly 0; it carries no information and was "
                         "left out of the fit (check how it was collected).")
    if drop and len(drop) == len(stats.methods):
        raise FitError("every score in the file is exactly 0: there is nothing to fit. Check the collection "
                       "(the clean and corrupted prompts may be identical).")
    return (_drop_methods(stats, drop) if drop else stats), notes


def chosen_inference(inference: str, n_edges: int) -> str:
    """The inference ``fit`` runs: ``auto`` is NUTS up to :data:`NUTS_MAX_EDGES` edges, SVI above."""
    if inference != "auto":
        return inference
    return "nuts" if n_edges <= NUTS_MAX_EDGES else "svi"


def _identical_inputs(stats: SufficientStats) -> list[str]:
    """Say so when every input gives the same scores on every edge: copies of one prompt, not a task's inputs."""
    per = stats.per_method()
    many = per[per["n"] >= 2]
    if len(stats.input_ids) < 2 or not len(many):
        return []
    if (np.sqrt(many["var"].to_numpy()) > SAME_SCORE * _scale(stats)).any():
        return []
    return [f"all {len(stats.input_ids)} inputs give the same scores on every edge (to {SAME_SCORE:g} of the scores' "
            "size): they look like copies of one prompt. The input-to-input spread tau is then 0 and every interval "
            "as narrow as that makes it: it describes this prompt, not a task. Collect scores on distinct prompts."]


def _scale(stats: SufficientStats) -> float:
    """Typical size of the scores (metric units): RMS of the most reliable method's scores."""
    per = stats.per_method()
    order = sorted(stats.methods, key=lambda m: not schema.is_exact(m))
    for m in order:
        rows = per[per.method == m]
        ms = float(rows["sum_sq"].sum() / max(1, rows["n"].sum()))
        if ms > 0:
            return math.sqrt(ms)
    raise FitError("every score in the file is exactly 0: there is nothing to fit.")


def _groups(edges: np.ndarray) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, list[str], list[str]]:
    table, _ = edge_table([str(e) for e in edges])
    layers = pd.concat([table["source_layer"], table["receiver_layer"]]).dropna()
    n_layers = int(layers.max()) + 1 if len(layers) else 0
    # the logits are read after the last block: they pool with a layer of their own (as edge_table(n_layers=...))
    table.loc[(table["receiver_type"] == "logits") & table["receiver_layer"].isna(), "receiver_layer"] = n_layers
    types = sorted(table["edge_type"].unique())
    type_idx = table["edge_type"].map({t: i for i, t in enumerate(types)}).to_numpy()
    layer_labels = table["receiver_layer"].astype("string").fillna("other")
    levels = sorted(layer_labels.unique(), key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    layer_idx = layer_labels.map({s: i for i, s in enumerate(levels)}).to_numpy()
    return table, type_idx.astype(np.int32), layer_idx.astype(np.int32), types, levels


# --- numerics ------------------------------------------------------------------------------------------


def use_compilation_cache() -> str | None:
    """Keep compiled JAX programs on disk so later fits of the same shapes skip compilation.

    Compiling the model's programs costs tens of seconds; bootstrap refits,
    simulation-based calibration and repeated fits of one file compile the very
    same programs (data are arguments, never constants). The directory is
    ``$BAYESCIRC_JAX_CACHE``, else ``$XDG_CACHE_HOME/bayescirc/jax`` (default
    ``~/.cache/bayescirc/jax``); ``BAYESCIRC_JAX_CACHE=off`` disables it, and a
    cache directory the user already configured in JAX is left alone.
    Returns the directory in use, or None.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    setting = os.environ.get("BAYESCIRC_JAX_CACHE", "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    directory = Path(setting) if setting else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bayescirc" / "jax"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile every time, as JAX does by default
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # JAX keeps only programs that took >= 1 s to compile; a fit also compiles
    # ~500 small ones (NumPyro runs the model op by op while it initialises),
    # ~11 s together at GPT-2 scale, which a warm cache then skips too
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return str(directory)


def cpu_devices_for_chains(chains: int) -> bool:
    """Let NUTS run ``chains`` chains side by side on a multi-core CPU; True when this call set the device count.

    JAX sees all CPU cores as one device, so NumPyro runs chains one after
    another there. Before JAX's first operation in the process this asks for
    one CPU device per chain on a machine with 2 or more cores, as
    ``numpyro.set_host_device_count`` does (more chains than cores then share
    the cores; NumPyro runs chains side by side only with a device each).
    Measured on 2 cores, a 2-chain fit of ``ioi-toy`` scores: 435 s -> 264 s.
    It leaves alone a process whose JAX already runs, or where ``XLA_FLAGS``
    or ``jax_num_cpu_devices`` already say how many devices there are.
    """
    import jax

    wanted = chains if (os.cpu_count() or 1) > 1 else 1
    if (wanted <= 1 or jax.config.jax_num_cpu_devices >= 0
            or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")):
        return False
    try:
        jax.config.update("jax_num_cpu_devices", wanted)
    except RuntimeError:  # JAX already ran something in this process: its device count is fixed
        return False
    return True


def hdi(draws: np.ndarray, prob: float) -> tuple[np.ndarray, np.ndarray]:
    """Highest-density interval of each column of ``draws`` (n_draws, k): the narrowest window with ``prob`` mass."""
    x = np.sort(np.asarray(draws), axis=0)
    n = x.shape[0]
    width = max(1, min(n - 1, int(math.floor(prob * n))))
    spans = x[width:] - x[: n - width]
    start = np.argmin(spans, axis=0)
    cols = np.arange(x.shape[1])
    return x[start, cols], x[start + width, cols]


# --- the fit ---------------------------------------------------------------------------------------------


def fit(scores, *, out=None, inference: str = "auto", chains: int = 2, draws: int | None = None, warmup: int | None = None,
        seed: int = 0, hdi_prob: float = 0.9, inclusion: str = "slab", threshold=None, likelihood: str = "gaussian",
        progress: bool = True, spike_sd: float = 0.0, svi_steps: int | None = None,
        prior_scale: float | None = None, error_pooling: str = "type", approx_only: str = "auto") -> FitResult:
    """Fit the hierarchical model to per-input edge scores.

    Parameters
    ----------
    scores : str, Path or DataFrame
        A schema-v1 scores file or directory of parts, or the table itself.
    out : str or Path, optional
        Fit directory to write (``edges.parquet``, ``posterior.nc``, ``summary.json``), atomically.
    inference : {"auto", "nuts", "svi"}, default "auto"
        NUTS (the reference posterior) up to 5,000 edges, SVI (a multivariate-normal
        guide over the globals) above.
    chains, draws, warmup : int, default 2, 1000, draws
        NUTS settings; SVI draws ``chains * draws`` samples from its guide, stored
        as one chain. Above 5,000 edges SVI's default is 500 draws in all: the
        per-edge draws and ``posterior.nc`` grow as draws x edges (at GPT-2 scale
        500 draws take ~9 s and ~250 MB), and 500 draws give 90% intervals
        whose ends move by ~0.1 posterior SD between fits. There each draw of
        the globals serves 20 per-edge draws, which share its grid weights
        (the globals are pinned down by that many edges; ``posterior.nc``
        holds each global draw 20 times in a row). On a CPU, NUTS runs the chains
        side by side, one core each, when ``fit`` is the first JAX work of the
        process (:func:`cpu_devices_for_chains`); else one after the other.
    seed : int, default 0
    hdi_prob : float, default 0.9
        Probability of the reported highest-density intervals.
    inclusion : {"slab", "threshold"}, default "slab"
        ``slab``: posterior probability that the edge's mean is in the slab.
        ``threshold``: posterior probability that ``|mu| > threshold``.
    threshold : float or str, optional
        For ``inclusion="threshold"``: metric units (``0.1``) or a fraction of the
        mean total effect (``"5%"``).
    likelihood : {"gaussian", "student-t"}, default "gaussian"
        Intrinsic input variation; ``student-t`` is robust to outlying inputs
        (needs the exact per-input scores in memory: edges x exact inputs).
    progress : bool, default True
    spike_sd : float, default 0
        SD of the spike (0: edges outside the circuit have exactly zero mean).
    svi_steps : int, optional
        Most SVI optimisation steps [default 3000], run in compiled chunks of 100
        (rounded up to a multiple of 100). SVI stops earlier, after at least 500,
        once the mean loss of the last 250 steps is no lower than that of the 250
        before (beyond twice its standard error and 0.1%); ``summary.json`` records
        ``svi_steps_run``.
    prior_scale : float, optional
        Typical score size the priors are relative to [default: RMS of the exact
        (else first approximate) scores]; fixed for simulation-based calibration.
    error_pooling : {"type", "method"}, default "type"
        Groups that share approximation parameters (bias alpha, scale beta,
        noise sigma, per-edge error SD omega). ``type``: each method x edge type
        (``attn->attn<q>``, ``mlp->logits``, ...), partially pooled towards the
        method's values (a method's error differs by orders of magnitude
        between edge types on real models). ``method``: one set per method.
    approx_only : {"auto", "full", "mean"}, default "auto"
        How inputs scored only by approximate methods enter the likelihood.
        ``mean``: for edges with 2+ exact inputs, their mean with its observed
        standard error, so the intrinsic SD ``tau`` comes from the exact inputs
        and the approximations inform the edge's mean. ``full``: each input
        through the model, so their scatter also informs ``tau`` through the
        type's approximation scale ``beta``; when an edge's own scale differs
        from its type's (common on real models) that scatter inflates ``tau``
        and can put a clear edge in the spike, and simulation-based calibration
        of ``full`` finds ``tau`` over-estimated (README). Edges without 2
        exact inputs always use ``full``. ``auto``: ``mean`` with the Gaussian
        likelihood, ``full`` with Student-t (which needs every input).

    Returns
    -------
    FitResult

    Notes
    -----
    ``fit`` turns on JAX's 64-bit mode (``jax_enable_x64``) for the whole
    process: the closed-form evidences need double precision. JAX code run
    afterwards in the same process (a NumPyro model of your own, say) then
    works in float64 by default, and draws its random numbers in float64.
    """
    _choice("inference", inference, INFERENCES)
    _choice("likelihood", likelihood, LIKELIHOODS)
    _choice("error_pooling", error_pooling, ERROR_POOLINGS)
    _choice("approx_only", approx_only, APPROX_ONLY)
    if approx_only == "auto":
        approx_only = "mean" if likelihood == "gaussian" else "full"
    if approx_only == "mean" and likelihood != "gaussian":
        raise FitError(f"approx_only='mean' works with likelihood='gaussian' only (got {likelihood!r}): the "
                       "Student-t fit takes exact inputs from a separate table. Use one or the other.")
    _choice("inclusion", inclusion, INCLUSION_RULES)
    if not 0 < hdi_prob < 1:
        raise FitError(f"hdi_prob={hdi_prob} must lie strictly between 0 and 1 (e.g. 0.9).")
    if chains < 1 or (draws is not None and draws < 1) or (warmup is not None and warmup < 0):
        given = ", ".join(f"{k}={v}" for k, v in (("chains", chains), ("draws", draws), ("warmup", warmup))
                          if v is not None)
        raise FitError(f"chains and draws must be >= 1 and warmup >= 0 (got {given}).")
    if draws is not None and chains * draws < 2:
        raise FitError(f"{chains} chain x {draws} draw is a single posterior draw: intervals need at least 2 "
                       "(the defaults draw hundreds).")
    thr_abs, thr_frac = parse_threshold(threshold)
    if inclusion == "threshold" and thr_abs is None and thr_frac is None:
        raise FitError("inclusion='threshold' needs a threshold: metric units (0.1) or a percentage of the mean total "
                       "effect ('5%').")
    if inclusion == "slab" and threshold is not None:
        raise FitError("a threshold is only used with inclusion='threshold'.")
    if spike_sd < 0:
        raise FitError(f"spike_sd={spike_sd} must be >= 0.")
    if out is not None:
        from ._io import check_replaceable
        from .posterior import FIT_DIR_CONTENTS

        check_replaceable(out, FIT_DIR_CONTENTS)  # before the fit, not after it

    import jax

    jax.config.update("jax_enable_x64", True)
    use_compilation_cache()
    from . import _fit_engine as engine

    started = time.perf_counter()
    clock = _Clock()
    with tempfile.TemporaryDirectory(prefix="bayescirc-fit-") as tmp:
        stats, path = _load(scores, Path(tmp))
        notes: list[str] = []
        stats, dropped = _degenerate_methods(stats)
        notes += dropped + _identical_inputs(stats)
        exact_values, exact_mask, _ = _exact_matrix(path, stats)
        total_effect = _total_effect(path) if thr_frac is not None else None
    clock.lap("statistics")
    E = len(stats.edges)
    has_exact = any(schema.is_exact(m) for m in stats.methods)
    approx = [m for m in stats.methods if not schema.is_exact(m)]
    if not has_exact:
        notes.append("NO EXACT SCORES: the approximation error (bias alpha, scale beta, per-edge error omega) cannot be "
                     "learnt from the data and rests on the priors (alpha ~ 0, beta ~ 1 within 10%). Effects, intervals "
                     "and inclusion probabilities are only as good as that assumption; score a subset of inputs "
                     "exactly (collect --exact-inputs) to calibrate the approximations.")
    if likelihood == "student-t" and not has_exact:
        raise FitError("likelihood='student-t' models outlying exact scores and needs exact scores; this file has none.")
    inference = chosen_inference(inference, E)
    if inference == "nuts":
        cpu_devices_for_chains(chains)
    if draws is None:
        draws = DRAWS if inference == "nuts" or E <= NUTS_MAX_EDGES else math.ceil(LARGE_SVI_DRAWS / chains)
    n_inputs = len(stats.input_ids)
    if n_inputs < 2:
        notes.append(f"only {n_inputs} input: the input-to-input spread tau rests on its hierarchical prior.")
    for note in notes:
        warnings.warn(note, FitWarning, stacklevel=2)

    table, type_idx, layer_idx, types, layers = _groups(stats.edges)
    scale = float(prior_scale) if prior_scale else _scale(stats)
    problem = engine.Problem.build(stats, type_idx, layer_idx, len(types), len(layers), scale, spike_sd,
                                   likelihood, exact_values, exact_mask, error_pooling=error_pooling,
                                   approx_only=approx_only, progress=progress)
    clock.lap("start")
    result = engine.run(problem, inference=inference, chains=chains, draws=draws,
                        warmup=draws if warmup is None else warmup, seed=seed, progress=progress,
                        svi_steps=svi_steps or 3000)
    clock.lap(inference)
    thr_value, thr_origin = None, None
    if inclusion == "threshold":
        thr_value, thr_origin = _threshold_value(thr_abs, thr_frac, total_effect, problem, result)
    # SVI's draws of the globals are independent; above NUTS_MAX_EDGES they are pinned down, so several per-edge
    # draws share each one's grid weights (the costly part of the per-edge draws)
    per_global = SVI_EDGE_DRAWS_PER_GLOBAL if inference == "svi" and E > NUTS_MAX_EDGES else 1
    per_edge = engine.edge_draws(problem, result, seed=seed, threshold=thr_value, progress=progress,
                                 per_global=per_global)
    if "samples" in per_edge:
        result = replace(result, samples=per_edge.pop("samples"))
    clock.lap("edge_draws")

    from .fit_outputs import assemble

    res = assemble(stats=stats, table=table, approx=approx, has_exact=has_exact, problem=problem, result=result,
                   per_edge=per_edge, hdi_prob=hdi_prob, inclusion=inclusion, threshold=thr_value,
                   threshold_origin=thr_origin, likelihood=likelihood, inference=inference, notes=notes,
                   settings=dict(chains=chains, draws=draws, seed=seed,
                                 warmup=(draws if warmup is None else warmup) if inference == "nuts" else None,
                                 spike_sd=spike_sd, svi_steps=svi_steps or 3000, threshold=threshold,
                                 scale=scale, error_pooling=error_pooling, approx_only=approx_only,
                                 nuts_mass_matrix=result.mass_matrix, nuts_chain_method=result.chain_method,
                                 nuts_rescaled_coordinates=result.rescaled),
                   exact_values=exact_values, exact_mask=exact_mask, layers=layers)
    clock.lap("outputs")
    res.summary["settings"].update(fit_seconds=round(time.perf_counter() - started, 3), timings=clock.laps)
    for w in res.summary["diagnostics"]["warnings"][len(notes):]:  # the notes were warned above
        warnings.warn(w, FitWarning, stacklevel=2)
    if out is not None:
        try:
            res.save(out)
        except OSError as exc:
            raise BayescircError(f"{out}: cannot write the fit directory ({exc}).") from None
    return res


class _Clock:
    """Seconds spent in each phase of the fit (summary.json -> settings -> timings)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def _threshold_value(thr_abs, thr_frac, total_effect, problem, result) -> tuple[float, str]:
    if thr_abs is not None:
        return thr_abs, "metric units"
    if total_effect is not None and total_effect != 0:
        return abs(total_effect) * thr_frac, f"{thr_frac:.4g} x |mean total effect| = |{total_effect:.4g}| (corrupted - clean metric)"
    approx_total = float(abs(problem.naive_effect.sum()))
    if approx_total == 0:
        raise FitError("cannot express the threshold as a fraction: the mean total effect is 0. Give it in metric units.")
    return approx_total * thr_frac, (f"{thr_frac:.4g} x |sum of the edges' mean effects| = {approx_total:.4g} "
                                     "(the scores file has no clean/corrupted metric columns)")
