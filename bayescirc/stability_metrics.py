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
  inputs and sign consistency ``max(P(score > 0), P(score < 0))`` (summarised
  over the edges with exact scores on at least two inputs).

The resampled inputs are those of the methods analysed (``methods``), so a
method not asked about does not change how many of the others' inputs a
resample holds. Rank correlations are over the edges the method scores (an
unscored edge would add a tied block that correlates perfectly). An empty
circuit (nothing left after pruning) has Jaccard 1 with another empty one:
the text summary flags such rows.

**The headline** (``bayes=True``): is the Bayesian median-probability circuit
at least as stable under input resampling as top-k on mean scores at the same
size? It is computed like-for-like:

- *the same resamples*: the first ``bayes_bootstrap`` (default 20) of the ``B``
  input-count vectors drive both sides, so every Jaccard pair compares the
  two pipelines on identical data;
- *a real posterior per resample*: each resample is fitted with the same
  ``fit`` settings as the full data (``inference="svi"`` unless told
  otherwise; the same seed), and its circuit is the edges whose posterior
  mean ``inclusion`` (Rao-Blackwellised, no Monte-Carlo sampling of
  indicators) exceeds 0.5, pruned to input->logits paths;
- *sizes matched after pruning* (the headline, ``variant="matched"``): on each
  resample, top-k uses the smallest k whose *pruned* top-k circuit has at least
  as many edges as that resample's pruned Bayesian circuit (pruning shrinks
  top-k: 7 selected edges may leave 2 on a path). So top-k is at least as
  large on every resample (pruned sizes can jump past the target as k grows:
  mean sizes within ~1-2 edges in practice) and the two differ mostly in which
  edges they choose. The
  variant ``"fixed"`` chooses k once, by the same rule on the full data, and
  keeps it for every resample: top-k then does not follow the Bayesian
  circuit's size changes, which favours it whenever that size varies;
- *the paired difference*: over the ``C(B, 2)`` resample pairs, the mean of
  ``J_bayes(a, b) - J_topk(a, b)``, with its delete-one-resample jackknife
  standard error (the mean pairwise Jaccard is a U-statistic over resamples;
  the jackknife measures its Monte-Carlo error at this B, not the variation
  across datasets). A gap within about two SEs of zero is noise.

The conventional table also keeps top-k at the unpruned ``k`` = the full-data
Bayesian size (``match_k_to="bayes"``), as earlier versions reported.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import schema
from ._io import atomic_dir, strict_json
from .circuits import EdgeIndex, _pairwise, check_paths, jaccard_matrix, top_k_mask
from .errors import BayescircError

__all__ = ["StabilityResult", "stability", "bootstrap_counts", "selection_stability", "exact_variability",
           "posterior_circuit", "matched_top_k", "paired_jaccard"]

STABILITY_FILES = ("stability.json", "bootstrap.parquet", "methods_jaccard.parquet", "k_jaccard.parquet",
                   "edges.parquet", "summary.txt", "headline.parquet", "resamples.parquet")
"""What ``StabilityResult.save`` writes (the last two with the Bayesian side)."""

CONVENTIONAL, BAYESIAN = "conventional", "bayesian"
MAX_RANK_PAIRS = 200  # rank correlations use the first 200 consecutive pairs (Kendall costs O(E log E) each)
HEADLINE_BOOTSTRAP = 20  # default resamples (Bayesian fits) of the headline comparison
HEADLINE_COLUMNS = ["method", "variant", "k", "k_mean", "k_min", "k_max", "bayes_size_mean", "topk_size_mean",
                    "bayes_jaccard_mean", "topk_jaccard_mean", "difference", "difference_se", "n_bootstrap",
                    "bayes_at_least_as_stable"]
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


def _rank_correlations(ranking: np.ndarray, scored: np.ndarray | None = None) -> tuple[float, float]:
    """Mean Spearman and Kendall correlation between rows ``b`` and ``b+1 mod B`` of ``ranking`` ``[B, E]``.

    ``scored`` (E,) bool: the edges to rank (default all); a NaN within them
    (an edge with no input in a resample) ranks below every scored edge.
    """
    from scipy import stats

    if scored is not None:
        ranking = np.asarray(ranking)[:, np.asarray(scored, bool)]
    if len(ranking) < 2 or ranking.shape[1] < 2:
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
    # undefined with fewer than two inputs, or when every score is exactly 0 (no sign to keep)
    consistency = np.where((n >= 2) & (pos + neg > 0), np.maximum(pos, neg), np.nan)
    return pd.DataFrame({schema.EDGE: list(edges), "n_inputs": n.astype(np.int64), "mean": mean, "sd": sd,
                         "cv": cv, "sign_consistency": consistency})


def posterior_circuit(fit_result, index: EdgeIndex) -> tuple[np.ndarray, np.ndarray]:
    """The median-probability circuit of a fit over ``index.edges``: ``(pruned mask, mean inclusion)``.

    Rao-Blackwellised: the posterior mean of ``inclusion`` per edge (no Bernoulli
    sampling, so no Monte-Carlo noise), > 0.5, then pruned to input->logits
    paths. Edges the fit does not know get inclusion 0.
    :meth:`bayescirc.circuits.CircuitSamples.median_circuit` thresholds the
    frequency of each edge among *pruned* sampled circuits instead; the two
    agree except for edges near 0.5 or whose path partners are often absent.
    The headline uses this one because its Monte-Carlo noise would otherwise
    count as instability.
    """
    inclusion = np.asarray(fit_result.draws("inclusion"), dtype=np.float64).mean(axis=0)
    mean = pd.Series(inclusion, index=[str(e) for e in fit_result.edge_names]).reindex(list(index.edges))
    mean = mean.fillna(0.0).to_numpy()
    return index.prune(mean > 0.5), mean


def _top_order(means: np.ndarray) -> np.ndarray:
    """Edge indices by decreasing ``|mean|`` (stable: ties keep edge order), unscored edges last."""
    magnitude = np.nan_to_num(np.abs(means), nan=-np.inf)
    return np.argsort(-magnitude, kind="stable")


def matched_top_k(means: np.ndarray, sizes: np.ndarray, index: EdgeIndex) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``means`` ``[B, E]``: the smallest k whose pruned top-k circuit has >= ``sizes[b]`` edges.

    Top-k sets are nested in k (one stable order by ``|mean|``), so the pruned
    size only grows with k and a bisection finds k. When even all scored edges
    prune to fewer than ``sizes[b]``, k is the number of scored edges. A target
    of 0 gives k = 0 and the empty circuit. Returns ``(pruned masks [B, E], ks [B])``.
    """
    means = np.atleast_2d(means)
    sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), (len(means),))
    masks = np.zeros(means.shape, dtype=bool)
    ks = np.zeros(len(means), dtype=np.int64)
    for b, (row, target) in enumerate(zip(means, sizes)):
        order = _top_order(row)

        def circuit(k, order=order):
            mask = np.zeros(len(order), dtype=bool)
            mask[order[:k]] = True
            return index.prune(mask)

        lo, hi = 0, int(np.isfinite(row).sum())
        if target <= 0:
            hi = 0
        elif circuit(hi).sum() >= target:
            while lo < hi:  # invariant: circuit(hi) is large enough, circuit(lo) is not (or lo == 0)
                mid = (lo + hi) // 2
                if circuit(mid).sum() >= target:
                    hi = mid
                else:
                    lo = mid + 1
        ks[b], masks[b] = hi, circuit(hi)
    return masks, ks


def paired_jaccard(bayes: np.ndarray, topk: np.ndarray) -> dict:
    """Mean pairwise Jaccard of two ``[B, E]`` circuit sets on the same resamples, and their paired difference.

    ``difference`` = mean over pairs ``a < b`` of ``J_bayes(a, b) - J_topk(a, b)``;
    ``difference_se`` is its delete-one-resample jackknife standard error
    ``sqrt((B-1)/B * sum_l (d_(-l) - mean d_(-l))^2)``, where ``d_(-l)`` is the
    mean difference over the pairs without resample ``l`` (NaN for B < 3).
    """
    bayes, topk = np.asarray(bayes, dtype=bool), np.asarray(topk, dtype=bool)
    if bayes.shape != topk.shape or len(bayes) < 2:
        raise ValueError(f"need two [B, E] circuit sets of the same shape with B >= 2, got {bayes.shape}, {topk.shape}")
    n = len(bayes)
    jb, jt = jaccard_matrix(bayes), jaccard_matrix(topk)
    diff = jb - jt
    np.fill_diagonal(diff, 0.0)
    pairs = n * (n - 1) / 2
    total = diff.sum() / 2
    se = float("nan")
    if n >= 3:
        leave_out = (total - diff.sum(axis=1)) / ((n - 1) * (n - 2) / 2)
        se = float(np.sqrt((n - 1) / n * ((leave_out - leave_out.mean()) ** 2).sum()))
    return {"bayes_jaccard_mean": float(_pairwise(jb).mean()), "topk_jaccard_mean": float(_pairwise(jt).mean()),
            "difference": float(total / pairs), "difference_se": se}


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
    comparison : DataFrame
        The headline (``HEADLINE_COLUMNS``), one row per method and variant
        (``matched``: k matched per resample after pruning, the headline;
        ``fixed``: k chosen on the full data). Empty without the Bayesian side.
    resamples : DataFrame
        Per headline resample ``resample`` and edge: the Bayesian posterior mean
        ``inclusion``, ``in_bayes`` (in the pruned median-probability circuit) and,
        per method ``m``, ``in_topk:m`` (in the size-matched pruned top-k circuit)
        and ``mean:m`` (the edge's mean score on that resample). Resample ``-1``
        is the full data. For finding which edges flip.
    """

    bootstrap: pd.DataFrame
    methods_jaccard: pd.DataFrame
    k_jaccard: pd.DataFrame
    edges: pd.DataFrame
    settings: dict = field(default_factory=dict)
    comparison: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=HEADLINE_COLUMNS))
    resamples: pd.DataFrame = field(default_factory=pd.DataFrame)

    def summary(self) -> dict:
        exact = self.edges[self.edges["n_inputs"] >= 2] if len(self.edges) else self.edges  # a spread needs two
        cv = exact["cv"].dropna() if len(exact) else pd.Series(dtype=float)  # inf (zero mean, some spread) kept
        signs = exact["sign_consistency"].dropna() if len(exact) else pd.Series(dtype=float)
        return {
            "settings": self.settings,
            "headline": self.headline(),
            "bootstrap": json.loads(self.bootstrap.to_json(orient="records")),
            "exact_variability": None if exact.empty else {
                "n_edges": int(len(exact)), "median_cv": float(cv.median()) if len(cv) else None,
                "median_sign_consistency": float(signs.median()) if len(signs) else None,
                "share_sign_consistent_90": float((signs >= 0.9).mean()) if len(signs) else None,
            },
        }

    def headline(self) -> dict | None:
        """Per method: the like-for-like comparison of the module docstring, both variants.

        ``{method: {"matched": {...}, "fixed": {...}}}`` with the ``HEADLINE_COLUMNS``
        fields; ``"matched"`` is the headline. ``None`` without the Bayesian side.
        """
        if self.comparison.empty:
            return None
        out: dict = {}
        for record in json.loads(self.comparison.to_json(orient="records")):
            out.setdefault(record.pop("method"), {})[record.pop("variant")] = record
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
                         f"{r.jaccard_mean:>8.3f}{r.jaccard_p05:>8.3f}{r.spearman_mean:>10.3f}{r.kendall_mean:>9.3f}"
                         + ("  (empty)" if r.boot_size_mean == 0 else ""))
        if (b["boot_size_mean"] == 0).any():
            lines.append("(empty): nothing is left after pruning on any resample; J = 1 only says every resample "
                         "chose nothing. Use a larger k or a smaller threshold.")
        mj = self.methods_jaccard
        if len(mj) and mj["method_a"].nunique() > 1:
            for selection, group in mj.groupby("selection", sort=False):
                matrix = group.pivot(index="method_a", columns="method_b", values="jaccard")
                lines += ["", f"Jaccard between methods ({selection}, full data):",
                          matrix.to_string(float_format=lambda v: f"{v:.2f}")]
                if len(lines) > 45:
                    break
        if not self.comparison.empty:
            c = self.comparison
            lines += ["", f"Headline: Bayesian median-probability circuit vs top-k at the same size, on the same "
                          f"{int(c['n_bootstrap'].iloc[0])} resamples (mean pairwise Jaccard; difference = Bayes - top-k "
                          "± jackknife SE)",
                      f"{'method':<26}{'k':<14}{'size B/top-k':>14}{'J Bayes':>9}{'J top-k':>9}{'difference':>18}"]
            for r in c.itertuples():
                kk = (f"matched {r.k_min}-{r.k_max}" if r.variant == "matched" else f"fixed {r.k}")
                lines.append(f"{str(r.method)[:25]:<26}{kk:<14}{f'{r.bayes_size_mean:.1f}/{r.topk_size_mean:.1f}':>14}"
                             f"{r.bayes_jaccard_mean:>9.3f}{r.topk_jaccard_mean:>9.3f}"
                             f"{f'{r.difference:+.3f} ± {r.difference_se:.3f}':>18}")
        s = self.summary().get("exact_variability")
        if s:
            lines += ["", f"Exact effects across inputs: median CV {s['median_cv'] if s['median_cv'] is None else round(s['median_cv'], 2)}, "
                          f"median sign consistency {s['median_sign_consistency']:.2f}, "
                          f"{s['share_sign_consistent_90']:.0%} of edges keep one sign on >= 90% of inputs"]
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``stability.json``, ``bootstrap.parquet``, ``methods_jaccard.parquet``,
        ``k_jaccard.parquet``, ``edges.parquet``, ``summary.txt`` and, with the Bayesian
        side, ``headline.parquet`` and ``resamples.parquet`` into ``directory`` atomically."""
        directory = Path(directory)
        with atomic_dir(directory, replaces=STABILITY_FILES) as tmp:
            (tmp / "stability.json").write_text(strict_json(self.summary(), indent=2, default=str))
            self.bootstrap.to_parquet(tmp / "bootstrap.parquet", index=False)
            self.methods_jaccard.to_parquet(tmp / "methods_jaccard.parquet", index=False)
            self.k_jaccard.to_parquet(tmp / "k_jaccard.parquet", index=False)
            self.edges.to_parquet(tmp / "edges.parquet", index=False)
            if not self.comparison.empty:
                self.comparison.to_parquet(tmp / "headline.parquet", index=False)
                self.resamples.to_parquet(tmp / "resamples.parquet", index=False)
            (tmp / "summary.txt").write_text(self.to_text() + "\n")
        return directory


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
        return sorted({max(1, int(np.floor(f * n_edges + 0.5))) for f in (0.01, 0.05, 0.1)})  # halves up
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


def warning_kinds(messages: Sequence[str]) -> list[tuple[int, str]]:
    """``(count, first message)`` per kind of message, most frequent first; messages that differ only in their
    figures (a PPC's 81.7% vs 83.7% of edges) are one kind, so a summary names each diagnostic once."""
    counts: dict[str, list] = {}
    for message in messages:
        entry = counts.setdefault(re.sub(r"\d+(?:\.\d+)?", "#", message), [0, message])
        entry[0] += 1
    return sorted(((n, first) for n, first in counts.values()), key=lambda kind: -kind[0])


def _default_fitter(frame: pd.DataFrame, **options):
    try:
        from .fitting import fit
    except ImportError as exc:
        raise BayescircError(f"the Bayesian side needs bayescirc.fitting, which is not available ({exc}); "
                             "run with bayes=False (--no-bayes).") from None
    return fit(frame, **options)


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
        Number ``B`` of bootstrap resamples of the inputs (>= 2) for the conventional pipeline.
    k : int or list of int, optional
        Circuit sizes for top-k. Default: 1%, 5% and 10% of the edges.
    threshold : float or list of float, optional
        Also select edges with ``|mean score| > D`` for each ``D``.
    methods : list of str, optional
        Method labels to analyse (default all in the file).
    bayes : bool, default False
        Also run the Bayesian pipeline and the headline comparison (module
        docstring): fit the full data and each of the first ``bayes_bootstrap``
        resamples with the same ``fit`` settings and take the Rao-Blackwellised
        median-probability circuit. Costs one fit per resample.
    bayes_bootstrap : int, optional
        Resamples for the Bayesian side and the headline (the first ones of the
        ``B``, shared with top-k). Default 20 (at most ``B``): enough pairs
        (190) for a jackknife SE of the paired difference; each is a full fit.
    match_k_to : {"bayes", None}, default "bayes"
        With ``bayes``, also add the unpruned k = size of the full-data Bayesian circuit to the top-k sizes.
    fit_options : dict, optional
        Keyword arguments for ``fit``, the same for every fit (e.g. ``{"draws": 300}``);
        ``inference`` defaults to ``"svi"`` (the fit's own default, ``"auto"``, is NUTS up to
        5,000 edges: on ioi-toy and a simulated file SVI gave the same circuits as NUTS 2 x 500,
        inclusion probabilities within 0.04, 12x faster, and one fit per resample adds up),
        ``seed`` to ``seed``.
    fitter : callable, optional
        ``fitter(frame, **options) -> FitResult``; default ``bayescirc.fitting.fit``.
    seed : int, default 0
        Seeds the resamples and every fit.
    progress : bool, default True

    Returns
    -------
    StabilityResult
    """
    from tqdm.auto import tqdm

    if bootstrap < 2:
        raise BayescircError(f"bootstrap={bootstrap}: need at least 2 resamples to compare circuits.")
    if match_k_to not in (None, "bayes"):
        raise BayescircError(f"match_k_to={match_k_to!r}: use 'bayes' or None.")
    frame = _load(scores)
    labels = sorted(str(m) for m in frame[schema.METHOD].unique())
    if methods is not None:
        methods = list(dict.fromkeys(str(m) for m in methods))
        if not methods:
            raise BayescircError(f"methods: no method labels given (the scores have {labels}).")
        unknown = [m for m in methods if m not in labels]
        if unknown:
            raise BayescircError(f"method {unknown[0]!r} is not in the scores (it has {labels}).")
        labels = methods
        frame = frame[frame[schema.METHOD].isin(labels)]  # resample these methods' inputs, over their edges
    edges = sorted(str(e) for e in frame[schema.EDGE].unique())
    index = EdgeIndex.from_edges(edges)
    # rank correlations and exact variability still hold; circuits would be empty without a word
    check_paths(index, os.fspath(scores) if isinstance(scores, (str, os.PathLike)) else "the scores", refuse=False)
    inputs = np.sort(frame[schema.INPUT_ID].unique())
    counts = bootstrap_counts(len(inputs), bootstrap, seed)
    ks = _ks(k, len(edges))
    thresholds = [] if threshold is None else [float(t) for t in ([threshold] if np.isscalar(threshold) else threshold)]
    bad = [t for t in thresholds if not (np.isfinite(t) and t >= 0)]
    if bad:
        raise BayescircError(f"threshold={bad[0]}: a threshold on |mean score| must be a finite number >= 0.")
    nb = min(HEADLINE_BOOTSTRAP if bayes_bootstrap is None else bayes_bootstrap, bootstrap) if bayes else None
    if bayes and nb < 2:
        raise BayescircError(f"bayes_bootstrap={nb}: need at least 2 resamples.")

    rows, full_circuits, matched_k = [], {}, None
    # --- Bayesian pipeline first: its circuit sizes set the matched k.
    if bayes:
        fitter = fitter or _default_fitter
        options = {"inference": "svi", "progress": False, "seed": seed, **(fit_options or {})}
        used = frame[frame[schema.METHOD].isin(labels)]
        fit_warnings: list[warnings.WarningMessage] = []

        def run_fit(data):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = fitter(data, **options)
            fit_warnings.extend(caught)
            return result

        full_bayes, full_inclusion = posterior_circuit(run_fit(used), index)
        boot = np.zeros((nb, len(edges)), dtype=bool)
        ranking = np.zeros((nb, len(edges)))
        for b in tqdm(range(nb), desc="bayes bootstrap", unit="fit", disable=not progress):
            boot[b], ranking[b] = posterior_circuit(run_fit(_resample(used, inputs, counts[b])), index)
        if fit_warnings:  # one summary instead of the same diagnostics once per fit
            messages = [str(w.message) for w in fit_warnings]
            warn_summary = {str(m): int(n) for m, n in pd.Series(messages).value_counts().items()}
            kinds = " | ".join(f"{n}x {m}" for n, m in warning_kinds(messages)[:3])
            warnings.warn(f"{len(fit_warnings)} warnings from the {nb + 1} Bayesian fits (full data + resamples), "
                          f"most frequent first (figures from the first fit of each kind): {kinds}",
                          fit_warnings[0].category, stacklevel=2)
        spearman, kendall = _rank_correlations(ranking)
        rows.append({"pipeline": BAYESIAN, "method": "+".join(labels), "selection": "median-probability",
                     "k": np.nan, "threshold": np.nan, "circuit_size": int(full_bayes.sum()),
                     **selection_stability(boot), "spearman_mean": spearman, "kendall_mean": kendall,
                     "n_bootstrap": nb})
        if match_k_to == "bayes" and full_bayes.any():
            matched_k = int(full_bayes.sum())
            ks = sorted(set(ks) | {matched_k})
        resample_ids = np.repeat(np.arange(-1, nb), len(edges))
        resample_table = {"resample": resample_ids, schema.EDGE: np.tile(edges, nb + 1),
                          "inclusion": np.concatenate([full_inclusion, ranking.ravel()]),
                          "in_bayes": np.concatenate([full_bayes, boot.ravel()])}
        comparison = []

    # --- conventional pipeline, per method
    exact_tables = []
    for label in tqdm(labels, desc="conventional", unit="method", disable=not progress):
        sub = frame[frame[schema.METHOD] == label]
        own = np.sort(sub[schema.INPUT_ID].unique())
        values = _dense(sub, own, edges)
        own_counts = counts[:, np.searchsorted(inputs, own)]
        means = weighted_means(values, own_counts)
        full = weighted_means(values, np.ones((1, len(own))))[0]
        spearman, kendall = _rank_correlations(np.abs(means), scored=np.isfinite(full))
        selections = [("top-k", {"k": kk}) for kk in ks] + [("threshold", {"threshold": t}) for t in thresholds]
        for name, param in selections:
            circuit = index.prune(select(full, **param))[0]
            full_circuits[(label, name, param.get("k"), param.get("threshold"))] = circuit
            pruned = index.prune(select(means, **param))
            rows.append({"pipeline": CONVENTIONAL, "method": label, "selection": name,
                         "k": param.get("k", np.nan), "threshold": param.get("threshold", np.nan),
                         "circuit_size": int(circuit.sum()), **selection_stability(pruned),
                         "spearman_mean": spearman, "kendall_mean": kendall, "n_bootstrap": bootstrap})
        if bayes:
            head_means = means[:nb]
            matched, k_matched = matched_top_k(head_means, boot.sum(axis=1), index)
            _, (k_fixed,) = matched_top_k(full[None, :], [int(full_bayes.sum())], index)
            order = np.argsort(-np.nan_to_num(np.abs(head_means), nan=-np.inf), axis=1, kind="stable")[:, :k_fixed]
            fixed = np.zeros_like(boot)
            np.put_along_axis(fixed, order, True, axis=1)
            fixed = index.prune(fixed & np.isfinite(head_means))
            for variant, topk, kk in (("matched", matched, k_matched), ("fixed", fixed, np.full(nb, k_fixed))):
                stats = paired_jaccard(boot, topk)
                comparison.append({"method": label, "variant": variant,
                                   "k": int(k_fixed) if variant == "fixed" else pd.NA,
                                   "k_mean": float(kk.mean()), "k_min": int(kk.min()), "k_max": int(kk.max()),
                                   "bayes_size_mean": float(boot.sum(1).mean()),
                                   "topk_size_mean": float(topk.sum(1).mean()), **stats, "n_bootstrap": nb,
                                   "bayes_at_least_as_stable": bool(stats["difference"] >= 0)})
            full_matched, _ = matched_top_k(full[None, :], [int(full_bayes.sum())], index)
            resample_table[f"in_topk:{label}"] = np.concatenate([full_matched[0], matched.ravel()])
            resample_table[f"mean:{label}"] = np.concatenate([full, head_means.ravel()])
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
                "bayes_bootstrap": nb, "match_k_to": match_k_to, "matched_k": matched_k, "seed": seed,
                "n_inputs": int(len(inputs)), "n_edges": len(edges),
                "fit_options": ({k_: v for k_, v in options.items() if k_ != "progress"} if bayes else fit_options or {}),
                "fit_warnings": (warn_summary if bayes and fit_warnings else {})}
    result = StabilityResult(bootstrap=bootstrap_table, methods_jaccard=pd.DataFrame(methods_rows),
                             k_jaccard=pd.DataFrame(k_rows), edges=edges_table, settings=settings)
    if bayes:
        result.comparison = pd.DataFrame(comparison, columns=HEADLINE_COLUMNS).astype({"k": "Int64"})
        result.resamples = pd.DataFrame(resample_table)
    return result
