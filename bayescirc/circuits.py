"""Circuits with uncertainty: sample circuits from a fit's posterior and summarise them.

A circuit is a set of edges. Each posterior draw ``d`` gives one:

- ``rule="slab"`` (default): indicators ``z_e ~ Bernoulli(inclusion[d, e])``,
  the edge's conditional probability of being in the slab given that draw's
  other parameters (the fit's ``inclusion`` variable);
- ``rule="topk:K"``: the ``K`` edges with the largest ``|mu[d, e]|``;
- ``rule="threshold:D"``: the edges with ``|mu[d, e]| > D`` (metric units);

then pruned to the edges that lie on a path from ``input`` to ``logits``
through selected edges (the pruning EAP-IG applies, :func:`bayescirc.graph.prune_to_paths`).
Pruning runs for all draws at once (:func:`prune_masks`): one pass over the
nodes in forward order marks, per draw, the nodes reachable from ``input``; one
pass in reverse marks the nodes that reach ``logits``.

:class:`CircuitSamples` holds the pruned indicators and gives the summaries:
inclusion frequencies, the median-probability circuit, the credible core and
superset, the posterior of circuit size, the expected Jaccard similarity of two
posterior circuits and the most frequent distinct circuits.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from . import schema
from .errors import BayescircError
from .graph import INPUT, LOGITS, parse_edge, parse_node

__all__ = ["CircuitSamples", "CircuitWarning", "EdgeIndex", "check_paths", "jaccard_matrix", "parse_rule", "prune_masks",
           "sample_circuits", "top_k_mask"]

RULES = ("slab", "topk:K", "threshold:D")
_CHUNK = 256  # draws per vectorised block: bounds memory at O(_CHUNK * edges)


class CircuitWarning(UserWarning):
    """Edges of a fit that no circuit can hold: they lie on no input->logits path."""


# --- rules -----------------------------------------------------------------------------------


def parse_rule(rule: str) -> tuple[str, float | int | None]:
    """Normalise a selection rule: ``"slab"``, ``"topk:K"`` (K >= 0 integer) or ``"threshold:D"`` (D >= 0).

    Returns ``(kind, parameter)``; raises ``BayescircError`` listing the valid forms.
    """
    kind, _, value = str(rule).strip().partition(":")
    kind = kind.lower()
    try:
        if kind == "slab" and not value:
            return "slab", None
        if kind == "topk" and value:
            k = int(value)
            if k >= 0 and str(k) == value.strip():
                return "topk", k
        if kind == "threshold" and value:
            d = float(value)
            if d >= 0 and np.isfinite(d):
                return "threshold", d
    except ValueError:
        pass
    raise BayescircError(f"rule {rule!r} is not valid: use one of {', '.join(RULES)} "
                         "(e.g. 'slab', 'topk:50', 'threshold:0.1'; K an integer >= 0, D a number >= 0).")


# --- vectorised pruning ------------------------------------------------------------------------


def _node_order(node: str) -> tuple[float, int]:
    info = parse_node(node)
    if info.kind == "input":
        return (-1.0, 0)
    if info.kind == "logits":
        return (float("inf"), 0)
    return (float(info.layer), 0 if info.kind == "attn" else 1)


@dataclass(frozen=True)
class EdgeIndex:
    """Edges as integer (source, receiver) node pairs, nodes in forward order.

    Built once per edge list; :meth:`prune` then prunes many circuits given as
    boolean masks over these edges. Edge names must follow the graph syntax of
    :mod:`bayescirc.graph`.
    """

    edges: tuple[str, ...]
    nodes: tuple[str, ...]
    source: np.ndarray
    receiver: np.ndarray

    @classmethod
    def from_edges(cls, edges: Iterable[str]) -> EdgeIndex:
        edges = tuple(str(e) for e in edges)
        if len(set(edges)) < len(edges):
            seen = set()
            twice = next(e for e in edges if e in seen or seen.add(e))
            raise BayescircError(f"edge {twice!r} appears more than once; a circuit's edges must be distinct.")
        pairs = []
        for name in edges:
            try:
                info = parse_edge(name)
            except ValueError as exc:
                raise BayescircError(f"cannot prune circuits over edge {name!r}: {exc}. "
                                     "Circuits need edge names in the EAP-IG graph syntax.") from None
            pairs.append((info.source, info.receiver))
        nodes = sorted({n for pair in pairs for n in pair} | {INPUT, LOGITS}, key=_node_order)
        position = {n: i for i, n in enumerate(nodes)}
        source = np.array([position[s] for s, _ in pairs], dtype=np.int64)
        receiver = np.array([position[r] for _, r in pairs], dtype=np.int64)
        return cls(edges, tuple(nodes), source, receiver)

    @cached_property
    def _incoming(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.receiver == v) for v in range(len(self.nodes))]

    @cached_property
    def _outgoing(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.source == v) for v in range(len(self.nodes))]

    def prune(self, masks: np.ndarray) -> np.ndarray:
        """Keep, per row of ``masks`` ``[circuits, edges]`` (bool), the edges on an input->logits path.

        Equivalent to :func:`bayescirc.graph.prune_to_paths` on each row, in
        ``O(circuits * edges)`` vectorised work.
        """
        masks = np.asarray(masks, dtype=bool)
        squeeze = masks.ndim == 1
        masks = np.atleast_2d(masks)
        if masks.shape[1] != len(self.edges):
            raise ValueError(f"masks have {masks.shape[1]} columns but the index has {len(self.edges)} edges")
        out = np.empty_like(masks)
        n_nodes = len(self.nodes)
        for start in range(0, len(masks), _CHUNK):
            block = masks[start:start + _CHUNK]
            forward = np.zeros((len(block), n_nodes), dtype=bool)
            forward[:, 0] = True  # input is first in forward order
            for v in range(1, n_nodes):
                idx = self._incoming[v]
                if len(idx):
                    forward[:, v] = (block[:, idx] & forward[:, self.source[idx]]).any(axis=1)
            backward = np.zeros_like(forward)
            backward[:, n_nodes - 1] = True  # logits is last
            for v in range(n_nodes - 2, -1, -1):
                idx = self._outgoing[v]
                if len(idx):
                    backward[:, v] = (block[:, idx] & backward[:, self.receiver[idx]]).any(axis=1)
            out[start:start + len(block)] = block & forward[:, self.source] & backward[:, self.receiver]
        return out[0] if squeeze else out


def prune_masks(masks: np.ndarray, edges: Sequence[str]) -> np.ndarray:
    """Prune many circuits at once: ``masks`` ``[circuits, edges]`` over ``edges`` -> pruned masks."""
    return EdgeIndex.from_edges(edges).prune(masks)


# --- set similarity --------------------------------------------------------------------------


def jaccard_matrix(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Jaccard similarity ``|A ∩ B| / |A ∪ B|`` between the rows of two boolean masks.

    Two empty circuits have similarity 1 (they agree). Returns ``[len(a), len(b)]``.
    """
    a = np.atleast_2d(np.asarray(a, dtype=bool))
    b = a if b is None else np.atleast_2d(np.asarray(b, dtype=bool))
    # float32 counts are exact below 2**24 edges and make the product ~2x faster
    dtype = np.float32 if a.shape[1] < 2**24 else np.float64
    fa, fb = a.astype(dtype), b.astype(dtype)
    inter = (fa @ fb.T).astype(np.float64)
    union = a.sum(1, dtype=np.float64)[:, None] + b.sum(1, dtype=np.float64)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where(union > 0, inter / np.where(union > 0, union, 1), 1.0)
    return sim


def _pairwise(sim: np.ndarray) -> np.ndarray:
    """Off-diagonal upper-triangle entries of a square similarity matrix (all distinct pairs)."""
    i, j = np.triu_indices(len(sim), k=1)
    return sim[i, j]


# --- sampling ----------------------------------------------------------------------------------


@dataclass
class CircuitSamples:
    """Circuits sampled from a posterior, pruned to input->logits paths.

    Attributes
    ----------
    edges : tuple of str
        Edge names, the columns of ``indicators``.
    indicators : ndarray of bool, ``[n_circuits, n_edges]``
        Row ``i`` is circuit ``i`` after pruning.
    draws : ndarray of int, ``[n_circuits]``
        The posterior draw (chains stacked, ``chain * n_draw + draw``) each circuit came from.
    rule : str
        The selection rule (``slab``, ``topk:K``, ``threshold:D``).
    seed : int
    """

    edges: tuple[str, ...]
    indicators: np.ndarray
    draws: np.ndarray
    rule: str = "slab"
    seed: int = 0
    _index: EdgeIndex | None = field(default=None, repr=False)

    @property
    def n_circuits(self) -> int:
        return int(self.indicators.shape[0])

    @property
    def index(self) -> EdgeIndex:
        if self._index is None:
            self._index = EdgeIndex.from_edges(self.edges)
        return self._index

    def table(self) -> pd.DataFrame:
        """Tidy table, one row per (circuit, edge in it): ``circuit``, ``draw`` (posterior draw), ``edge``."""
        rows, cols = np.nonzero(self.indicators)
        edges = pd.Categorical.from_codes(cols, categories=list(self.edges))
        return pd.DataFrame({"circuit": rows.astype(np.int64), schema.DIM_DRAW: self.draws[rows].astype(np.int64),
                             schema.EDGE: edges})

    @cached_property
    def frequency(self) -> pd.Series:
        """Per-edge inclusion frequency after pruning: the fraction of sampled circuits that contain the edge."""
        freq = self.indicators.mean(axis=0) if self.n_circuits else np.zeros(len(self.edges))
        return pd.Series(freq, index=pd.Index(self.edges, name=schema.EDGE), name="frequency")

    @cached_property
    def sizes(self) -> np.ndarray:
        """Number of edges of each sampled circuit, ``[n_circuits]``."""
        return self.indicators.sum(axis=1).astype(np.int64)

    def _mask_to_set(self, mask: np.ndarray) -> frozenset[str]:
        return frozenset(self.edges[i] for i in np.flatnonzero(mask))

    def median_circuit(self) -> frozenset[str]:
        """The median-probability circuit: edges with frequency > 0.5, then pruned.

        Frequencies are of pruned circuits, so an edge kept here was on an
        input->logits path in most draws; the final pruning removes edges whose
        path partners fell below 0.5.
        """
        return self._mask_to_set(self.index.prune(self.frequency.to_numpy() > 0.5))

    def credible_core(self, prob: float = 0.95) -> frozenset[str]:
        """Edges that are in at least ``prob`` of the sampled circuits (default 95%).

        The core is not pruned: it answers "which edges are almost surely in the
        circuit", and need not be a connected circuit on its own.
        """
        _check_prob(prob)
        return self._mask_to_set(self.frequency.to_numpy() >= prob - 1e-12)

    def superset_threshold(self, prob: float = 0.95) -> float:
        """The frequency level ``t*`` that defines :meth:`credible_superset`."""
        _check_prob(prob)
        if self.n_circuits == 0:
            return 1.0
        freq = self.frequency.to_numpy()
        # A circuit C lies inside {e: f_e >= t} iff t <= min_{e in C} f_e (an empty circuit: always).
        weakest = np.where(self.indicators, freq[None, :], np.inf).min(axis=1)
        order = np.sort(weakest)[::-1]
        needed = int(np.ceil(prob * self.n_circuits - 1e-9))
        t = order[max(needed, 1) - 1]
        return float(min(t, 1.0))

    def credible_superset(self, prob: float = 0.95) -> frozenset[str]:
        """Smallest frequency level set containing the sampled circuit in at least ``prob`` of draws.

        Definition: let ``f_e`` be the inclusion frequencies and
        ``S(t) = {e : f_e >= t}`` the nested level sets. ``t*`` is the largest
        ``t`` such that at least ``ceil(prob * n)`` of the ``n`` sampled circuits
        ``C_i`` satisfy ``C_i ⊆ S(t)`` (equivalently, ``t*`` is the
        ``ceil(prob * n)``-th largest of ``min_{e in C_i} f_e``, with
        ``min = +inf`` for an empty circuit). The superset is ``S(t*)`` pruned to
        input->logits paths: pruning removes no edge of a contained circuit (each
        of its edges is on a path within it), so coverage stays >= ``prob``.
        Among sets built from the frequency ranking, it is the smallest with that
        coverage; the smallest arbitrary edge set with that coverage is a hard
        combinatorial problem and is not what this reports.
        """
        t = self.superset_threshold(prob)
        return self._mask_to_set(self.index.prune(self.frequency.to_numpy() >= t))

    def coverage(self, circuit: Iterable[str]) -> float:
        """Fraction of sampled circuits contained in ``circuit``."""
        mask = np.isin(np.array(self.edges, dtype=object), list(set(circuit)))
        return float((~self.indicators | mask[None, :]).all(axis=1).mean()) if self.n_circuits else 1.0

    def size_posterior(self, hdi_prob: float = 0.9) -> dict:
        """Posterior of circuit size: mean, sd, median and the central ``hdi_prob`` interval."""
        _check_prob(hdi_prob)
        s = self.sizes.astype(float)
        lo, hi = np.quantile(s, [(1 - hdi_prob) / 2, (1 + hdi_prob) / 2]) if len(s) else (np.nan, np.nan)
        return {"mean": float(s.mean()) if len(s) else float("nan"), "sd": float(s.std()) if len(s) else float("nan"),
                "median": float(np.median(s)) if len(s) else float("nan"), "interval_prob": hdi_prob,
                "low": float(lo), "high": float(hi), "min": int(s.min()) if len(s) else 0,
                "max": int(s.max()) if len(s) else 0}

    def size_distribution(self) -> pd.Series:
        """Probability of each circuit size (index: size)."""
        counts = pd.Series(self.sizes).value_counts(normalize=True).sort_index()
        counts.index.name, counts.name = "size", "probability"
        return counts

    def expected_jaccard(self, max_circuits: int = 2000, seed: int = 0) -> float:
        """Expected Jaccard similarity of two independent posterior circuits.

        Estimated as the mean over all distinct pairs of sampled circuits (a
        random subset of ``max_circuits`` when there are more). Empty circuits
        have similarity 1 with each other. ``nan`` with fewer than two circuits.
        """
        masks = self.indicators
        if len(masks) < 2:
            return float("nan")
        if len(masks) > max_circuits:
            masks = masks[np.random.default_rng(seed).choice(len(masks), max_circuits, replace=False)]
        return float(_pairwise(jaccard_matrix(masks)).mean())

    def top_circuits(self, k: int = 5) -> pd.DataFrame:
        """The ``k`` most frequent distinct circuits: ``rank``, ``probability``, ``size``, ``edges`` (sorted tuple)."""
        if self.n_circuits == 0:
            return pd.DataFrame(columns=["rank", "probability", "size", "edges"])
        packed = np.packbits(self.indicators, axis=1)
        _, first, counts = np.unique(packed, axis=0, return_index=True, return_counts=True)
        order = np.lexsort((first, -counts))[:k]
        rows = []
        for rank, j in enumerate(order, start=1):
            mask = self.indicators[first[j]]
            rows.append({"rank": rank, "probability": counts[j] / self.n_circuits, "size": int(mask.sum()),
                         "edges": tuple(sorted(self._mask_to_set(mask)))})
        return pd.DataFrame(rows)

    def n_distinct(self) -> int:
        """Number of distinct circuits among the samples."""
        return int(len(np.unique(np.packbits(self.indicators, axis=1), axis=0))) if self.n_circuits else 0

    def edge_table(self, prob: float = 0.95) -> pd.DataFrame:
        """One row per edge: ``edge``, ``frequency``, ``in_median``, ``in_core``, ``in_superset`` (core and superset at ``prob``)."""
        median, core, superset = self.median_circuit(), self.credible_core(prob), self.credible_superset(prob)
        out = self.frequency.reset_index()
        out["in_median"] = out[schema.EDGE].isin(median)
        out["in_core"] = out[schema.EDGE].isin(core)
        out["in_superset"] = out[schema.EDGE].isin(superset)
        return out

    def summary(self, prob: float = 0.95, top: int = 5) -> dict:
        """Everything above as a JSON-ready dict."""
        top_table = self.top_circuits(top)
        return {
            "rule": self.rule, "seed": self.seed, "n_circuits": self.n_circuits, "n_edges": len(self.edges),
            "size": self.size_posterior(),
            "expected_jaccard": self.expected_jaccard(),
            "n_distinct_circuits": self.n_distinct(),
            "median_circuit_size": len(self.median_circuit()),
            "credible_prob": prob,
            "credible_core_size": len(self.credible_core(prob)),
            "credible_superset_size": len(self.credible_superset(prob)),
            "credible_superset_threshold": self.superset_threshold(prob),
            "top_circuits": [{"rank": int(r.rank), "probability": float(r.probability), "size": int(r.size)}
                             for r in top_table.itertuples()],
        }

    def to_text(self, prob: float = 0.95, top: int = 5, edges: int = 10) -> str:
        """A one-screen human-readable summary."""
        s = self.summary(prob, top)
        size = s["size"]
        lines = [
            f"{s['n_circuits']} circuits sampled with rule {s['rule']} over {s['n_edges']} edges (pruned to input->logits paths)",
            f"circuit size: mean {size['mean']:.1f}, sd {size['sd']:.1f}, median {size['median']:.0f}, "
            f"{size['interval_prob']:.0%} interval [{size['low']:.0f}, {size['high']:.0f}]",
            f"expected Jaccard between two posterior circuits: {s['expected_jaccard']:.3f}",
            f"median-probability circuit: {s['median_circuit_size']} edges",
            f"credible core (edges in >= {prob:.0%} of circuits): {s['credible_core_size']} edges",
            f"credible superset (contains the circuit in >= {prob:.0%} of draws): {s['credible_superset_size']} edges "
            f"(frequency >= {s['credible_superset_threshold']:.3f})",
            f"distinct circuits: {s['n_distinct_circuits']}; most frequent: "
            + ", ".join(f"#{t['rank']} p={t['probability']:.3f} ({t['size']} edges)" for t in s["top_circuits"]),
            "",
            f"top {edges} edges by inclusion frequency:",
        ]
        freq = self.frequency.sort_values(ascending=False, kind="stable").head(edges)
        lines += [f"  {name:<28} {value:6.3f}" for name, value in freq.items()]
        return "\n".join(lines)


def _check_prob(prob: float) -> None:
    if not 0 < prob <= 1:
        raise BayescircError(f"probability {prob!r} must be in (0, 1].")


def top_k_mask(values: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``values`` ``[rows, edges]``, mark the ``k`` entries with the largest ``|value|``.

    NaN entries (no score) are never selected; ties are broken arbitrarily (as EAP-IG's sort does).
    """
    magnitude = np.abs(np.atleast_2d(values))
    missing = np.isnan(magnitude)
    magnitude = np.where(missing, -np.inf, magnitude)
    k = min(int(k), magnitude.shape[1])
    out = np.zeros(magnitude.shape, dtype=bool)
    if k <= 0:
        return out
    top = np.argpartition(-magnitude, k - 1, axis=1)[:, :k]
    np.put_along_axis(out, top, True, axis=1)
    return out & ~missing


def _select(kind: str, param, mu: np.ndarray | None, inclusion: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    if kind == "slab":
        return rng.random(inclusion.shape, dtype=np.float32) < inclusion
    if kind == "threshold":
        return np.abs(mu) > param
    return top_k_mask(mu, param)


def check_paths(index: EdgeIndex, where, refuse: bool = True) -> None:
    """Refuse (or with ``refuse=False`` warn about) edges that hold no input->logits path; warn about edges on none.

    Such edges come from scores over part of a graph (one layer's edges, say):
    pruning would drop every edge from every circuit without a word.
    """
    if not index.edges:
        raise BayescircError(f"{where}: no edges, so no circuit.")
    on_path = index.prune(np.ones(len(index.edges), dtype=bool))
    if not on_path.any():
        message = (f"{where}: none of its {len(index.edges)} edges lies on a path from {INPUT!r} to {LOGITS!r} "
                   f"through its edges (e.g. {index.edges[0]!r}), so every pruned circuit is empty. Circuits need "
                   "scores for the whole graph; use scores collected over all edges.")
        if refuse:
            raise BayescircError(message)
        warnings.warn(message, CircuitWarning, stacklevel=3)
    elif not on_path.all():
        off = [e for e, ok in zip(index.edges, on_path) if not ok]
        warnings.warn(f"{where}: {len(off)} of its {len(index.edges)} edges lie on no path from {INPUT!r} to "
                      f"{LOGITS!r} through its edges and are in no circuit whatever their inclusion "
                      f"(e.g. {off[0]!r}); were the scores collected over part of the graph?", CircuitWarning,
                      stacklevel=3)


def sample_circuits(fit, n: int | None = None, rule: str = "slab", seed: int = 0) -> CircuitSamples:
    """Sample circuits from a fit's posterior, each pruned to input->logits paths.

    Parameters
    ----------
    fit : FitResult or str or Path
        The result of :func:`bayescirc.fitting.fit`, or a fit directory.
    n : int, optional
        Number of circuits. Default: one per posterior draw (chains stacked), in
        draw order. When given, draws are chosen at random (with replacement
        only when ``n`` exceeds the number of draws).
    rule : {"slab", "topk:K", "threshold:D"}, default "slab"
        ``slab``: ``Bernoulli(inclusion)`` per edge and draw; ``topk:K``: the K
        edges with the largest ``|mu|`` in that draw; ``threshold:D``: edges
        with ``|mu| > D`` in that draw.
    seed : int, default 0
        Seeds draw choice and the Bernoulli indicators.

    Returns
    -------
    CircuitSamples

    Examples
    --------
    >>> samples = sample_circuits("fit/", rule="slab")            # doctest: +SKIP
    >>> samples.median_circuit(), samples.expected_jaccard()      # doctest: +SKIP
    """
    from .posterior import FitResult, load_fit

    where = os.fspath(fit) if isinstance(fit, (str, os.PathLike)) else "the fit"
    if isinstance(fit, (str, os.PathLike)):
        fit = load_fit(fit)
    if not isinstance(fit, FitResult):
        raise BayescircError(f"sample_circuits needs a FitResult or a fit directory, got {type(fit).__name__}.")
    kind, param = parse_rule(rule)
    var = "inclusion" if kind == "slab" else "mu"
    values = fit.draws(var)
    n_draws = values.shape[0]
    if n_draws == 0:
        raise BayescircError("the fit's posterior has no draws.")
    if n is not None and n < 1:
        raise BayescircError(f"n={n} circuits: ask for at least 1.")
    rng = np.random.default_rng(seed)
    if n is None:
        draws = np.arange(n_draws)
    else:
        draws = rng.choice(n_draws, size=n, replace=n > n_draws)
    edges = tuple(fit.edge_names)
    finite = np.isfinite(values).all(axis=0)
    if not finite.all():
        bad = [edges[j] for j in np.flatnonzero(~finite)]
        raise BayescircError(f"the posterior's {var!r} is NaN or infinite for {len(bad)} edge(s), e.g. {bad[:3]}; "
                             "refit, or drop those edges from the scores.")
    if kind == "slab" and (values.min() < -1e-6 or values.max() > 1 + 1e-6):
        raise BayescircError("the posterior's 'inclusion' has values outside [0, 1]; it must hold probabilities.")
    index = EdgeIndex.from_edges(edges)
    check_paths(index, where)
    indicators = np.empty((len(draws), len(edges)), dtype=bool)
    for start in range(0, len(draws), _CHUNK):
        block = values[draws[start:start + _CHUNK]]
        # inclusion as float32 (it only meets uniforms); mu compared with D or ranked in float64
        block = block.astype(np.float32 if var == "inclusion" else np.float64, copy=False)
        selected = _select(kind, param, block if var == "mu" else None, block if var == "inclusion" else None, rng)
        indicators[start:start + len(block)] = index.prune(selected)
    label = "slab" if kind == "slab" else f"{kind}:{param if kind == 'topk' else float(param):g}"
    return CircuitSamples(edges=edges, indicators=indicators, draws=draws.astype(np.int64), rule=label, seed=seed,
                          _index=index)
