"""The edge graph shared with EAP-IG and the MIB circuit track.

Nodes are ``input``, ``a{layer}.h{head}`` (attention heads), ``m{layer}``
(MLPs) and ``logits``. An edge runs from every upstream node to every
downstream receiver; an attention head receives separately on its ``q``, ``k``
and ``v`` inputs, written ``a0.h3->a2.h1<q>``. With sequential blocks (GPT-2),
heads of layer ``l`` feed the MLP of layer ``l`` but not each other. GPT-2
small (12 layers, 12 heads) has 32,491 edges.

This module is also the one place where nodes map to TransformerLens hook
names (see :func:`source_hook` and :func:`receiver_hook`); it never imports
TransformerLens, so it is usable on a machine without torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import pandas as pd

INPUT = "input"
LOGITS = "logits"
QKV = ("q", "k", "v")

# Edge "types" used for pooling in the fit; names that do not parse fall in OTHER.
OTHER = "other"

_N = r"(?:0|[1-9]\d*)"  # no leading zeros: a00.h3 would be a second spelling of a0.h3
_NODE = re.compile(rf"^(?:(?P<input>input)|(?P<logits>logits)|a(?P<al>{_N})\.h(?P<ah>{_N})|m(?P<ml>{_N}))$")
_EDGE = re.compile(r"^(?P<src>[^<>\-]+)->(?P<dst>[^<>\-]+?)(?:<(?P<qkv>[qkv])>)?$")


class NodeInfo(NamedTuple):
    """A parsed node name: kind is ``input``, ``attn``, ``mlp`` or ``logits``.

    ``layer`` is -1 for ``input`` and ``None`` for ``logits`` (whose layer
    depends on the model); ``head`` is set for attention heads only.
    """

    name: str
    kind: str
    layer: int | None
    head: int | None


class EdgeInfo(NamedTuple):
    """A parsed edge name, the fields the fit pools over."""

    edge: str
    source: str
    receiver: str
    qkv: str | None
    source_layer: int
    receiver_layer: int | None
    source_type: str
    receiver_type: str
    source_head: int | None
    receiver_head: int | None

    @property
    def edge_type(self) -> str:
        """Pooling group, e.g. ``attn->attn<q>``, ``mlp->logits``."""
        suffix = f"<{self.qkv}>" if self.qkv else ""
        return f"{self.source_type}->{self.receiver_type}{suffix}"


def parse_node(name: str) -> NodeInfo:
    """Parse ``input``, ``a3.h7``, ``m2`` or ``logits``; ``ValueError`` otherwise."""
    match = _NODE.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a node name: expected 'input', 'a<layer>.h<head>', 'm<layer>' or 'logits'")
    if match["input"]:
        return NodeInfo(name, "input", -1, None)
    if match["logits"]:
        return NodeInfo(name, "logits", None, None)
    if match["al"] is not None:
        return NodeInfo(name, "attn", int(match["al"]), int(match["ah"]))
    return NodeInfo(name, "mlp", int(match["ml"]), None)


def parse_edge(name: str) -> EdgeInfo:
    """Parse an edge name such as ``a0.h3->a2.h1<q>``.

    Raises ``ValueError`` naming the problem when the name does not follow the
    EAP-IG syntax: an unknown node, a head receiver without ``<q|k|v>``, a
    ``<q|k|v>`` on a non-head receiver, ``logits`` as a source or ``input`` as
    a receiver, or a receiver that is not downstream of its source.
    """
    match = _EDGE.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not an edge name: expected 'source->receiver' or 'source->a<l>.h<h><q|k|v>'")
    src, dst = parse_node(match["src"]), parse_node(match["dst"])
    qkv = match["qkv"]
    if src.kind == "logits":
        raise ValueError(f"{name!r}: 'logits' cannot be an edge source")
    if dst.kind == "input":
        raise ValueError(f"{name!r}: 'input' cannot be an edge receiver")
    if dst.kind == "attn" and qkv is None:
        raise ValueError(f"{name!r}: an attention-head receiver needs <q>, <k> or <v>, e.g. '{name}<q>'")
    if dst.kind != "attn" and qkv is not None:
        raise ValueError(f"{name!r}: only attention-head receivers take <{qkv}>")
    if dst.layer is not None:
        # Sequential blocks: heads feed the MLP of their own layer, nothing else in it.
        later = dst.layer > src.layer or (dst.layer == src.layer and src.kind == "attn" and dst.kind == "mlp")
        if not later:
            raise ValueError(f"{name!r}: receiver {dst.name} is not downstream of source {src.name}")
    return EdgeInfo(
        edge=name,
        source=src.name,
        receiver=dst.name,
        qkv=qkv,
        source_layer=src.layer,
        receiver_layer=dst.layer,
        source_type=src.kind,
        receiver_type=dst.kind,
        source_head=src.head,
        receiver_head=dst.head,
    )


def edge_table(edges: Iterable[str], n_layers: int | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Parse many edge names into a table, keeping the ones that do not parse.

    Returns ``(table, unparsed)``: one row per edge with the :class:`EdgeInfo`
    fields plus ``edge_type``; names that do not follow the graph syntax get
    ``edge_type == "other"`` and missing layers, and are listed in
    ``unparsed`` so the caller can warn. ``receiver_layer`` of ``logits`` is
    ``n_layers`` when given (the fit uses it to pool by layer), else missing.
    """
    rows, unparsed = [], []
    for name in edges:
        try:
            info = parse_edge(name)
        except ValueError:
            unparsed.append(name)
            rows.append(dict(edge=name, source=None, receiver=None, qkv=None, source_layer=None,
                             receiver_layer=None, source_type=OTHER, receiver_type=OTHER,
                             source_head=None, receiver_head=None, edge_type=OTHER))
            continue
        row = info._asdict()
        if row["receiver_layer"] is None and n_layers is not None:
            row["receiver_layer"] = n_layers
        row["edge_type"] = info.edge_type
        rows.append(row)
    columns = list(EdgeInfo._fields) + ["edge_type"]
    table = pd.DataFrame(rows, columns=columns)
    for col in ("source_layer", "receiver_layer", "source_head", "receiver_head"):
        table[col] = table[col].astype("Int64")
    return table, unparsed


@dataclass(frozen=True)
class Graph:
    """The EAP-IG edge graph of a model with ``n_layers`` blocks of ``n_heads`` heads.

    ``parallel_attn_mlp`` is for blocks where attention and MLP read the same
    residual (GPT-J, Pythia); then heads do not feed their layer's MLP.
    """

    n_layers: int
    n_heads: int
    parallel_attn_mlp: bool = False

    def __post_init__(self):
        if self.n_layers < 1 or self.n_heads < 1:
            raise ValueError(f"a graph needs n_layers >= 1 and n_heads >= 1, got {self.n_layers}, {self.n_heads}")

    @cached_property
    def nodes(self) -> tuple[str, ...]:
        """Node names in forward order: input, then per layer its heads and MLP, then logits."""
        names = [INPUT]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)]
            names.append(f"m{layer}")
        names.append(LOGITS)
        return tuple(names)

    @cached_property
    def edges(self) -> tuple[str, ...]:
        """Edge names in EAP-IG's order (by receiver, then source)."""
        edges: list[str] = []
        upstream = [INPUT]
        for layer in range(self.n_layers):
            heads = [f"a{layer}.h{h}" for h in range(self.n_heads)]
            mlp = f"m{layer}"
            for src in upstream:
                for head in heads:
                    edges += [f"{src}->{head}<{x}>" for x in QKV]
            if self.parallel_attn_mlp:
                edges += [f"{src}->{mlp}" for src in upstream]
                upstream += heads
            else:
                upstream += heads
                edges += [f"{src}->{mlp}" for src in upstream]
            upstream.append(mlp)
        edges += [f"{src}->{LOGITS}" for src in upstream]
        return tuple(edges)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def edge_table(self) -> pd.DataFrame:
        """Parsed fields of every edge (see :func:`edge_table`)."""
        return edge_table(self.edges, n_layers=self.n_layers)[0]

    def contains(self, edge: str) -> bool:
        return edge in self._edge_set

    @cached_property
    def _edge_set(self) -> frozenset[str]:
        return frozenset(self.edges)


# --- TransformerLens hook names ------------------------------------------------------
# Shapes as TransformerLens exposes them with the per-head hook flags on:
#   hook_embed                     [batch, pos, d_model]
#   blocks.{l}.attn.hook_result    [batch, pos, n_heads, d_model]   (set_use_attn_result)
#   blocks.{l}.hook_mlp_out        [batch, pos, d_model]
#   blocks.{l}.hook_{q,k,v}_input  [batch, pos, n_heads, d_model]   (set_use_split_qkv_input)
#   blocks.{l}.hook_mlp_in         [batch, pos, d_model]            (set_use_hook_mlp_in)
#   blocks.{L-1}.hook_resid_post   [batch, pos, d_model]            (input of the unembedding)


class Hook(NamedTuple):
    """A hook name and, for per-head hooks, the head index on axis 2."""

    name: str
    head: int | None


def source_hook(node: str) -> Hook:
    """Hook whose output is what ``node`` writes into the residual stream.

    The input node is ``hook_embed`` (token embeddings only, as in EAP-IG:
    positional embeddings are identical in clean and corrupted runs).
    """
    info = parse_node(node)
    if info.kind == "input":
        return Hook("hook_embed", None)
    if info.kind == "attn":
        return Hook(f"blocks.{info.layer}.attn.hook_result", info.head)
    if info.kind == "mlp":
        return Hook(f"blocks.{info.layer}.hook_mlp_out", None)
    raise ValueError(f"{node!r} writes nothing into the residual stream: it cannot be an edge source")


def receiver_hook(node: str, qkv: str | None, n_layers: int) -> Hook:
    """Hook whose value is what ``node`` (on its ``qkv`` input) reads from the residual stream."""
    info = parse_node(node)
    if info.kind == "attn":
        if qkv not in QKV:
            raise ValueError(f"attention receiver {node!r} needs qkv in {QKV}, got {qkv!r}")
        return Hook(f"blocks.{info.layer}.hook_{qkv}_input", info.head)
    if info.kind == "mlp":
        return Hook(f"blocks.{info.layer}.hook_mlp_in", None)
    if info.kind == "logits":
        return Hook(f"blocks.{n_layers - 1}.hook_resid_post", None)
    raise ValueError(f"{node!r} reads nothing from the residual stream: it cannot be an edge receiver")


def required_hooks(graph: Graph) -> list[str]:
    """Every hook name the collector needs on a model with this graph."""
    names = {source_hook(n).name for n in graph.nodes if n != LOGITS}
    for node in graph.nodes:
        info = parse_node(node)
        if info.kind == "attn":
            names.update(receiver_hook(node, x, graph.n_layers).name for x in QKV)
        elif info.kind in ("mlp", "logits"):
            names.add(receiver_hook(node, None, graph.n_layers).name)
    return sorted(names)


def prune_to_paths(edges: Iterable[str]) -> set[str]:
    """Keep the edges that lie on some path from ``input`` to ``logits``.

    This is the pruning EAP-IG applies to a selected edge set: an edge whose
    source is not reachable from ``input`` or whose receiver cannot reach
    ``logits`` through selected edges contributes nothing to the circuit.
    """
    infos = [parse_edge(e) for e in edges]
    forward: dict[str, list[str]] = {}
    backward: dict[str, list[str]] = {}
    for info in infos:
        forward.setdefault(info.source, []).append(info.receiver)
        backward.setdefault(info.receiver, []).append(info.source)

    def reach(start: str, adjacency: dict[str, list[str]]) -> set[str]:
        seen, stack = {start}, [start]
        while stack:
            for nxt in adjacency.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    from_input = reach(INPUT, forward)
    to_logits = reach(LOGITS, backward)
    return {i.edge for i in infos if i.source in from_input and i.receiver in to_logits}
