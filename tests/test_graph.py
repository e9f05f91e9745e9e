"""The edge graph is EAP-IG's: same nodes, same edges, same names."""

import pytest

from bayescirc.graph import (
    Graph,
    edge_table,
    parse_edge,
    parse_node,
    prune_to_paths,
    receiver_hook,
    required_hooks,
    source_hook,
)


def test_gpt2_small_has_32491_edges():
    assert Graph(12, 12).n_edges == 32_491


def test_one_layer_one_head_graph_by_hand():
    assert set(Graph(1, 1).edges) == {
        "input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>",
        "input->m0", "a0.h0->m0",
        "input->logits", "a0.h0->logits", "m0->logits",
    }


def test_heads_of_a_layer_do_not_feed_each_other_but_feed_its_mlp():
    edges = set(Graph(2, 2).edges)
    assert "a0.h0->a0.h1<q>" not in edges
    assert "a0.h0->m0" in edges
    assert "m0->a1.h1<v>" in edges
    assert "m1->m0" not in edges


def test_parallel_blocks_drop_head_to_own_mlp_edges():
    sequential, parallel = Graph(2, 3), Graph(2, 3, parallel_attn_mlp=True)
    assert "a0.h0->m0" not in parallel.edges
    assert sequential.n_edges - parallel.n_edges == 2 * 3


def test_every_edge_parses_back_to_its_nodes():
    graph = Graph(3, 2)
    for edge in graph.edges:
        info = parse_edge(edge)
        assert info.edge == edge
        assert info.source in graph.nodes and info.receiver in graph.nodes
        assert edge == f"{info.source}->{info.receiver}" + (f"<{info.qkv}>" if info.qkv else "")


def test_parse_edge_fields():
    info = parse_edge("a0.h3->a2.h1<q>")
    assert (info.source_type, info.receiver_type, info.qkv) == ("attn", "attn", "q")
    assert (info.source_layer, info.receiver_layer, info.source_head, info.receiver_head) == (0, 2, 3, 1)
    assert info.edge_type == "attn->attn<q>"
    assert parse_edge("input->m0").source_layer == -1
    assert parse_edge("m1->logits").receiver_layer is None


@pytest.mark.parametrize("bad", [
    "a0.h3->a2.h1",        # head receiver without q/k/v
    "input->m0<q>",        # q/k/v on an MLP
    "logits->m0",          # logits as source
    "m0->input",           # input as receiver
    "m2->a1.h0<q>",        # upstream receiver
    "a1.h0->a1.h2<k>",     # same-layer heads
    "attn0->mlp1",         # unknown node
    "a0.h1 -> m1",         # spaces
    "a00.h3->m1",          # a second spelling of a0.h3
    "input->m01",
])
def test_malformed_edges_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_edge(bad)


def test_edge_table_keeps_unparsed_names_in_a_generic_group():
    table, unparsed = edge_table(["input->m0", "blocks.0.attn->blocks.1.mlp", "m0->logits"], n_layers=2)
    assert unparsed == ["blocks.0.attn->blocks.1.mlp"]
    assert table.loc[1, "edge_type"] == "other"
    assert table.loc[2, "receiver_layer"] == 2


def test_node_parsing():
    assert parse_node("a11.h7") == ("a11.h7", "attn", 11, 7)
    assert parse_node("m3").kind == "mlp"
    with pytest.raises(ValueError):
        parse_node("a1")


def test_hook_names_follow_transformerlens():
    assert source_hook("input") == ("hook_embed", None)
    assert source_hook("a2.h5") == ("blocks.2.attn.hook_result", 5)
    assert source_hook("m1") == ("blocks.1.hook_mlp_out", None)
    assert receiver_hook("a2.h5", "k", 4) == ("blocks.2.hook_k_input", 5)
    assert receiver_hook("m3", None, 4) == ("blocks.3.hook_mlp_in", None)
    assert receiver_hook("logits", None, 4) == ("blocks.3.hook_resid_post", None)
    hooks = required_hooks(Graph(2, 2))
    assert "blocks.1.hook_v_input" in hooks and "hook_embed" in hooks and "blocks.1.hook_resid_post" in hooks


def test_pruning_keeps_only_edges_on_input_to_logits_paths():
    edges = {
        "input->a0.h0<q>", "a0.h0->m1", "m1->logits",   # a full path
        "a0.h1->m1",                                    # source unreachable from input
        "input->m0",                                    # receiver never reaches logits
    }
    assert prune_to_paths(edges) == {"input->a0.h0<q>", "a0.h0->m1", "m1->logits"}
    assert prune_to_paths([]) == set()
