"""The collector's scores equal obviously-correct references on a tiny random GPT-2.

References are written independently of the engine: one full hooked forward
pass per edge and input (exact), one autograd gradient per receiver and
central finite differences of the very patch ``exact`` applies (eap),
completeness of integrated gradients (eap-ig-inputs), and the circuit
evaluation's own limits (full circuit = clean run, empty circuit = corrupted
run, all edges but one = exact patching of that edge).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformer_lens")

from tinymodel import make_tiny_llama, make_tiny_model, make_tiny_olmo2, tiny_task_rows  # noqa: E402

from bayescirc import schema  # noqa: E402
from bayescirc.bridge import load_model, model_graph, scoring_mode  # noqa: E402
from bayescirc.collection import collect, prepare_inputs  # noqa: E402
from bayescirc.errors import BayescircError, ModelError, TaskError  # noqa: E402
from bayescirc.export import collected_graph  # noqa: E402
from bayescirc.graph import parse_edge, receiver_hook, source_hook  # noqa: E402
from bayescirc.patching import Engine, evaluate_circuits  # noqa: E402
from bayescirc.scores import read_metadata, read_scores  # noqa: E402

pytestmark = pytest.mark.tl


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "gpt2-tiny")


@pytest.fixture(scope="module")
def model64(tiny_dir):
    torch.set_num_threads(1)
    return load_model(str(tiny_dir), device="cpu", dtype="float64")


@pytest.fixture
def task():
    return pd.DataFrame(tiny_task_rows())


# --- independent references ---------------------------------------------------------------------


def _inputs(model, row):
    tok = model.tokenizer
    clean = model.to_tokens(row["clean"])
    corrupted = model.to_tokens(row["corrupted"])
    answer = tok(row["answer"], add_special_tokens=False)["input_ids"][0]
    distractor = tok(row["distractor"], add_special_tokens=False)["input_ids"][0]
    return clean, corrupted, answer, distractor


def _source_out(cache, node):
    hook = source_hook(node)
    act = cache[hook.name][0]
    return act if hook.head is None else act[:, hook.head]


def _patched_metric(model, tokens, edge, delta, answer, distractor, scale=1.0):
    info = parse_edge(edge)
    hook = receiver_hook(info.receiver, info.qkv, model.cfg.n_layers)

    def add(x, hook, head=hook.head):
        x = x.clone()
        if head is None:
            x[0] += scale * delta
        else:
            x[0, :, head] += scale * delta
        return x

    logits = model.run_with_hooks(tokens, fwd_hooks=[(hook.name, add)])[0, -1]
    return (logits[answer] - logits[distractor]).item()


def naive_exact(model, row, edges):
    """One full hooked forward pass per edge."""
    clean, corrupted, a, d = _inputs(model, row)
    with torch.no_grad():
        logits, clean_cache = model.run_with_cache(clean)
        _, corr_cache = model.run_with_cache(corrupted)
        base = (logits[0, -1, a] - logits[0, -1, d]).item()
        out = []
        for edge in edges:
            src = parse_edge(edge).source
            delta = _source_out(corr_cache, src) - _source_out(clean_cache, src)
            out.append(_patched_metric(model, clean, edge, delta, a, d) - base)
    return np.array(out)


def naive_eap(model, row, edges):
    """One autograd gradient per edge's receiver, with a patch variable at that receiver only."""
    clean, corrupted, a, d = _inputs(model, row)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        _, corr_cache = model.run_with_cache(corrupted)
    out = []
    for edge in edges:
        info = parse_edge(edge)
        hook = receiver_hook(info.receiver, info.qkv, model.cfg.n_layers)
        z = torch.zeros(clean.shape[1], model.cfg.d_model, dtype=torch.float64, requires_grad=True)

        def add(x, hook, z=z, head=hook.head):
            x = x.clone()
            if head is None:
                x[0] = x[0] + z
            else:
                x[0, :, head] = x[0, :, head] + z
            return x

        logits = model.run_with_hooks(clean, fwd_hooks=[(hook.name, add)])[0, -1]
        (grad,) = torch.autograd.grad(logits[a] - logits[d], z)
        delta = _source_out(corr_cache, info.source) - _source_out(clean_cache, info.source)
        out.append((delta * grad).sum().item())
    return np.array(out)


def _wide(frame):
    return frame.pivot_table(index=[schema.INPUT_ID, schema.EDGE], columns=schema.METHOD, values=schema.SCORE,
                             observed=True)


# --- exact and eap against the references --------------------------------------------------------


def test_exact_equals_one_hooked_forward_per_edge(model64, task):
    rows = [0, 1, 5]  # both prompt lengths
    scores = collect(model64, task.iloc[rows].reset_index(drop=True), methods=["exact"], progress=False,
                     batch_size=2)
    with scoring_mode(model64) as graph:
        for i, r in enumerate(rows):
            got = scores[scores.input_id == i].set_index("edge").loc[list(graph.edges), "score"].to_numpy()
            ref = naive_exact(model64, task.iloc[r], graph.edges)
            assert np.allclose(got, ref, rtol=1e-5, atol=1e-9), np.abs(got - ref).max()
            assert np.abs(ref).max() > 1e-3  # the test has something to compare


def test_eap_equals_autograd_per_receiver(model64, task):
    scores = collect(model64, task.iloc[[0, 1]].reset_index(drop=True), methods=["eap"], progress=False)
    with scoring_mode(model64) as graph:
        for i in (0, 1):
            got = scores[scores.input_id == i].set_index("edge").loc[list(graph.edges), "score"].to_numpy()
            ref = naive_eap(model64, task.iloc[i], graph.edges)
            assert np.allclose(got, ref, rtol=1e-5, atol=1e-9), np.abs(got - ref).max()


@pytest.mark.parametrize("edge", ["input->a0.h1<q>", "a0.h2->a1.h0<k>", "m0->a1.h3<v>", "a1.h1->m1", "input->m0",
                                  "m1->logits", "a0.h0->logits"])
def test_eap_is_the_derivative_of_the_exact_patch(model64, task, edge):
    """Central finite differences of metric(clean + eps * delta at v's input) at every receiver kind."""
    scores = collect(model64, task.iloc[[0]], methods=["eap"], progress=False)
    got = scores.set_index("edge").loc[edge, "score"]
    row = task.iloc[0]
    with scoring_mode(model64):
        clean, corrupted, a, d = _inputs(model64, row)
        with torch.no_grad():
            _, cc = model64.run_with_cache(clean)
            _, kc = model64.run_with_cache(corrupted)
            src = parse_edge(edge).source
            delta = _source_out(kc, src) - _source_out(cc, src)
            eps = 1e-5
            fd = (_patched_metric(model64, clean, edge, delta, a, d, eps)
                  - _patched_metric(model64, clean, edge, delta, a, d, -eps)) / (2 * eps)
    assert got == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_linear_limit_exact_over_eap_tends_to_one(model64, task):
    """Corruption scaled toward clean by eps: exact/eap -> 1 per edge (checked via the engine itself)."""
    with scoring_mode(model64) as graph:
        engine = Engine(model64, graph)
        (batch,), _ = prepare_inputs(model64, task.iloc[[0]])
        run = engine.prepare(batch, resid=True, grads=True)
        eap = engine.gradient_scores("eap", batch, run)[0]
        for eps, tol in ((1e-2, 0.05), (1e-4, 5e-4)):
            run.corr_out = run.clean_out + eps * (run.corr_out - run.clean_out)
            exact = engine.exact_scores(batch, run)[0]
            big = eap.abs() > 1e-2 * eap.abs().max()
            ratio = exact[big] / (eps * eap[big])
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=tol), (eps, ratio)
            run.corr_out = run.clean_out + (run.corr_out - run.clean_out) / eps
        assert engine._direct  # blocks ran one by one from the cached residual (the fast path), not full passes


def test_ig_variants_relate_as_eap_ig_defines_them(model64, task):
    """eap-ig-inputs with one step is the gradient at the corrupted end; clean-corrupted averages both ends."""
    sub = task.iloc[[0, 1]].reset_index(drop=True)
    wide = _wide(collect(model64, sub, methods=["eap", "clean-corrupted", "eap-ig-inputs"], ig_steps=1,
                         progress=False))
    label = schema.method_label("eap-ig-inputs", steps=1)
    lhs = wide[label].to_numpy()
    rhs = 2 * wide["clean-corrupted"].to_numpy() - wide["eap"].to_numpy()
    assert np.allclose(lhs, rhs, rtol=1e-6, atol=1e-9)
    assert not np.allclose(lhs, wide["eap"].to_numpy(), atol=1e-3)


def test_eap_ig_inputs_is_complete_on_the_input_node(model64, task):
    """With many steps, the input node's edges sum to metric(corrupted) - metric(clean) (IG completeness)."""
    scores = collect(model64, task.iloc[[0, 1]].reset_index(drop=True), methods=["eap-ig-inputs"], ig_steps=200,
                     progress=False)
    from_input = scores[scores.edge.astype(str).str.startswith("input->")]
    total = from_input.groupby("input_id").score.sum()
    per_input = scores.groupby("input_id")[[schema.CLEAN_METRIC, schema.CORRUPTED_METRIC]].first()
    expected = per_input[schema.CORRUPTED_METRIC] - per_input[schema.CLEAN_METRIC]
    assert np.allclose(total.to_numpy(), expected.to_numpy(), rtol=0.02, atol=1e-3), (total, expected)


def test_eap_ig_activations_with_one_step_on_a_one_layer_path(model64, task):
    """steps=1 interpolates at the clean end: every group's run is the clean run with that group's gradient
    path cut, so edges into logits from the last MLP see the clean gradient in every run but none."""
    scores = collect(model64, task.iloc[[0]], methods=["eap", "eap-ig-activations"], ig_steps=1, progress=False)
    wide = _wide(scores)
    label = schema.method_label("eap-ig-activations", steps=1)
    # logits' gradient is the same in every run (nothing downstream of resid_post is overridden)
    for edge in ["m1->logits", "a1.h2->logits", "input->logits"]:
        assert wide.loc[(0, edge), label] == pytest.approx(wide.loc[(0, edge), "eap"], rel=1e-6)
    # m1's input gradient is cut in the run that overrides m1 (1 of 5 groups): 4/5 of eap
    assert wide.loc[(0, "a1.h2->m1"), label] == pytest.approx(0.8 * wide.loc[(0, "a1.h2->m1"), "eap"], rel=1e-6)


# --- batching, padding, sharding ----------------------------------------------------------------------


def test_scores_do_not_depend_on_batching_or_other_inputs(model64, task):
    methods = ["exact", "eap", "eap-ig-inputs"]
    full = _wide(collect(model64, task, methods=methods, progress=False))
    small = _wide(collect(model64, task, methods=methods, batch_size=1, progress=False))
    assert np.allclose(full.to_numpy(), small.loc[full.index].to_numpy(), rtol=1e-9, atol=1e-12)
    alone = _wide(collect(model64, task.iloc[[3]], methods=methods, progress=False))  # one row of the shorter length
    assert np.allclose(alone.loc[0].to_numpy(), full.loc[3].loc[alone.loc[0].index].to_numpy(), rtol=1e-9, atol=1e-12)


def test_inputs_of_different_lengths_are_never_padded(model64, task):
    batches, _ = prepare_inputs(model64, task)
    lengths = sorted({b.clean.shape[1] for b in batches})
    assert len(lengths) == 2 and sum(len(b) for b in batches) == len(task)
    assert all((b.clean != model64.tokenizer.pad_token_id).all() for b in batches)


def test_exact_inputs_limits_exact_scores_to_the_first_k(model64, task, tmp_path):
    scores = collect(model64, task, methods=["exact", "eap"], exact_inputs=3, out=tmp_path / "s.parquet",
                     progress=False)
    assert sorted(scores[scores.method == "exact"].input_id.unique()) == [0, 1, 2]
    assert sorted(scores[scores.method == "eap"].input_id.unique()) == list(range(len(task)))


def test_shards_and_resume_give_the_single_run_table(model64, task, tmp_path):
    methods = ["exact", "eap"]
    single = collect(model64, task, methods=methods, out=tmp_path / "one.parquet", progress=False)
    parts = tmp_path / "parts"
    for k in (1, 2, 3):
        collect(model64, task, methods=methods, out=parts, shard=f"{k}/3", progress=False)
    assert sorted(p.name for p in parts.iterdir()) == [f"part-{k}-of-3.parquet" for k in (1, 2, 3)]
    first = parts / "part-1-of-3.parquet"
    stamp = first.stat().st_mtime_ns
    again = collect(model64, task, methods=methods, out=parts, shard="1/3", progress=False)  # resume: skipped
    assert first.stat().st_mtime_ns == stamp and len(again) == len(task) // 3 * 110 * 2
    merged = read_scores(parts)
    key = [schema.INPUT_ID, schema.EDGE, schema.METHOD]
    a = single.astype({schema.EDGE: str, schema.METHOD: str}).sort_values(key, ignore_index=True)
    b = merged.astype({schema.EDGE: str, schema.METHOD: str}).sort_values(key, ignore_index=True)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(BayescircError, match="exists with other settings"):
        collect(model64, task, methods=["eap"], out=parts, shard="1/3", progress=False)


def test_file_metadata_records_the_run(model64, task, tmp_path):
    out = tmp_path / "s.parquet"
    collect(model64, task.iloc[:2], methods="exact,eap-ig-inputs", ig_steps=7, metric="prob-diff", seed=3, out=out,
            exact_inputs=10, progress=False)
    meta = read_metadata(out)
    assert meta["metric"] == "prob-diff" and meta["seed"] == 3 and meta["n_inputs"] == 2
    assert meta["extra"]["collect"]["exact_inputs"] == 2  # of 10 asked for, the 2 there are
    assert meta["methods"] == {"exact": {}, "eap-ig-inputs:steps=7": {"steps": 7}}
    assert meta["sign_convention"] == schema.SIGN_CONVENTION and "package_version" in meta
    graph = model_graph(model64)  # enough to rebuild the graph for EAP-IG/MIB export
    assert collected_graph(meta) == graph and meta["extra"]["collect"]["parallel_attn_mlp"] is False
    table = read_scores(out)
    assert set(table.method.astype(str)) == {"exact", "eap-ig-inputs:steps=7"}
    assert {schema.CLEAN_METRIC, schema.CORRUPTED_METRIC} <= set(table.columns)
    json.dumps(meta)


@pytest.mark.parametrize("metric", ["prob-diff", "kl"])
def test_other_metrics_exact_against_a_naive_forward(model64, task, metric):
    row = task.iloc[0]
    scores = collect(model64, task.iloc[[0]], methods=["exact"], metric=metric, progress=False).set_index("edge")
    with scoring_mode(model64):
        clean, corrupted, a, d = _inputs(model64, row)
        with torch.no_grad():
            logits, cc = model64.run_with_cache(clean)
            _, kc = model64.run_with_cache(corrupted)
            clean_lp = logits[0, -1].log_softmax(-1)

            def value(last):
                if metric == "prob-diff":
                    p = last.softmax(-1)
                    return (p[a] - p[d]).item()
                return torch.nn.functional.kl_div(last.log_softmax(-1), clean_lp, log_target=True, reduction="sum").item()

            for edge in ["input->a0.h0<v>", "a0.h1->m0", "m0->a1.h2<q>", "m1->logits"]:
                src = parse_edge(edge).source
                info = parse_edge(edge)
                hook = receiver_hook(info.receiver, info.qkv, model64.cfg.n_layers)
                delta = _source_out(kc, src) - _source_out(cc, src)

                def add(x, hook, head=hook.head, delta=delta):
                    x = x.clone()
                    if head is None:
                        x[0] += delta
                    else:
                        x[0, :, head] += delta
                    return x

                last = model64.run_with_hooks(clean, fwd_hooks=[(hook.name, add)])[0, -1]
                assert scores.loc[edge, "score"] == pytest.approx(value(last) - value(logits[0, -1]), rel=1e-6, abs=1e-12)
    if metric == "kl":
        assert scores[schema.CLEAN_METRIC].abs().max() < 1e-12 and (scores[schema.CORRUPTED_METRIC] > 0).all()


# --- circuits ---------------------------------------------------------------------------------------------


def test_evaluate_circuits_limits_and_single_edge_ablation(model64, task):
    sub = task.iloc[[0, 1, 2]].reset_index(drop=True)
    with scoring_mode(model64) as graph:
        edges = list(graph.edges)
    drop = ["a0.h2->a1.h0<k>", "m0->logits", "input->m1"]
    circuits = [set(edges), set()] + [set(edges) - {e} for e in drop]
    result = evaluate_circuits(model64, sub, circuits, batch_size=4, progress=False)
    assert result.values.shape == (len(circuits), 3)
    assert np.allclose(result.values[0], result.clean, rtol=1e-9)
    assert np.allclose(result.values[1], result.corrupted, rtol=1e-9)
    exact = _wide(collect(model64, sub, methods=["exact"], progress=False))["exact"]
    for c, edge in enumerate(drop, start=2):
        got = result.values[c] - result.clean
        ref = np.array([exact.loc[(i, edge)] for i in range(3)])
        assert np.allclose(got, ref, rtol=1e-6, atol=1e-10)
    with pytest.raises(BayescircError, match="not an edge of this model.s graph"):
        evaluate_circuits(model64, sub, [{"a9.h0->logits"}], progress=False)


def test_evaluate_circuits_matches_a_naive_circuit_run(model64, task):
    """A small circuit against a hand-written run: every absent edge adds corr - current at its receiver."""
    circuit = {"input->a0.h1<v>", "a0.h1->m0", "m0->logits", "input->logits", "a0.h1->a1.h2<q>", "a1.h2->logits"}
    result = evaluate_circuits(model64, task.iloc[[0]], [circuit], progress=False)
    with scoring_mode(model64) as graph:
        clean, corrupted, a, d = _inputs(model64, task.iloc[0])
        with torch.no_grad():
            _, kc = model64.run_with_cache(corrupted)
            current = {}

            def record(node):
                def hook(x, hook):
                    current[node] = x
                return hook

            def receive(receiver, qkv):
                def hook(x, hook):
                    x = x.clone()
                    for edge in graph.edges:
                        info = parse_edge(edge)
                        if info.receiver != receiver or info.qkv != qkv or edge in circuit:
                            continue
                        h = source_hook(info.source)
                        cur = current[h.name][0] if h.head is None else current[h.name][0, :, h.head]
                        d_ = _source_out(kc, info.source) - cur
                        rh = receiver_hook(receiver, qkv, graph.n_layers)
                        if rh.head is None:
                            x[0] += d_
                        else:
                            x[0, :, rh.head] += d_
                    return x
                return hook

            hooks = [(n, record(n)) for n in {source_hook(s).name for s in graph.nodes if s != "logits"}]
            receivers = {(parse_edge(e).receiver, parse_edge(e).qkv) for e in graph.edges}
            hooks += [(receiver_hook(r, q, graph.n_layers).name, receive(r, q)) for r, q in receivers]
            logits = model64.run_with_hooks(clean, fwd_hooks=hooks)[0, -1]
    assert result.values[0, 0] == pytest.approx((logits[a] - logits[d]).item(), rel=1e-9)


# --- tasks and models --------------------------------------------------------------------------------------


def test_eapig_csv_layout_scores_like_named_answers(model64, task, tmp_path):
    tok = model64.tokenizer
    csv = pd.DataFrame({
        "clean": task.clean, "corrupted": task.corrupted,
        "correct_idx": [tok(a, add_special_tokens=False)["input_ids"][0] for a in task.answer],
        "incorrect_idx": [tok(d, add_special_tokens=False)["input_ids"][0] for d in task.distractor],
    })
    path = tmp_path / "task.csv"
    csv.to_csv(path, index=False)
    a = collect(model64, path, methods=["eap"], n_inputs=4, progress=False)
    b = collect(model64, task, methods=["eap"], n_inputs=4, progress=False)
    assert np.allclose(a.score.to_numpy(), b.score.to_numpy())


@pytest.mark.parametrize("change, message", [
    ({"corrupted": "Mary and John ran home , Mary said hello"}, r"row 1: clean and corrupted .*11 vs 10.*\['<\|endoftext\|>', 'Mary'"),
    ({"answer": "Mary John"}, r"row 1: answer 'Mary John' is 2 tokens \['Mary', 'John'\]"),
    ({"distractor": "Mary John"}, r"row 1: distractor"),
    ({"answer": "Zebra"}, r"row 1: answer 'Zebra' is not in the model's vocabulary: .* unknown token '<unk>'"),
])
def test_bad_rows_are_named_and_nothing_is_written(model64, task, tmp_path, change, message):
    bad = task.copy()
    for col, value in change.items():
        bad.loc[1, col] = value
    out = tmp_path / "s.parquet"
    with pytest.raises(TaskError, match=message):
        collect(model64, bad, methods=["eap"], out=out, progress=False)
    assert not out.exists() and not any(tmp_path.iterdir())


def test_bad_task_files(model64, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TaskError, match="no rows"):
        collect(model64, empty, progress=False)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"clean": "a", "corrupted": "b", "answer": "Mary"}) + "\n")
    with pytest.raises(TaskError, match="missing column"):
        collect(model64, missing, progress=False)


def test_a_path_and_a_loaded_bridge_give_the_same_scores(tiny_dir, task):
    sub = task.iloc[[0, 1]].reset_index(drop=True)
    from_path = collect(str(tiny_dir), sub, methods=["exact", "eap"], device="cpu", progress=False)
    model = load_model(str(tiny_dir), device="cpu")
    flags = (model.cfg.use_attn_result, model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in)
    loaded = collect(model, sub, methods=["exact", "eap"], progress=False)
    assert np.allclose(from_path.score, loaded.score, rtol=1e-3, atol=1e-5)
    assert (model.cfg.use_attn_result, model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in) == flags


def test_a_loaded_hooked_transformer_scores_like_the_bridge(tiny_dir, model64, task):
    tl = pytest.importorskip("transformer_lens")
    try:
        tl.HookedTransformer  # noqa: B018
    except (ImportError, AttributeError):
        pytest.skip("HookedTransformer exists on TransformerLens 3.x only")
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_dir, dtype=torch.float64)
    c = hf.config
    cfg = tl.HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
                                     d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
                                     normalization_type="LN", dtype=torch.float64, device="cpu")
    ht = tl.HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(tiny_dir))
    ht.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    sub = task.iloc[[0, 1]].reset_index(drop=True)
    a = collect(ht, sub, methods=["exact", "eap"], progress=False)
    with scoring_mode(ht) as graph:
        engine = Engine(ht, graph)
        (batch,), _ = prepare_inputs(ht, sub.iloc[[0]])
        engine.exact_scores(batch, engine.prepare(batch, resid=True))
        assert engine._direct
    b = collect(model64, sub, methods=["exact", "eap"], progress=False)
    assert np.abs(a.score - b.score).max() < 1e-4 * np.abs(b.score).max(), np.abs(a.score - b.score).max()


class _WithoutSplitQKV:
    """A model whose per-head q/k/v input hooks are missing (like an architecture without them)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def hook_dict(self):
        return {k: v for k, v in self._model.hook_dict.items() if not k.endswith(("hook_q_input", "hook_k_input"))}


def test_a_model_lacking_per_head_hooks_gets_a_model_error(model64, task):
    with pytest.raises(ModelError, match=r"lacks .*hook_k_input"):
        collect(_WithoutSplitQKV(model64), task, progress=False)


def _has_hooked_transformer() -> bool:
    import transformer_lens as tl

    try:
        tl.HookedTransformer  # noqa: B018
    except (ImportError, AttributeError):
        return False
    return True


def _hooked(tiny_dir, **over):
    """A random float64 HookedTransformer (TransformerLens 3.x) with the tiny model's tokenizer."""
    import transformer_lens as tl

    if not _has_hooked_transformer():
        pytest.skip("HookedTransformer exists on TransformerLens 3.x only")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=len(tokenizer), n_ctx=64,
               act_fn="gelu_new", normalization_type="LN", dtype=torch.float64, device="cpu", seed=0)
    cfg.update(over)
    return tl.HookedTransformer(tl.HookedTransformerConfig(**cfg), tokenizer=tokenizer).eval()


def test_grouped_query_attention_is_scored_per_query_head(tiny_dir, task):
    """A GQA HookedTransformer (2 key/value heads for 4 query heads) is ungrouped while scoring: every query
    head has its own <k> and <v> edges, exact equals one hooked forward per edge, and the flag is restored."""
    model = _hooked(tiny_dir, n_key_value_heads=2)
    sub = task.iloc[[0, 1]].reset_index(drop=True)
    scores = collect(model, sub, methods=["exact", "eap"], progress=False)
    assert model.cfg.ungroup_grouped_query_attention is False
    wide = _wide(scores)
    with scoring_mode(model) as graph:
        assert model.cfg.ungroup_grouped_query_attention is True
        exact = wide["exact"].loc[0].loc[list(graph.edges)].to_numpy()
        ref = naive_exact(model, sub.iloc[0], graph.edges)
        assert np.allclose(exact, ref, rtol=1e-6, atol=1e-10) and np.abs(ref).max() > 1e-4
        eap = wide["eap"].loc[0].loc[list(graph.edges)].to_numpy()
        assert np.allclose(eap, naive_eap(model, sub.iloc[0], graph.edges), rtol=1e-5, atol=1e-9)
    assert model.cfg.ungroup_grouped_query_attention is False
    # query heads 0 and 1 share key/value head 0, yet their key edges are separate edges with their own scores
    assert wide.loc[(0, "a0.h1->a1.h0<k>"), "exact"] != pytest.approx(wide.loc[(0, "a0.h1->a1.h1<k>"), "exact"])
    clean, _, a, d = _inputs(model, sub.iloc[0])
    with torch.no_grad():
        logits = model(clean)[0, -1]  # grouped again: the clean metric is the model's own
    assert scores[scores.input_id == 0][schema.CLEAN_METRIC].iloc[0] == pytest.approx((logits[a] - logits[d]).item())


def test_grouped_query_attention_without_ungrouping_is_a_model_error(tmp_path, task):
    """A GQA model that cannot ungroup its keys and values (a TransformerBridge) is refused by name."""
    path = make_tiny_llama(tmp_path / "llama-gqa", n_heads=4, n_key_value_heads=2)
    model = load_model(str(path), device="cpu", progress=False)
    flags = (model.cfg.use_attn_result, model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in)
    message = r"llama-gqa: grouped-query attention models are not supported \(n_key_value_heads=2, n_heads=4\)"
    with pytest.raises(ModelError, match=message):
        collect(model, task, methods=["exact", "eap"], progress=False)
    assert (model.cfg.use_attn_result, model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in) == flags
    with pytest.raises(ModelError, match=message):
        collect(str(path), task, methods=["eap"], device="cpu", out=tmp_path / "s.parquet", progress=False)
    assert not (tmp_path / "s.parquet").exists()


def test_a_model_that_normalises_sublayer_outputs_is_a_model_error(tmp_path, task):
    """OLMo-2 normalises each attention and MLP output before adding it to the residual stream, so the heads'
    outputs (attn.hook_result) are not what they write: scoring them per edge would patch the wrong quantity."""
    path = make_tiny_olmo2(tmp_path / "olmo2-tiny")
    out = tmp_path / "s.parquet"
    with pytest.raises(ModelError, match=r"block 0's residual write is not the sum of its heads' outputs"):
        collect(str(path), task, methods=["exact", "eap"], device="cpu", out=out, progress=False)
    assert not out.exists()


def test_the_additivity_probe_accepts_the_sequential_gpt2(model64, task):
    """Each GPT-2 block writes exactly the sum of its heads' outputs, its MLP output and b_O."""
    with scoring_mode(model64) as graph:
        engine = Engine(model64, graph)
        engine.check_additive(model64.to_tokens(task.clean[0]))
    assert engine._additive


def test_edges_into_logits_use_full_forward_passes_when_the_unembedding_alone_misses_the_logits(model64, task,
                                                                                                 monkeypatch):
    """Where ln_final + unembed of the last residual does not give the model's logits (Gemma-2's soft-capped
    logits, a logit scale), the engine notices and scores edges into ``logits`` with full forward passes: here the
    shortcut is broken on purpose, and the scores still equal one hooked forward per edge."""
    import bayescirc.patching as patching

    sub = task.iloc[[0]].reset_index(drop=True)
    with scoring_mode(model64) as graph:
        edges = [e for e in graph.edges if e.endswith("->logits")]
        ref = naive_exact(model64, sub.iloc[0], edges)

    class Scaled(Engine):  # a shortcut that misses a final logit scale
        def _unembed_last(self, resid_last):
            return 2.0 * super()._unembed_last(resid_last)

    monkeypatch.setattr(patching, "Engine", Scaled)
    scores = collect(model64, sub, methods=["exact"], progress=False)
    exact = scores.set_index(schema.EDGE)[schema.SCORE].loc[edges].to_numpy()
    assert np.allclose(exact, ref, rtol=1e-6, atol=1e-10) and np.abs(ref).max() > 1e-4


class _AttentionOnly(_WithoutSplitQKV):
    """A model whose config says attention-only (no MLPs)."""

    @property
    def cfg(self):
        import copy

        cfg = copy.copy(self._model.cfg)
        cfg.attn_only = True
        return cfg

    @property
    def hook_dict(self):
        return self._model.hook_dict


def test_attention_only_models_are_a_model_error(tiny_dir, model64, task):
    with pytest.raises(ModelError, match="attention-only models are not supported: the EAP-IG graph has MLP nodes"):
        collect(_AttentionOnly(model64), task, progress=False)
    if not _has_hooked_transformer():
        return
    model = _hooked(tiny_dir, attn_only=True)  # TransformerLens 3.x: a real attention-only model
    with pytest.raises(ModelError, match="attention-only models are not supported: the EAP-IG graph has MLP nodes"):
        collect(model, task, progress=False)
    assert (model.cfg.use_attn_result, model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in) == (False,) * 3


@pytest.mark.parametrize("options, message", [
    ({"device": "bogus"}, r"unknown device 'bogus'"),
    ({"device": "cuda:99"}, r"device 'cuda:99' requested but torch sees"),
    pytest.param({"device": "cuda"}, r"device 'cuda' requested but torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")),
    ({"dtype": "float8"}, r"unknown dtype 'float8'"),
    ({"dtype": torch.int64}, r"dtype torch.int64 is not a floating-point dtype"),
])
def test_bad_device_or_dtype_is_refused_before_the_model_loads(tiny_dir, task, tmp_path, monkeypatch, options,
                                                               message):
    import bayescirc.bridge as bridge

    def fail(*args, **kwargs):
        pytest.fail("the model was loaded before the options were checked")

    monkeypatch.setattr(bridge, "load_model", fail)
    for shard in (None, "1/2"):  # also before a resume check
        with pytest.raises(ModelError, match=message):
            collect(str(tiny_dir), task, methods=["eap"], out=tmp_path / "out", shard=shard, progress=False, **options)
    assert not any(tmp_path.iterdir())


def test_options_a_loaded_model_would_ignore_are_refused(model64, task):
    with pytest.raises(ModelError, match=r"dtype 'float32' given, but the model is already loaded in float64"):
        collect(model64, task, methods=["eap"], dtype="float32", progress=False)
    with pytest.raises(ModelError, match=r"unknown device 'gpu0'"):
        collect(model64, task, methods=["eap"], device="gpu0", progress=False)
    if torch.cuda.is_available():
        with pytest.raises(ModelError, match=r"device 'cuda' given, but the model is already loaded on cpu"):
            collect(model64, task, methods=["eap"], device="cuda", progress=False)
    with pytest.raises(ModelError, match=r"dtype 'bf16' given, but the model is already loaded in float64"):
        evaluate_circuits(model64, task, [set()], dtype="bf16", progress=False)
    scores = collect(model64, task.iloc[[0]], methods=["eap"], device="cpu", dtype="float64", progress=False)
    assert scores.score.dtype == np.float64  # what the model is: accepted


def test_resuming_with_another_dtype_is_other_settings(tiny_dir, task, tmp_path):
    parts = tmp_path / "parts"
    run = dict(methods=["eap"], out=parts, shard="1/2", n_inputs=4, device="cpu", progress=False)
    first = collect(str(tiny_dir), task, **run)
    part = parts / "part-1-of-2.parquet"
    assert read_metadata(part)["extra"]["collect"]["dtype"] == "float32"
    stamp = part.stat().st_mtime_ns
    again = collect(str(tiny_dir), task, dtype="fp32", **run)  # the same resolved dtype: complete, skipped
    assert part.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again, first)
    with pytest.raises(BayescircError, match=r"part-1-of-2.parquet exists with other settings"):
        collect(str(tiny_dir), task, dtype="float64", **run)
    assert part.stat().st_mtime_ns == stamp


def test_bfloat16_models_score_like_float32(tiny_dir, task):
    """Half precision runs (scores and metrics are kept in float32) and agrees with float32 to bf16 accuracy."""
    sub = task.iloc[[0, 1]].reset_index(drop=True)
    half = collect(str(tiny_dir), sub, methods=["exact", "eap"], device="cpu", dtype="bfloat16", progress=False)
    full = collect(str(tiny_dir), sub, methods=["exact", "eap"], device="cpu", progress=False)
    assert half.score.dtype == np.float32
    for method in ("exact", "eap"):
        x = half[half.method == method].score.to_numpy()
        y = full[full.method == method].score.to_numpy()
        assert np.corrcoef(x, y)[0, 1] > 0.97


def test_out_of_memory_halves_the_batch_and_keeps_the_scores(model64, task, monkeypatch):
    reference = collect(model64, task, methods=["exact", "eap"], batch_size=2, progress=False)
    original = Engine.prepare
    seen = []

    def prepare(self, batch, **kwargs):
        seen.append(len(batch))
        if len(batch) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, batch, **kwargs)

    monkeypatch.setattr(Engine, "prepare", prepare)
    got = collect(model64, task, methods=["exact", "eap"], batch_size=8, progress=False)
    assert seen[:3] == [6, 4, 2]  # 6 inputs of the first length: 8 -> 6 fails, 4 fails, then 2 at a time
    pd.testing.assert_frame_equal(got, reference)
    monkeypatch.setattr(Engine, "prepare", lambda self, batch, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):  # other errors are not swallowed
        collect(model64, task, methods=["eap"], progress=False)


def _hf_last_block_patched(hf, tokens, delta, kind, head=None):
    """Logits at the last position of a 2-layer HF GPT-2 whose block 1 gets ``delta`` on one input.

    Written from the Hugging Face modules alone (no TransformerLens): ``kind`` is
    ``q``, ``k`` or ``v`` (only head ``head`` reads ``x + delta``) or ``mlp``
    (only the MLP reads ``resid_mid + delta``); ``None`` is the clean run.
    """
    h = hf.transformer.drop(hf.transformer.wte(tokens) + hf.transformer.wpe(torch.arange(tokens.shape[1])))
    h = hf.transformer.h[0](h)
    h = h[0] if isinstance(h, tuple) else h
    block = hf.transformer.h[1]
    D = hf.config.n_embd
    H = hf.config.n_head
    dh = D // H
    W, b = block.attn.c_attn.weight, block.attn.c_attn.bias

    def proj(x, i):  # [pos, D] -> [H, pos, dh]
        return (block.ln_1(x) @ W[:, i * D:(i + 1) * D] + b[i * D:(i + 1) * D]).view(-1, H, dh).transpose(0, 1)

    x = h[0]
    q, k, v = proj(x, 0), proj(x, 1), proj(x, 2)
    if kind in ("q", "k", "v"):
        patched = proj(x + delta, "qkv".index(kind))
        {"q": q, "k": k, "v": v}[kind][head] = patched[head]
    pos = x.shape[0]
    scores = q @ k.transpose(-1, -2) / dh**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(pos, pos, dtype=torch.bool), 1), float("-inf"))
    z = (scores.softmax(-1) @ v).transpose(0, 1).reshape(pos, D)
    mid = x + block.attn.c_proj(z)
    post = mid + block.mlp(block.ln_2(mid + (delta if kind == "mlp" else 0)))
    return hf.lm_head(hf.transformer.ln_f(post))[-1]


@pytest.mark.parametrize("edge", ["m0->a1.h1<q>", "m0->a1.h0<k>", "input->a1.h3<v>", "m0->a1.h2<v>", "m0->m1"])
def test_exact_patch_semantics_against_plain_hugging_face(tiny_dir, model64, task, edge):
    """The patch each receiver hook applies, rebuilt from the Hugging Face modules without TransformerLens."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    row = task.iloc[0]
    clean, corrupted, a, d = _inputs(model64, row)
    info = parse_edge(edge)
    with torch.no_grad():
        if info.source == "input":
            delta = (hf.transformer.wte(corrupted) - hf.transformer.wte(clean))[0]
        else:  # m0: the first block's MLP output, from Hugging Face's block output minus its residual input

            def mlp0(tokens):
                x = hf.transformer.wte(tokens) + hf.transformer.wpe(torch.arange(tokens.shape[1]))
                blk = hf.transformer.h[0]
                mid = x + blk.attn(blk.ln_1(x))[0]
                return blk.mlp(blk.ln_2(mid))[0]

            delta = mlp0(corrupted) - mlp0(clean)
        kind = info.qkv or "mlp"
        base = _hf_last_block_patched(hf, clean, None, None)
        patched = _hf_last_block_patched(hf, clean, delta, kind, info.receiver_head)
    expected = (patched[a] - patched[d] - base[a] + base[d]).item()
    got = collect(model64, task.iloc[[0]], methods=["exact"], progress=False).set_index("edge").loc[edge, "score"]
    assert abs(expected) > 1e-4
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-10)


def test_no_progress_silences_the_hugging_face_loader_and_restores_its_setting(tiny_dir, capfd):
    from transformers.utils import logging as hf_logging

    capfd.readouterr()
    load_model(str(tiny_dir), device="cpu", progress=False)
    quiet = capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
    assert "Loading weights" not in quiet
    load_model(str(tiny_dir), device="cpu")
    if "Loading weights" not in capfd.readouterr().err:
        pytest.skip("this transformers version shows no bar while loading weights")
