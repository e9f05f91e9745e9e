"""EAP-IG / MIB circuit JSON: the exact layout, round trips, and errors that name the problem."""

import json

import pytest

from bayescirc.errors import BayescircError
from bayescirc.export import circuit_json, infer_graph, read_circuit_json, write_circuit_json
from bayescirc.graph import Graph

# What EAP-IG's Graph.to_json writes for a 1-layer, 1-head model with the circuit
# input->a0.h0<v> -> a0.h0 -> logits (written out by hand, key for key).
HAND_WRITTEN = {
    "cfg": {"n_layers": 1, "n_heads": 1, "parallel_attn_mlp": False, "d_model": 8},
    "nodes": {"input": {"in_graph": True}, "a0.h0": {"in_graph": True}, "m0": {"in_graph": False},
              "logits": {"in_graph": True}},
    "edges": {
        "input->a0.h0<q>": {"score": 0.0, "in_graph": False},
        "input->a0.h0<k>": {"score": 0.0, "in_graph": False},
        "input->a0.h0<v>": {"score": 0.9, "in_graph": True},
        "input->m0": {"score": 0.25, "in_graph": False},
        "a0.h0->m0": {"score": 0.0, "in_graph": False},
        "input->logits": {"score": 0.0, "in_graph": False},
        "a0.h0->logits": {"score": 0.75, "in_graph": True},
        "m0->logits": {"score": 0.0, "in_graph": False},
    },
}
CIRCUIT = {"input->a0.h0<v>", "a0.h0->logits"}
SCORES = {"input->a0.h0<v>": 0.9, "input->m0": 0.25, "a0.h0->logits": 0.75}


def test_circuit_json_matches_the_hand_written_eap_ig_file():
    got = circuit_json(CIRCUIT, SCORES, graph=Graph(1, 1), d_model=8)
    assert got == HAND_WRITTEN
    assert list(got) == ["cfg", "nodes", "edges"]
    assert list(got["edges"]) == list(HAND_WRITTEN["edges"])  # EAP-IG's edge order


def test_reading_the_hand_written_file(tmp_path):
    path = tmp_path / "ioi-eap-ig.json"
    path.write_text(json.dumps(HAND_WRITTEN))
    table = read_circuit_json(path)
    assert list(table.columns) == ["edge", "method", "score", "in_graph"]
    assert set(table.method) == {"ioi-eap-ig"}
    assert set(table.loc[table.in_graph, "edge"]) == CIRCUIT
    assert table.set_index("edge").loc["input->m0", "score"] == 0.25
    assert table.attrs["cfg"]["n_heads"] == 1


def test_round_trip_through_a_file(tmp_path):
    graph = Graph(2, 3)
    scores = {e: (i % 7) / 10 - 0.3 for i, e in enumerate(graph.edges)}
    circuit = {"input->a1.h2<k>", "a1.h2->logits", "input->m0", "m0->logits"}
    path = write_circuit_json(tmp_path / "c.json", circuit, scores, graph=graph)
    table = read_circuit_json(path, method="bayes")
    assert set(table.loc[table.in_graph, "edge"]) == circuit
    assert table.set_index("edge")["score"].to_dict() == pytest.approx(scores)
    data = json.loads(path.read_text())
    assert data["nodes"]["a1.h2"]["in_graph"] and not data["nodes"]["a0.h0"]["in_graph"]
    assert len(data["edges"]) == graph.n_edges


def test_node_flags_are_those_eap_ig_pruning_leaves():
    # a credible core need not be pruned: m0 is fed by the input but feeds nothing in the circuit
    nodes = circuit_json({"input->m0", "input->logits", "a0.h0->logits"}, graph=Graph(1, 1))["nodes"]
    assert {n for n, v in nodes.items() if v["in_graph"]} == {"input", "logits"}  # a0.h0 has no input edge either


def test_default_scores_are_membership_and_graph_is_inferred():
    got = circuit_json({"a0.h1->logits", "input->a0.h1<q>"})
    assert got["cfg"] == {"n_layers": 1, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 0}
    assert got["edges"]["a0.h1->logits"] == {"score": 1.0, "in_graph": True}
    assert got["edges"]["a0.h0->logits"] == {"score": 0.0, "in_graph": False}
    assert infer_graph(["a3.h0->m5"]).n_layers == 6


def test_errors_name_the_file_and_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cfg": {}, "edges": {}}))
    with pytest.raises(BayescircError, match=r"bad.json.*'nodes'"):
        read_circuit_json(bad)
    bad.write_text(json.dumps({"cfg": {}, "nodes": {}, "edges": {"x->y": {"score": 1, "in_graph": True}}}))
    with pytest.raises(BayescircError, match="'x->y'"):
        read_circuit_json(bad)
    with pytest.raises(BayescircError, match="not in the graph"):
        circuit_json({"a5.h0->logits"}, graph=Graph(1, 1))
    with pytest.raises(BayescircError, match="non-finite"):
        circuit_json((), {"input->m0": float("nan")}, graph=Graph(1, 1))
    bad.write_text(json.dumps({"cfg": {}, "nodes": {}, "edges": ["input->m0"]}))
    with pytest.raises(BayescircError, match=r"bad.json: 'edges' must map names to values .* got a list"):
        read_circuit_json(bad)
    with pytest.raises(BayescircError, match="is a directory"):
        read_circuit_json(tmp_path)
