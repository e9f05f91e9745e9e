"""Synthetic scores with known truth, from the generative model of the fit.

For edge ``e`` and input ``i`` the exact effect is

    theta[i, e] = mu[e] + tau[e] * eps[i, e]

with ``eps`` standard normal, or Student-t with ``df`` degrees of freedom
rescaled to unit variance (``heavy_tails``), so ``tau`` is always the
input-to-input standard deviation. An approximate method ``m`` scores

    s[i, e, m] = bias[m] + scale[m] * theta[i, e] + delta[e, m] + noise_sd[m] * z

with ``delta[e, m] ~ N(0, edge_sd[m]^2)`` a systematic per-edge error; any of
the four may differ by edge type (``MethodError.by_edge_type``), as they do on
real models.
Exact scores (``theta``) exist for the first ``n_exact`` inputs; approximate
scores for all.

Circuit edges are the union of random forward paths from ``input`` to
``logits`` (so pruning keeps them), with ``mu ~ N(0, effect_sd^2)``; the other
edges have ``mu ~ N(0, spike_sd^2)`` (exactly zero by default). Decoys are
non-circuit edges with zero mean and a large ``tau`` (``decoy_sd``): the
edges a |mean score| ranking over few inputs is fooled by. ``tau`` varies by
edge type and source layer around ``intrinsic_sd`` (log-normal), as the
fit's pooling assumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import schema
from ._io import atomic_path
from .errors import BayescircError
from .graph import LOGITS, Graph, parse_edge

__all__ = ["MethodError", "SimulationConfig", "Simulation", "simulate", "write_simulation", "read_truth",
           "truth_path_for"]


ERROR_FIELDS = ("bias", "scale", "edge_sd", "noise_sd")


@dataclass(frozen=True)
class MethodError:
    """How an approximate method's score relates to the exact effect (see module docstring).

    ``by_edge_type`` overrides any of the four values for edges of a type,
    e.g. ``{"input->attn<q>": {"scale": 0.05, "noise_sd": 0.01}}``.
    """

    bias: float = 0.0
    scale: float = 1.0
    edge_sd: float = 0.0
    noise_sd: float = 0.1
    by_edge_type: dict = field(default_factory=dict)

    def __post_init__(self):
        for edge_type, values in self.by_edge_type.items():
            unknown = set(values) - set(ERROR_FIELDS)
            if unknown:
                raise ValueError(f"by_edge_type[{edge_type!r}]: unknown {sorted(unknown)}; use {list(ERROR_FIELDS)}")
        for where, values in [("", asdict(self))] + [(f"by_edge_type[{t!r}] ", v) for t, v in self.by_edge_type.items()]:
            if values.get("edge_sd", 0) < 0 or values.get("noise_sd", 0) < 0:
                raise ValueError(f"{where}edge_sd and noise_sd must be >= 0, got {values.get('edge_sd')}, "
                                 f"{values.get('noise_sd')}")

    def per_edge(self, edge_types) -> dict[str, np.ndarray]:
        """The four values for each edge of the given types: arrays (E,)."""
        edge_types = np.asarray(edge_types, dtype=object)
        return {k: np.array([self.by_edge_type.get(t, {}).get(k, getattr(self, k)) for t in edge_types], float)
                for k in ERROR_FIELDS}


def _default_methods() -> dict[str, MethodError]:
    return {
        schema.EAP: MethodError(bias=0.0, scale=0.8, edge_sd=0.05, noise_sd=0.2),
        schema.EAP_IG_INPUTS: MethodError(bias=0.0, scale=0.95, edge_sd=0.02, noise_sd=0.1),
    }


@dataclass(frozen=True)
class SimulationConfig:
    """Sizes and parameters of a simulated scores file.

    Parameters
    ----------
    n_layers, n_heads : int, default 2, 4
        Graph shape (GPT-2 small is 12, 12).
    n_inputs : int, default 200
    n_exact : int, optional
        Exact scores on inputs ``0 .. n_exact-1``; 0 for approximations only.
        Default: 20% of the inputs (at least 1), the common collection design.
    methods : dict of label -> MethodError
        Approximate methods; empty for exact scores only.
    circuit_fraction : float, default 0.1
        Target fraction of edges in the planted circuit.
    effect_sd : float, default 1.0
        Spread of circuit edges' mean effects (metric units).
    spike_sd : float, default 0.0
        Spread of the other edges' mean effects.
    intrinsic_sd : float, default 0.5
        Typical input-to-input sd of an edge's exact effect.
    intrinsic_spread : float, default 0.3
        Log-sd of tau around its edge-type/layer group value.
    heavy_tails : float or None, default None
        Student-t degrees of freedom (> 2) for the input variation; None for Gaussian.
    decoy_fraction : float, default 0.05
        Fraction of non-circuit edges that are zero-mean decoys.
    decoy_sd : float, default 3.0
        Intrinsic sd of decoy edges.
    seed : int, default 0
    """

    n_layers: int = 2
    n_heads: int = 4
    n_inputs: int = 200
    n_exact: int | None = None
    methods: dict[str, MethodError] = field(default_factory=_default_methods)
    circuit_fraction: float = 0.1
    effect_sd: float = 1.0
    spike_sd: float = 0.0
    intrinsic_sd: float = 0.5
    intrinsic_spread: float = 0.3
    heavy_tails: float | None = None
    decoy_fraction: float = 0.05
    decoy_sd: float = 3.0
    seed: int = 0

    def __post_init__(self):
        if self.n_layers < 1 or self.n_heads < 1:
            raise ValueError(f"n_layers and n_heads must be >= 1, got {self.n_layers} and {self.n_heads}")
        if self.n_inputs < 1:
            raise ValueError(f"n_inputs must be >= 1, got {self.n_inputs}")
        if self.n_exact is None:
            object.__setattr__(self, "n_exact", max(1, round(0.2 * self.n_inputs)))
        if not 0 <= self.n_exact <= self.n_inputs:
            raise ValueError(f"n_exact must be between 0 and n_inputs={self.n_inputs}, got {self.n_exact}")
        if self.n_exact == 0 and not self.methods:
            raise ValueError("nothing to simulate: n_exact is 0 and no approximate method is given")
        if any(schema.is_exact(m) for m in self.methods):
            raise ValueError("'exact' is not an approximate method; set n_exact for exact scores")
        if not 0 <= self.circuit_fraction <= 1 or not 0 <= self.decoy_fraction <= 1:
            raise ValueError("circuit_fraction and decoy_fraction must lie in [0, 1]")
        if self.heavy_tails is not None and self.heavy_tails <= 2:
            raise ValueError(f"heavy_tails (Student-t df) must be > 2 so the variance is finite, got {self.heavy_tails}")
        if min(self.effect_sd, self.intrinsic_sd, self.decoy_sd) <= 0 or self.spike_sd < 0 or self.intrinsic_spread < 0:
            raise ValueError("effect_sd, intrinsic_sd and decoy_sd must be > 0; spike_sd and intrinsic_spread >= 0")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["methods"] = {k: asdict(v) for k, v in self.methods.items()}
        return out


@dataclass
class Simulation:
    """A simulated scores table with its truth (one row per edge) and method parameters."""

    scores: pd.DataFrame
    truth: pd.DataFrame
    config: SimulationConfig


def _planted_circuit(graph: Graph, fraction: float, rng: np.random.Generator) -> set[str]:
    """Union of random forward paths input -> logits until ``fraction`` of edges is reached.

    Every path is complete, so the planted circuit survives pruning; its size is
    the target, or one more when the last path had to be closed.
    """
    target = int(round(fraction * graph.n_edges))
    if target == 0:
        return set()
    by_source: dict[str, list[str]] = {}
    for edge in graph.edges:
        by_source.setdefault(parse_edge(edge).source, []).append(edge)
    chosen: set[str] = set()
    while len(chosen) < target:
        node = "input"
        while node != LOGITS:
            out = by_source[node]
            # Prefer short hops so paths pass through several nodes.
            weights = np.array([1.0 / (1 + graph.nodes.index(parse_edge(e).receiver)) for e in out])
            edge = out[rng.choice(len(out), p=weights / weights.sum())]
            chosen.add(edge)
            node = parse_edge(edge).receiver
            if len(chosen) >= target and node != LOGITS:
                # Target reached mid-path: close the path with the node's direct edge to
                # logits (every node has one) so the circuit stays a union of complete
                # input->logits paths (pruning keeps every planted edge) and overshoots
                # the target by at most one edge.
                chosen.add(f"{node}->{LOGITS}")
                break
    return chosen


def truth_table(config: SimulationConfig) -> tuple[Graph, pd.DataFrame]:
    """Draw the per-edge truth: mean effect, intrinsic sd, circuit and decoy flags, per-edge errors."""
    rng = np.random.default_rng([config.seed, 0])
    graph = Graph(config.n_layers, config.n_heads)
    table = graph.edge_table()
    circuit = _planted_circuit(graph, config.circuit_fraction, rng)
    in_circuit = table["edge"].isin(circuit).to_numpy()
    n = len(table)
    mu = np.where(in_circuit, rng.normal(0, config.effect_sd, n), rng.normal(0, 1, n) * config.spike_sd)
    types = sorted(table["edge_type"].unique())
    type_effect = dict(zip(types, rng.normal(0, 0.3, len(types))))
    layer_effect = rng.normal(0, 0.2, config.n_layers + 1)
    log_tau = (np.log(config.intrinsic_sd) + table["edge_type"].map(type_effect).to_numpy()
               + layer_effect[table["source_layer"].to_numpy(dtype=int) + 1]
               + config.intrinsic_spread * rng.normal(0, 1, n))
    tau = np.exp(log_tau)
    candidates = np.flatnonzero(~in_circuit)
    n_decoys = int(round(config.decoy_fraction * len(candidates)))
    is_decoy = np.zeros(n, bool)
    is_decoy[rng.choice(candidates, n_decoys, replace=False)] = True
    mu[is_decoy] = 0.0
    tau[is_decoy] = config.decoy_sd
    out = pd.DataFrame({
        "edge": table["edge"], "edge_type": table["edge_type"], "source_layer": table["source_layer"].astype("int64"),
        "in_circuit": in_circuit, "is_decoy": is_decoy, "effect": mu, "intrinsic_sd": tau,
    })
    for k, (label, err) in enumerate(config.methods.items()):
        edge_sd = err.per_edge(out["edge_type"])["edge_sd"]
        out[f"error_{label}"] = np.random.default_rng([config.seed, 1, k]).normal(0, 1, n) * edge_sd
    return graph, out


_BLOCK = 16  # inputs per random-number stream: results do not depend on chunk sizes


def _block(config: SimulationConfig, truth: pd.DataFrame, start: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(method, input ids, scores [inputs, edges]) for inputs ``start .. start+_BLOCK-1``."""
    ids = np.arange(start, min(start + _BLOCK, config.n_inputs))
    rng = np.random.default_rng([config.seed, 2, start])
    E = len(truth)
    if config.heavy_tails is None:
        eps = rng.normal(0, 1, (len(ids), E))
    else:
        nu = config.heavy_tails
        eps = rng.standard_t(nu, (len(ids), E)) * np.sqrt((nu - 2) / nu)
    theta = truth["effect"].to_numpy() + truth["intrinsic_sd"].to_numpy() * eps
    blocks = []
    has = ids < config.n_exact
    if has.any():
        blocks.append((schema.EXACT, ids[has], theta[has]))
    for label, err in config.methods.items():
        p = err.per_edge(truth["edge_type"])
        noise = rng.normal(0, 1, theta.shape) * p["noise_sd"]
        blocks.append((label, ids, p["bias"] + p["scale"] * theta + truth[f"error_{label}"].to_numpy() + noise))
    return blocks


def _chunks(config: SimulationConfig, truth: pd.DataFrame, chunk_inputs: int) -> Iterator[pd.DataFrame]:
    edges = pd.Categorical(truth["edge"])
    method_names = ([schema.EXACT] if config.n_exact else []) + list(config.methods)
    E = len(truth)
    step = max(1, chunk_inputs // _BLOCK) * _BLOCK
    for chunk_start in range(0, config.n_inputs, step):
        frames = []
        for start in range(chunk_start, min(chunk_start + step, config.n_inputs), _BLOCK):
            for label, rows, values in _block(config, truth, start):
                frames.append(pd.DataFrame({
                    schema.INPUT_ID: np.repeat(rows, E),
                    schema.EDGE: pd.Categorical.from_codes(np.tile(edges.codes, len(rows)), edges.categories),
                    schema.METHOD: pd.Categorical.from_codes(np.full(len(rows) * E, method_names.index(label)), method_names),
                    schema.SCORE: values.reshape(-1),
                }))
        frame = pd.concat(frames, ignore_index=True)
        yield frame.sort_values([schema.INPUT_ID], kind="stable", ignore_index=True)


def _metadata(config: SimulationConfig) -> dict:
    methods = {schema.EXACT: {}} if config.n_exact else {}
    methods.update({k: {"simulated": asdict(v)} for k, v in config.methods.items()})
    return {"model": "simulated", "task": "simulated", "metric": "simulated (metric units)",
            "methods": methods, "n_inputs": config.n_inputs, "seed": config.seed,
            "extra": {"simulation": config.to_dict()}}


def simulate(config: SimulationConfig | None = None, **overrides) -> Simulation:
    """Simulate a scores table in memory; see :class:`SimulationConfig` for options.

    Examples
    --------
    >>> sim = simulate(n_layers=2, n_heads=2, n_inputs=20, n_exact=5, seed=1)
    >>> sorted(sim.scores.method.unique())
    ['eap', 'eap-ig-inputs', 'exact']
    """
    config = _config(config, overrides)
    _, truth = truth_table(config)
    scores = pd.concat(list(_chunks(config, truth, chunk_inputs=256)), ignore_index=True)
    for col in (schema.EDGE, schema.METHOD):
        scores[col] = scores[col].astype("category")
    return Simulation(scores=scores, truth=truth, config=config)


def _config(config: SimulationConfig | None, overrides: dict) -> SimulationConfig:
    if config is None:
        return SimulationConfig(**overrides)
    if overrides:
        return SimulationConfig(**{**asdict(config), "methods": config.methods, **overrides})
    return config


def truth_path_for(path: str | os.PathLike) -> Path:
    """Default truth table beside a scores file: ``sim.parquet`` -> ``sim.truth.parquet``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".parquet") + ".truth.parquet")


def _output_error(path: Path, exc: OSError) -> BayescircError:
    """A one-line user error for an output path that cannot be written."""
    blocking = next((p for p in path.parents if p.is_file()), None)
    if blocking is not None:
        return BayescircError(f"cannot write {path}: {blocking} is a file, not a folder. Choose another output path.")
    return BayescircError(f"cannot write {path} ({exc.strerror or exc}). Choose another output path.")


def write_simulation(path: str | os.PathLike, config: SimulationConfig | None = None,
                     truth_path: str | os.PathLike | None = None, progress: bool = False, **overrides) -> tuple[Path, Path]:
    """Stream a simulation to ``path`` (scores.parquet) and its truth to ``truth_path``.

    ``truth_path`` defaults to ``<path stem>.truth.parquet`` beside ``path``.
    Memory stays bounded by one chunk of inputs, so GPT-2-small-sized files
    (97 M rows) can be written. Returns both paths. An output that cannot be
    written, or a ``truth_path`` that is ``path``, raises
    :class:`~bayescirc.errors.BayescircError`.
    """
    from tqdm.auto import tqdm

    from .scores import ScoresWriter

    config = _config(config, overrides)
    path = Path(path)
    truth_path = Path(truth_path) if truth_path else truth_path_for(path)
    if truth_path.resolve() == path.resolve():
        raise BayescircError(f"the truth table and the scores would both be written to {path}; give each its own path.")
    for out in (path, truth_path):  # both checked first, so a bad truth path does not leave scores without truth
        if out.is_dir():
            raise BayescircError(f"cannot write {out}: it is a directory. Give a file path ending in .parquet.")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _output_error(out, exc) from None
    _, truth = truth_table(config)
    chunk = max(1, 2_000_000 // max(1, len(truth) * (1 + len(config.methods))))
    try:
        with ScoresWriter(path, metadata=_metadata(config), score_dtype="float32") as writer:
            bar = tqdm(total=config.n_inputs, unit="input", desc="simulate", disable=not progress)
            for frame in _chunks(config, truth, chunk):
                writer.write(frame)
                bar.update(frame[schema.INPUT_ID].nunique())
            bar.close()
    except OSError as exc:
        raise _output_error(path, exc) from None
    table = pa.Table.from_pandas(truth, preserve_index=False)
    table = table.replace_schema_metadata({schema.METADATA_KEY: json.dumps({"simulation": config.to_dict()}).encode()})
    try:
        with atomic_path(truth_path) as tmp:
            pq.write_table(table, tmp)
    except OSError as exc:
        raise _output_error(truth_path, exc) from None
    return path, truth_path


def read_truth(path: str | os.PathLike) -> tuple[pd.DataFrame, SimulationConfig]:
    """Read a truth table written by :func:`write_simulation`, with the config that made it."""
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[schema.METADATA_KEY])["simulation"]
    meta["methods"] = {k: MethodError(**v) for k, v in meta["methods"].items()}
    return table.to_pandas(), SimulationConfig(**meta)
