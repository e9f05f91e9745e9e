"""Circuits in the EAP-IG / MIB circuit JSON layout, both ways.

EAP-IG's ``Graph.to_json`` / ``Graph.from_json`` and the MIB circuit track read
and write one JSON object::

    {"cfg":   {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": false, "d_model": 768},
     "nodes": {"input": {"in_graph": true}, "a0.h0": {"in_graph": false}, ..., "logits": {"in_graph": true}},
     "edges": {"input->a0.h0<q>": {"score": -0.0003, "in_graph": false}, ...}}

Every node and every edge of the model's graph is listed (EAP-IG order). An
edge's ``score`` is its importance (MIB's "importance scores" submission) and
``in_graph`` says whether it is in the circuit (MIB's "multiple circuits"
submission). A node is in the graph, as after EAP-IG's pruning, when an
in-graph edge leaves it and one enters it (``input`` needs only the first);
``logits`` always is (EAP-IG fixes it so). A circuit that is not pruned to
input->logits paths (a credible core) keeps its edges as given: EAP-IG and
MIB prune them when they evaluate it. ``d_model`` only sizes EAP-IG's
neuron-level arrays, which edge circuits do not use; when it is not known it is
written as 0.

:func:`write_circuit_json` writes a circuit (and per-edge scores, e.g. posterior
inclusion probabilities); :func:`read_circuit_json` reads such a file back into a
table, one row per edge (``edge``, ``method``, ``score``, ``in_graph``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from . import schema
from ._io import atomic_path
from .errors import BayescircError
from .graph import INPUT, LOGITS, Graph, parse_edge, parse_node

__all__ = ["circuit_json", "collected_graph", "infer_graph", "model_width", "read_circuit_json", "write_circuit_json"]

REQUIRED_KEYS = ("cfg", "nodes", "edges")


def model_width(model) -> int | None:
    """``d_model`` of a local Hugging Face model directory (``config.json``), or ``None`` when unknown."""
    if not model:
        return None
    config = Path(str(model)) / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    for key in ("d_model", "n_embd", "hidden_size"):
        if isinstance(data.get(key), int):
            return data[key]
    return None


def collected_graph(metadata: Mapping | None) -> Graph | None:
    """The graph of the model the scores were collected on, from a scores file's metadata; None when it does not say.

    Edge names alone cannot tell a parallel-block model (GPT-J, Pythia: heads do
    not feed their own layer's MLP) from a sequential one, and EAP-IG/MIB
    rebuild the graph from the JSON's ``cfg``; ``collect`` records all three.
    Files collected before ``parallel_attn_mlp`` was recorded read as sequential.
    """
    collect = ((metadata or {}).get("extra") or {}).get("collect") or {}
    n_layers, n_heads = collect.get("n_layers"), collect.get("n_heads")
    if not (isinstance(n_layers, int) and isinstance(n_heads, int) and n_layers > 0 and n_heads > 0):
        return None
    return Graph(n_layers, n_heads, parallel_attn_mlp=bool(collect.get("parallel_attn_mlp", False)))


def infer_graph(edges: Iterable[str], parallel_attn_mlp: bool = False) -> Graph:
    """The smallest model graph whose edges include ``edges`` (layers and heads from the names)."""
    n_layers, n_heads = 0, 0
    for name in edges:
        try:
            info = parse_edge(name)
        except ValueError as exc:
            raise BayescircError(f"edge {name!r} is not in the EAP-IG graph syntax ({exc}); "
                                 "only such edges can be exported to EAP-IG/MIB JSON.") from None
        for layer in (info.source_layer, info.receiver_layer):
            if layer is not None:
                n_layers = max(n_layers, layer + 1)
        for head in (info.source_head, info.receiver_head):
            if head is not None:
                n_heads = max(n_heads, head + 1)
    if n_layers == 0:
        raise BayescircError("cannot infer the model graph: the edges name no layer. Pass graph=Graph(n_layers, n_heads).")
    return Graph(n_layers, max(n_heads, 1), parallel_attn_mlp=parallel_attn_mlp)


def circuit_json(circuit: Iterable[str] = (), scores: Mapping[str, float] | pd.Series | None = None, *,
                 graph: Graph | None = None, d_model: int | None = None) -> dict:
    """The EAP-IG/MIB JSON object of a circuit.

    Parameters
    ----------
    circuit : iterable of str
        Edges in the circuit (``in_graph: true``); default none (a scores-only file).
    scores : mapping edge -> float, optional
        Per-edge importance written as ``score``; edges not given get 0.0.
        Default: 1.0 for circuit edges, 0.0 otherwise.
    graph : Graph, optional
        The model's graph; default inferred from the edge names (as a sequential
        model: pass the graph, e.g. :func:`collected_graph`, for parallel blocks).
    d_model : int, optional
        Residual width written into ``cfg`` (0 when unknown).
    """
    circuit = set(circuit)
    if scores is not None:
        scores = {str(k): float(v) for k, v in dict(scores).items()}
    named = set(circuit) | set(scores or ())
    if graph is None:
        graph = infer_graph(named)
    unknown = sorted(e for e in named if not graph.contains(e))
    if unknown:
        raise BayescircError(f"{len(unknown)} edge(s) are not in the graph with {graph.n_layers} layers and "
                             f"{graph.n_heads} heads, e.g. {unknown[0]!r}. Pass the model's graph.")
    edges = {}
    feeds, fed = set(), set()
    for name in graph.edges:
        in_graph = name in circuit
        score = scores.get(name, 0.0) if scores is not None else float(in_graph)
        if not np.isfinite(score):
            raise BayescircError(f"edge {name!r} has a non-finite score {score!r}; JSON cannot hold it.")
        edges[name] = {"score": score, "in_graph": in_graph}
        if in_graph:
            info = parse_edge(name)
            feeds.add(info.source)
            fed.add(info.receiver)
    nodes = {node: {"in_graph": node == LOGITS or (node in feeds and (node == INPUT or node in fed))}
             for node in graph.nodes}
    cfg = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": graph.parallel_attn_mlp,
           "d_model": int(d_model or 0)}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def write_circuit_json(path: str | os.PathLike, circuit: Iterable[str] = (),
                       scores: Mapping[str, float] | pd.Series | None = None, *, graph: Graph | None = None,
                       d_model: int | None = None) -> Path:
    """Write :func:`circuit_json` to ``path`` atomically; returns the path.

    Examples
    --------
    >>> samples = sample_circuits(fit)                                          # doctest: +SKIP
    >>> write_circuit_json("circuit.json", samples.median_circuit(), samples.frequency)  # doctest: +SKIP
    """
    data = circuit_json(circuit, scores, graph=graph, d_model=d_model)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data))
    return path


def read_circuit_json(path: str | os.PathLike, method: str | None = None) -> pd.DataFrame:
    """Read an EAP-IG/MIB graph JSON into a table: ``edge``, ``method``, ``score``, ``in_graph``.

    ``score`` is the file's per-edge importance, an aggregate over a dataset
    (not per input), so the table is one row per edge; ``method`` labels it
    (default: the file name without extension). The file's ``cfg`` is in
    ``table.attrs["cfg"]``. A missing ``score`` (a membership-only file) reads
    as NaN.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BayescircError(f"{path}: no such file.") from None
    except IsADirectoryError:
        raise BayescircError(f"{path} is a directory; give the circuit JSON file inside it.") from None
    except json.JSONDecodeError as exc:
        raise BayescircError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise BayescircError(f"{path}: expected a JSON object with keys {list(REQUIRED_KEYS)}.")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise BayescircError(f"{path}: not an EAP-IG graph JSON, missing key(s) {missing} "
                             f"(expected {list(REQUIRED_KEYS)}).")
    for key in REQUIRED_KEYS:
        if not isinstance(data[key], dict):
            raise BayescircError(f"{path}: {key!r} must map names to values (a JSON object), got a "
                                 f"{type(data[key]).__name__}; not an EAP-IG graph JSON.")
    rows = []
    for name, info in data["edges"].items():
        try:
            parse_edge(name)
        except ValueError as exc:
            raise BayescircError(f"{path}: edge {name!r}: {exc}.") from None
        if isinstance(info, dict):
            score = info.get("score")
            in_graph = info.get("in_graph", False)
        else:  # older layouts map an edge straight to its membership
            score, in_graph = None, info
        try:
            score = float("nan") if score is None else float(score)
        except (TypeError, ValueError):
            raise BayescircError(f"{path}: edge {name!r} has a score {score!r} that is not a number.") from None
        rows.append((name, score, bool(in_graph)))
    for name in data["nodes"]:
        try:
            parse_node(name)
        except ValueError as exc:
            raise BayescircError(f"{path}: node {name!r}: {exc}.") from None
    label = method or path.name.removesuffix(".json")
    table = pd.DataFrame(rows, columns=[schema.EDGE, schema.SCORE, "in_graph"])
    table.insert(1, schema.METHOD, label)
    table[schema.SCORE] = table[schema.SCORE].astype(np.float64)
    table.attrs["cfg"] = dict(data["cfg"])
    return table
