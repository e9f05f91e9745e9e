"""Stability of circuits: what should be reported with every circuit.

For each approximate or exact method in a scores file (method labels carry
hyper-parameters, e.g. ``eap-ig-inputs:steps=20``), the **conventional
pipeline** averages each edge's score over inputs, selects the top-k edges by
``|mean|`` (or those with ``|mean| > D``) and prunes to input->logits paths.
The **Bayesian pipeline** fits the hierarchical model and takes the
median-probability circuit. Both are rerun on ``B`` bootstrap resamples of the
inputs (the same resamples for every method and pipeline) and reported side by side:

- ``jaccard_mean`` / ``jaccard_p05``: mean and 5th percentile of the Jaccard
  similarity over all pairs of bootstrap circuits;
- ``spearman_mean`` / ``kendall_mean``: rank correlation of the edge ranking
  that drives the selection (``|mean score|``; posterior inclusion probability
  for the Bayesian pipeline) between consecutive resamples ``(b, b+1 mod B)``
  (at most 200 pairs);
- Jaccard between the circuits of every pair of methods (full data, per k) and
  between the circuits of every pair of k (per method);
- per edge, from exact scores: coefficient of variation ``sd / |mean|`` across
  inputs and sign consistency ``max(P(score > 0), P(score < 0))``.

With ``match_k_to="bayes"`` the conventional top-k also runs at k equal to the
size of the Bayesian median-probability circuit on the full data, so the two
pipelines are compared at the same circuit size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import schema
from ._io import atomic_dir
from .circuits import EdgeIndex, _pairwise, jaccard_matrix, top_k_mask
from .errors import BayescircError

__all__ = ["StabilityResult", "stability", "bootstrap_counts", "selection_stability", "exact_variability"]

CONVENTIONAL, BAYESIAN = "conventional", "bayesian"
MAX_RANK_PAIRS = 200  # rank correlations use the first 200 consecutive pairs (Kendall costs O(E log E) each)
BOOTSTRAP_COLUMNS = ["pipeline", "method", "selection", "k", "threshold", "circuit_size", "boot_size_mean",
                     "jaccard_mean", "jaccard_p05", "spearman_mean", "kendall_mean", "n_bootstrap"]


# --- pure pieces ---------------------------------------------------------------------------------------


def bootstrap_counts(n_inputs: int, n_bootstrap: int, seed: int = 0) -> np.ndarray:
    """``[B, n_inputs]`` multiplicities of each input in ``B`` resamples with replacement of size ``n_inputs``."""
    rng = np.random.default_rng([seed, 7])
    picks = rng.integers(0, n_inputs, size=(n_bootstrap, n_inputs))
    counts = np.zeros((n_bootstrap, n_inputs), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n_bootstrap), n_inputs), picks.ravel()), 1)
    return counts


def weighted_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row of ``counts`` ``[B, N]``, the mean of ``values`` ``[N, E]`` over inputs with those multiplicities.

    Missing scores (NaN) are left out of their edge's mean; an edge with no
    score in a resample gets NaN.
    """
    present = ~np.isnan(values)
    sums = counts @ np.where(present, values, 0.0)
    n = counts @ present.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, sums / np.where(n > 0, n, 1), np.nan)


def select(means: np.ndarray, *, k: int | None = None, threshold: float | None = None) -> np.ndarray:
    """Unpruned selection per row: top-``k`` by ``|mean|`` or ``|mean| > threshold``."""
    if (k is None) == (threshold is None):
        raise ValueError("give exactly one of k and threshold")
    if k is not None:
        return top_k_mask(means, k)
    return np.nan_to_num(np.abs(np.atleast_2d(means)), nan=-np.inf) > threshold


def _rank_correlations(ranking: np.ndarray) -> tuple[float, float]:
    """Mean Spearman and Kendall correlation between rows ``b`` and ``b+1 mod B`` of ``ranking`` ``[B, E]``."""
    from scipy import stats

    if len(ranking) < 2:
        return float("nan"), float("nan")
    spearman, kendall = [], []
    n = min(len(ranking), MAX_RANK_PAIRS)
    pairs = [(b, (b + 1) % len(ranking)) for b in range(n)] if len(ranking) > 2 else [(0, 1)]
    for a, b in pairs:
        x, y = np.nan_to_num(ranking[a], nan=-1.0), np.nan_to_num(ranking[b], nan=-1.0)
        if np.ptp(x) == 0 or np.ptp(y) == 0:  # a constant ranking: correlation is 1 only if both agree
            same = float(np.array_equal(x, y))
            spearman.append(same), kendall.append(same)
            continue
        spearman.append(stats.spearmanr(x, y).statistic)
        kendall.append(stats.kendalltau(x, y).statistic)
    return float(np.mean(spearman)), float(np.mean(kendall))


def selection_stability(circuits: np.ndarray) -> dict:
    """Pairwise Jaccard over bootstrap circuits ``[B, E]`` (bool): mean, 5th percentile and mean size."""
    pairs = _pairwise(jaccard_matrix(circuits)) if len(circuits) >= 2 else np.array([np.nan])
    return {"jaccard_mean": float(np.mean(pairs)), "jaccard_p05": float(np.percentile(pairs, 5)),
            "boot_size_mean": float(np.asarray(circuits).sum(1).mean())}


def exact_variability(values: np.ndarray, edges: Sequence[str]) -> pd.DataFrame:
    """Per-edge variability of exact effects ``values`` ``[inputs, edges]`` (NaN = not scored).

    Columns: ``edge``, ``n_inputs``, ``mean``, ``sd`` (ddof 1), ``cv`` = sd / |mean|
    (inf for a zero mean with spread, NaN with fewer than two inputs) and
    ``sign_consistency`` = max(P(score > 0), P(score < 0)) over inputs.
    """
    present = ~np.isnan(values)
    n = present.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(values, 0) / n
        sd = np.sqrt(np.nansum((values - mean) ** 2, 0) / (n - 1))
        sd = np.where(n >= 2, sd, np.nan)
        cv = np.where(np.abs(mean) > 0, sd / np.abs(mean), np.where(sd > 0, np.inf, np.nan))
        pos, neg = (values > 0).sum(0) / n, (values < 0).sum(0) / n
    return pd.DataFrame({schema.EDGE: list(edges), "n_inputs": n.astype(np.int64), "mean": mean, "sd": sd,
                         "cv": cv, "sign_consistency": np.maximum(pos, neg)})


# --- the result ---------------------------------------------------------------------------------------------


@dataclass
class StabilityResult:
    """Tables of :func:`stability` (see the module docstring for each metric).

    Attributes
    ----------
    bootstrap : DataFrame
        One row per pipeline, method and selection (columns ``BOOTSTRAP_COLUMNS``).
    methods_jaccard : DataFrame
        ``selection``, ``method_a``, ``method_b``, ``jaccard`` (full-data circuits; both orders listed).
    k_jaccard : DataFrame
        ``method``, ``k_a``, ``k_b``, ``jaccard`` (full-data circuits; both orders listed).
    edges : DataFrame
        Per-edge variability of exact effects (empty without exact scores).
    settings : dict
    """

    bootstrap: pd.DataFrame
    methods_jaccard: pd.DataFrame
    k_jaccard: pd.DataFrame
    edges: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        exact = self.edges
        finite_cv = exact["cv"][np.isfinite(exact["cv"])] if len(exact) else pd.Series(dtype=float)
        return {
            "settings": self.settings,
            "headline": self.headline(),
            "bootstrap": json.loads(self.bootstrap.to_json(orient="records")),
            "exact_variability": None if exact.empty else {
                "n_edges": int(len(exact)), "median_cv": float(finite_cv.median()) if len(finite_cv) else None,
                "median_sign_consistency": float(exact["sign_consistency"].median()),
                "share_sign_consistent_90": float((exact["sign_consistency"] >= 0.9).mean()),
            },
        }

    def headline(self) -> dict | None:
        """Per method: mean bootstrap Jaccard of top-k at k = the Bayesian circuit's size vs the Bayesian circuit.

        ``None`` without the Bayesian side (or when its circuit is empty).
        """
        k = self.settings.get("matched_k")
        b = self.bootstrap
        bayes = b[b["pipeline"] == BAYESIAN]
        if k is None or bayes.empty:
            return None
        j_bayes = float(bayes["jaccard_mean"].iloc[0])
        out = {}
        for r in b[(b["pipeline"] == CONVENTIONAL) & (b["selection"] == "top-k") & (b["k"] == k)].itertuples():
            out[r.method] = {"k": int(k), "conventional_jaccard_mean": float(r.jaccard_mean),
                             "bayesian_jaccard_mean": j_bayes,
                             "bayes_at_least_as_stable": bool(j_bayes >= r.jaccard_mean)}
        return out

    def to_text(self) -> str:
        """One-screen summary: the side-by-side bootstrap table, then the method Jaccard matrices."""
        b = self.bootstrap.copy()
        lines = [f"Stability under input resampling ({self.settings.get('bootstrap')} bootstrap resamples "
                 f"of {self.settings.get('n_inputs')} inputs, {self.settings.get('n_edges')} edges)", ""]
        header = f"{'pipeline':<13}{'method':<26}{'selection':<20}{'size':>6}{'J mean':>8}{'J p05':>8}{'Spearman':>10}{'Kendall':>9}"
        lines += [header, "-" * len(header)]
        for r in b.itertuples():
            sel = r.selection if pd.isna(r.k) and pd.isna(r.threshold) else (
                f"top-k k={int(r.k)}" if not pd.isna(r.k) else f"|mean|>{r.threshold:g}")
            lines.append(f"{r.pipeline:<13}{str(r.method)[:25]:<26}{sel[:19]:<20}{int(r.circuit_size):>6}"
                         f"{r.jaccard_mean:>8.3f}{r.jaccard_p05:>8.3f}{r.spearman_mean:>10.3f}{r.kendall_mean:>9.3f}")
        mj = self.methods_jaccard
        if len(mj) and mj["method_a"].nunique() > 1:
            for selection, group in mj.groupby("selection", sort=False):
                matrix = group.pivot(index="method_a", columns="method_b", values="jaccard")
                lines += ["", f"Jaccard between methods ({selection}, full data):",
                          matrix.to_string(float_format=lambda v: f"{v:.2f}")]
                if len(lines) > 45:
                    break
        head = self.headline()
        if head:
            lines += ["", f"Same size (k = {self.settings['matched_k']}): mean bootstrap Jaccard, top-k vs Bayesian "
                          "median-probability circuit: " + "; ".join(
                              f"{m} {h['conventional_jaccard_mean']:.3f} vs {h['bayesian_jaccard_mean']:.3f}"
                              for m, h in head.items())]
        s = self.summary().get("exact_variability")
        if s:
            lines += ["", f"Exact effects across inputs: median CV {s['median_cv'] if s['median_cv'] is None else round(s['median_cv'], 2)}, "
                          f"median sign consistency {s['median_sign_consistency']:.2f}, "
                          f"{s['share_sign_consistent_90']:.0%} of edges keep one sign on >= 90% of inputs"]
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``stability.json``, ``bootstrap.parquet``, ``methods_jaccard.parquet``,
        ``k_jaccard.parquet``, ``edges.parquet`` and ``summary.txt`` into ``directory`` atomically."""
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            (tmp / "stability.json").write_text(json.dumps(self.summary(), indent=2, default=_json_default))
            self.bootstrap.to_parquet(tmp / "bootstrap.parquet", index=False)
            self.methods_jaccard.to_parquet(tmp / "methods_jaccard.parquet", index=False)
            self.k_jaccard.to_parquet(tmp / "k_jaccard.parquet", index=False)
            self.edges.to_parquet(tmp / "edges.parquet", index=False)
            (tmp / "summary.txt").write_text(self.to_text() + "\n")
        return directory


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# --- the pipeline ----------------------------------------------------------------------------------------------


def _load(scores) -> pd.DataFrame:
    from .scores import read_scores, validate_scores

    if isinstance(scores, (str, os.PathLike)):
        return read_scores(scores, columns=list(schema.REQUIRED_COLUMNS))
    if isinstance(scores, pd.DataFrame):
        validate_scores(scores)
        return scores[list(schema.REQUIRED_COLUMNS)]
    raise BayescircError(f"scores must be a scores.parquet path or a DataFrame, got {type(scores).__name__}.")


def _dense(frame: pd.DataFrame, inputs: np.ndarray, edges: list[str]) -> np.ndarray:
    """``[len(inputs), len(edges)]`` scores of one method (NaN where not scored)."""
    out = np.full((len(inputs), len(edges)), np.nan)
    rows = np.searchsorted(inputs, frame[schema.INPUT_ID].to_numpy())
    cols = pd.Categorical(frame[schema.EDGE], categories=edges).codes
    out[rows, cols] = frame[schema.SCORE].to_numpy(dtype=np.float64)
    return out


def _ks(k, n_edges: int) -> list[int]:
    if k is None:
        return sorted({max(1, int(round(f * n_edges))) for f in (0.01, 0.05, 0.1)})
    ks = [int(x) for x in ([k] if np.isscalar(k) else k)]
    bad = [x for x in ks if x < 1]
    if bad:
        raise BayescircError(f"k={bad[0]}: circuit sizes must be integers >= 1.")
    return sorted(set(ks))


def _resample(frame: pd.DataFrame, inputs: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    """The rows of a bootstrap resample, inputs renumbered 0..N-1 (a repeated input becomes new inputs)."""
    ids = frame[schema.INPUT_ID].to_numpy()
    order = np.argsort(ids, kind="stable")
    starts = np.searchsorted(ids[order], inputs)
    ends = np.searchsorted(ids[order], inputs, side="right")
    picked = np.repeat(np.arange(len(inputs)), counts)
    rows = np.concatenate([order[starts[i]:ends[i]] for i in picked]) if len(picked) else np.array([], int)
    new_ids = np.repeat(np.arange(len(picked)), (ends - starts)[picked])
    out = frame.iloc[rows].reset_index(drop=True).copy()
    out[schema.INPUT_ID] = new_ids.astype(np.int64)
    return out


def _default_fitter(frame: pd.DataFrame, **options):
    try:
        from .fitting import fit
    except ImportError as exc:
        raise BayescircError(f"the Bayesian side needs bayescirc.fitting, which is not available ({exc}); "
                             "run with bayes=False (--no-bayes).") from None
    return fit(frame, **options)


def _median_circuit(fit_result, seed: int) -> tuple[frozenset, pd.Series]:
    from .circuits import sample_circuits

    samples = sample_circuits(fit_result, rule="slab", seed=seed)
    return samples.median_circuit(), samples.frequency


def stability(scores, *, bootstrap: int = 100, k: int | Iterable[int] | None = None,
              threshold: float | Iterable[float] | None = None, methods: Iterable[str] | None = None,
              bayes: bool = False, bayes_bootstrap: int | None = None, match_k_to: str | None = "bayes",
              fit_options: dict | None = None, fitter: Callable | None = None, seed: int = 0,
              progress: bool = True) -> StabilityResult:
    """Stability of conventional and Bayesian circuits under input resampling, across methods and k.

    Parameters
    ----------
    scores : str, Path or DataFrame
        A scores.parquet (file or directory of parts) or a table with its four columns.
    bootstrap : int, default 100
        Number ``B`` of bootstrap resamples of the inputs (>= 2).
    k : int or list of int, optional
        Circuit sizes for top-k. Default: 1%, 5% and 10% of the edges.
    threshold : float or list of float, optional
        Also select edges with ``|mean score| > D`` for each ``D``.
    methods : list of str, optional
        Method labels to analyse (default all in the file).
    bayes : bool, default False
        Also run the Bayesian pipeline: fit each resample with
        ``bayescirc.fitting.fit(resample, inference="svi", ...)`` and take the
        median-probability circuit. Costs one fit per resample.
    bayes_bootstrap : int, optional
        Resamples for the Bayesian side (the first ones of the ``B``); default ``B``.
    match_k_to : {"bayes", None}, default "bayes"
        With ``bayes``, add k = size of the full-data Bayesian median-probability circuit to the top-k sizes.
    fit_options : dict, optional
        Extra keyword arguments for ``fit`` (e.g. ``{"draws": 300}``); ``inference`` defaults to ``"svi"``.
    fitter : callable, optional
        ``fitter(frame, **options) -> FitResult``; default ``bayescirc.fitting.fit``.
    seed : int, default 0
    progress : bool, default True

    Returns
    -------
    StabilityResult
    """
    from tqdm.auto import tqdm

    if bootstrap < 2:
        raise BayescircError(f"bootstrap={bootstrap}: need at least 2 resamples to compare circuits.")
    frame = _load(scores)
    labels = sorted(str(m) for m in frame[schema.METHOD].unique())
    if methods is not None:
        methods = list(methods)
        unknown = [m for m in methods if m not in labels]
        if unknown:
            raise BayescircError(f"method {unknown[0]!r} is not in the scores (it has {labels}).")
        labels = methods
    edges = sorted(str(e) for e in frame[schema.EDGE].unique())
    index = EdgeIndex.from_edges(edges)
    inputs = np.sort(frame[schema.INPUT_ID].unique())
    counts = bootstrap_counts(len(inputs), bootstrap, seed)
    ks = _ks(k, len(edges))
    thresholds = [] if threshold is None else [float(t) for t in ([threshold] if np.isscalar(threshold) else threshold)]

    rows, full_circuits, matched_k = [], {}, None
    # --- Bayesian pipeline first: its circuit size sets the matched k.
    if bayes:
        fitter = fitter or _default_fitter
        options = {"inference": "svi", "progress": False, "seed": seed, **(fit_options or {})}
        nb = min(bayes_bootstrap or bootstrap, bootstrap)
        if nb < 2:
            raise BayescircError(f"bayes_bootstrap={nb}: need at least 2 resamples.")
        used = frame[frame[schema.METHOD].isin(labels)]
        full_circuit, _ = _median_circuit(fitter(used, **options), seed)
        boot = np.zeros((nb, len(edges)), dtype=bool)
        ranking = np.zeros((nb, len(edges)))
        for b in tqdm(range(nb), desc="bayes bootstrap", unit="fit", disable=not progress):
            circuit, freq = _median_circuit(fitter(_resample(used, inputs, counts[b]), **options), seed)
            boot[b] = np.isin(edges, list(circuit))
            ranking[b] = freq.reindex(edges).to_numpy()
        spearman, kendall = _rank_correlations(ranking)
        rows.append({"pipeline": BAYESIAN, "method": "+".join(labels), "selection": "median-probability",
                     "k": np.nan, "threshold": np.nan, "circuit_size": len(full_circuit),
                     **selection_stability(boot), "spearman_mean": spearman, "kendall_mean": kendall,
                     "n_bootstrap": nb})
        if match_k_to == "bayes" and len(full_circuit) > 0:
            ks = sorted(set(ks) | {len(full_circuit)})
            matched_k = len(full_circuit)
    elif match_k_to not in (None, "bayes"):
        raise BayescircError(f"match_k_to={match_k_to!r}: use 'bayes' or None.")

    # --- conventional pipeline, per method
    exact_tables = []
    for label in tqdm(labels, desc="conventional", unit="method", disable=not progress):
        sub = frame[frame[schema.METHOD] == label]
        own = np.sort(sub[schema.INPUT_ID].unique())
        values = _dense(sub, own, edges)
        own_counts = counts[:, np.searchsorted(inputs, own)]
        means = weighted_means(values, own_counts)
        full = weighted_means(values, np.ones((1, len(own))))[0]
        spearman, kendall = _rank_correlations(np.abs(means))
        selections = [("top-k", {"k": kk}) for kk in ks] + [("threshold", {"threshold": t}) for t in thresholds]
        for name, param in selections:
            circuit = index.prune(select(full, **param))[0]
            full_circuits[(label, name, param.get("k"), param.get("threshold"))] = circuit
            boot = index.prune(select(means, **param))
            rows.append({"pipeline": CONVENTIONAL, "method": label, "selection": name,
                         "k": param.get("k", np.nan), "threshold": param.get("threshold", np.nan),
                         "circuit_size": int(circuit.sum()), **selection_stability(boot),
                         "spearman_mean": spearman, "kendall_mean": kendall, "n_bootstrap": bootstrap})
        if schema.is_exact(label):
            table = exact_variability(values, edges)
            table.insert(1, schema.METHOD, label)
            exact_tables.append(table)

    bootstrap_table = pd.DataFrame(rows, columns=BOOTSTRAP_COLUMNS)
    bootstrap_table["k"] = bootstrap_table["k"].astype("Float64").astype("Int64")
    methods_rows, k_rows = [], []
    for (name, kk, t) in dict.fromkeys((key[1], key[2], key[3]) for key in full_circuits):
        selection = f"top-k k={kk}" if name == "top-k" else f"|mean|>{t:g}"
        for a in labels:
            for b in labels:
                sim = jaccard_matrix(full_circuits[(a, name, kk, t)], full_circuits[(b, name, kk, t)])[0, 0]
                methods_rows.append({"selection": selection, "method_a": a, "method_b": b, "jaccard": float(sim)})
    for label in labels:
        for ka in ks:
            for kb in ks:
                sim = jaccard_matrix(full_circuits[(label, "top-k", ka, None)], full_circuits[(label, "top-k", kb, None)])[0, 0]
                k_rows.append({"method": label, "k_a": ka, "k_b": kb, "jaccard": float(sim)})
    edges_table = (pd.concat(exact_tables, ignore_index=True) if exact_tables else
                   pd.DataFrame(columns=[schema.EDGE, schema.METHOD, "n_inputs", "mean", "sd", "cv", "sign_consistency"]))
    settings = {"bootstrap": bootstrap, "k": ks, "threshold": thresholds, "methods": labels, "bayes": bayes,
                "bayes_bootstrap": (min(bayes_bootstrap or bootstrap, bootstrap) if bayes else None),
                "match_k_to": match_k_to, "matched_k": matched_k, "seed": seed, "n_inputs": int(len(inputs)), "n_edges": len(edges),
                "fit_options": fit_options or {}}
    return StabilityResult(bootstrap=bootstrap_table, methods_jaccard=pd.DataFrame(methods_rows),
                           k_jaccard=pd.DataFrame(k_rows), edges=edges_table, settings=settings)
