"""sufficient_statistics against a naive groupby, on the layouts real files come in.

The reference pivots the tidy table to one row per (input, edge), takes the
set of methods that scored it as the pattern, and sums counts, scores and
products per (edge, pattern) with pandas. The streamed statistics must agree
whatever the row order, the split into part files and row groups, the score
dtype, and whether the file is summarised in one pass or chunk by chunk.
"""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bayescirc import schema
from bayescirc.errors import ScoresError
from bayescirc.graph import Graph
from bayescirc.scores import EdgeNameWarning, exact_scores, sufficient_statistics

METHODS = ("exact", "eap", "eap-ig-inputs")


def tidy_scores(n_inputs=12, n_exact=4, graph=None, seed=0, drop_rows=0.0, drop_pairs=0.0, dtype="float64"):
    """Exact on the first ``n_exact`` inputs, approximations on all; optionally
    some (edge, method) pairs never scored and some single rows missing."""
    graph = graph or Graph(1, 2)
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        [(i, e, m) for i in range(n_inputs) for m in METHODS for e in graph.edges if not (m == "exact" and i >= n_exact)],
        columns=["input_id", "edge", "method"],
    )
    frame["score"] = rng.normal(size=len(frame)).astype(dtype) * 3
    if drop_pairs:
        pairs = frame[["edge", "method"]].drop_duplicates()
        gone = pairs.sample(frac=drop_pairs, random_state=seed)
        frame = frame.merge(gone.assign(_gone=True), how="left", on=["edge", "method"])
        frame = frame[frame.pop("_gone").isna()]
    if drop_rows:
        frame = frame.sample(frac=1 - drop_rows, random_state=seed + 1)
    return frame.reset_index(drop=True)


def reference(frame):
    """{(edge, set of method names): (n, {m: sum}, {(m, k): sum of products})} by pandas groupby."""
    frame = frame.assign(score=frame["score"].astype("float64"))
    wide = frame.pivot_table(index=["input_id", "edge"], columns="method", values="score", aggfunc="first", observed=True)
    methods = list(wide.columns)
    pattern = wide.notna().apply(lambda r: frozenset(m for m in methods if r[m]), axis=1)
    out = {}
    for (edge, pat), group in wide.groupby([wide.index.get_level_values("edge"), pattern]):
        sums = {m: group[m].sum() for m in pat}
        cross = {(m, k): (group[m] * group[k]).sum() for m in pat for k in pat}
        out[(edge, pat)] = (len(group), sums, cross)
    return out


def assert_matches_reference(stats, frame):
    ref = reference(frame)
    methods = sorted(frame["method"].unique(), key=lambda m: (not schema.is_exact(m), m))
    assert stats.methods == tuple(methods)
    assert sorted(stats.edges) == sorted(frame["edge"].unique())
    np.testing.assert_array_equal(stats.input_ids, np.sort(frame["input_id"].unique()))
    seen = set()
    for e, edge in enumerate(stats.edges):
        for p, row in enumerate(stats.patterns):
            pat = frozenset(m for m, on in zip(stats.methods, row) if on)
            if stats.n[e, p] == 0:
                assert (edge, pat) not in ref
                assert not stats.sums[e, p].any() and not stats.cross[e, p].any()
                continue
            n, sums, cross = ref[(edge, pat)]
            seen.add((edge, pat))
            assert stats.n[e, p] == n
            for i, m in enumerate(stats.methods):
                np.testing.assert_allclose(stats.sums[e, p, i], sums.get(m, 0.0), rtol=1e-12, atol=1e-12)
                for j, k in enumerate(stats.methods):
                    np.testing.assert_allclose(stats.cross[e, p, i, j], cross.get((m, k), 0.0), rtol=1e-12, atol=1e-12)
    assert seen == set(ref), "every (edge, pattern) of the reference is in the statistics"


def assert_same_stats(a, b):
    assert list(a.edges) == list(b.edges) and a.methods == b.methods
    np.testing.assert_array_equal(a.patterns, b.patterns)
    np.testing.assert_array_equal(a.n, b.n)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.cross, b.cross, rtol=1e-12, atol=1e-12)


def write_parts(frame, directory, n_parts, row_group_size, seed=0):
    """Shuffle rows, split them into ``n_parts`` files of small row groups."""
    directory.mkdir()
    shuffled = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    for k, part in enumerate(np.array_split(np.arange(len(shuffled)), n_parts)):
        table = pa.Table.from_pandas(shuffled.iloc[part], preserve_index=False)
        pq.write_table(table, directory / f"part-{k}.parquet", row_group_size=row_group_size)
    return directory


layouts = st.fixed_dictionaries({
    "n_inputs": st.integers(1, 10),
    "n_exact": st.integers(0, 10),
    "seed": st.integers(0, 10_000),
    "drop_rows": st.sampled_from([0.0, 0.2]),
    "drop_pairs": st.sampled_from([0.0, 0.3]),
    "dtype": st.sampled_from(["float32", "float64"]),
    "n_parts": st.integers(1, 3),
    "row_group_size": st.sampled_from([7, 50, 10_000]),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts)
def test_statistics_equal_the_groupby_reference_for_any_layout(tmp_path_factory, layout):
    frame = tidy_scores(layout["n_inputs"], min(layout["n_exact"], layout["n_inputs"]), seed=layout["seed"],
                        drop_rows=layout["drop_rows"], drop_pairs=layout["drop_pairs"], dtype=layout["dtype"])
    path = write_parts(frame, tmp_path_factory.mktemp("h") / "parts", layout["n_parts"], layout["row_group_size"], layout["seed"])
    in_memory = sufficient_statistics(path)
    assert_matches_reference(in_memory, frame)
    streamed = sufficient_statistics(path, memory_budget=1)  # one input per chunk
    assert_same_stats(in_memory, streamed)


def test_inputs_whose_pattern_varies_across_edges_are_split_by_pattern(tmp_path):
    # input 0: exact+eap on edge 0, eap only on edge 1; the other inputs: eap on every edge
    frame = tidy_scores(n_inputs=5, n_exact=1, graph=Graph(1, 1))
    edges = sorted(frame["edge"].unique())
    frame = frame[(frame.method != "eap-ig-inputs") & ~((frame.method == "exact") & (frame.edge == edges[1]))]
    frame.to_parquet(tmp_path / "s.parquet", index=False)
    stats = sufficient_statistics(tmp_path / "s.parquet")
    assert_matches_reference(stats, frame)
    e0, e1 = list(stats.edges).index(edges[0]), list(stats.edges).index(edges[1])
    np.testing.assert_array_equal(stats.patterns, [[True, True], [False, True]])
    np.testing.assert_array_equal(stats.n[[e0, e1]], [[1, 4], [0, 5]])


def test_edges_first_met_in_later_row_groups_are_counted(tmp_path):
    # sorted by edge: the first row group names one edge, the one-pass block must grow
    frame = tidy_scores(n_inputs=6, n_exact=2, graph=Graph(2, 2)).sort_values(["method", "edge", "input_id"])
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "s.parquet", row_group_size=5)
    stats = sufficient_statistics(tmp_path / "s.parquet")
    assert_matches_reference(stats, frame)
    assert_same_stats(stats, sufficient_statistics(tmp_path / "s.parquet", memory_budget=1))


def test_files_without_statistics_or_with_sparse_ids_are_summarised(tmp_path):
    frame = tidy_scores(n_inputs=5, n_exact=2)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "nostats.parquet", write_statistics=False)
    assert_matches_reference(sufficient_statistics(tmp_path / "nostats.parquet"), frame)
    # ids 0 and 10**12 span a range no dense block could cover: the chunked path takes over
    sparse = frame.assign(input_id=frame["input_id"].map({0: 0, 1: 10**12, 2: 7, 3: 3 * 10**11, 4: 8}))
    sparse.to_parquet(tmp_path / "sparse.parquet", index=False)
    stats = sufficient_statistics(tmp_path / "sparse.parquet", memory_budget=2**20)
    assert_matches_reference(stats, sparse)
    np.testing.assert_array_equal(stats.input_ids, [0, 7, 8, 3 * 10**11, 10**12])


def test_plain_string_columns_and_integer_scores_are_read(tmp_path):
    frame = tidy_scores(n_inputs=4, n_exact=2).assign(score=lambda f: (f["score"] * 10).round().astype("int64"))
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "plain.parquet", use_dictionary=False)
    stats = sufficient_statistics(tmp_path / "plain.parquet")
    assert_matches_reference(stats, frame.assign(score=frame["score"].astype("float64")))


def test_dictionary_entries_without_rows_are_not_edges_or_methods(tmp_path):
    frame = tidy_scores(n_inputs=3, n_exact=1)
    frame["edge"] = pd.Categorical(frame["edge"], categories=[*sorted(frame["edge"].unique()), "m7->logits"])
    frame.to_parquet(tmp_path / "s.parquet", index=False)
    stats = sufficient_statistics(tmp_path / "s.parquet")
    assert "m7->logits" not in list(stats.edges)
    assert_matches_reference(stats, frame.assign(edge=frame["edge"].astype(str)))


@pytest.mark.parametrize("budget", [2 * 2**30, 1])
def test_duplicates_are_reported_at_their_first_repeat_in_file_order(tmp_path, budget):
    frame = tidy_scores(n_inputs=4, n_exact=2)
    repeat = frame.iloc[[5]]
    frame = pd.concat([frame.iloc[:20], repeat, frame.iloc[20:], repeat], ignore_index=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "d.parquet", row_group_size=8)
    with pytest.raises(ScoresError, match=r"d.parquet: duplicate \(input_id, edge, method\) at row 20 "):
        sufficient_statistics(tmp_path / "d.parquet", memory_budget=budget)


@pytest.mark.parametrize("budget", [2 * 2**30, 1])
def test_a_duplicate_in_a_later_part_names_that_part_and_row(tmp_path, budget):
    frame = tidy_scores(n_inputs=3, n_exact=1)
    (tmp_path / "parts").mkdir()
    frame.to_parquet(tmp_path / "parts" / "a.parquet", index=False)
    frame.iloc[[4, 2]].to_parquet(tmp_path / "parts" / "b.parquet", index=False)
    with pytest.raises(ScoresError, match=r"b.parquet: duplicate .* at row 0 "):
        sufficient_statistics(tmp_path / "parts", memory_budget=budget)


@pytest.mark.parametrize("value, message", [(np.nan, "score' is nan at row 9"), (np.inf, "score' is inf at row 9")])
def test_bad_scores_name_the_row_in_either_path(tmp_path, value, message):
    frame = tidy_scores(n_inputs=3, n_exact=1)
    frame.loc[9, "score"] = value
    frame.to_parquet(tmp_path / "bad.parquet", index=False)
    for budget in (2 * 2**30, 1):
        with pytest.raises(ScoresError, match=message):
            sufficient_statistics(tmp_path / "bad.parquet", memory_budget=budget)


def test_empty_edge_names_are_refused_and_odd_names_warn(tmp_path):
    frame = tidy_scores(n_inputs=2, n_exact=1)
    frame.loc[3, "edge"] = ""
    frame.to_parquet(tmp_path / "empty.parquet", index=False)
    with pytest.raises(ScoresError, match="'edge' is an empty string at row 3"):
        sufficient_statistics(tmp_path / "empty.parquet")
    frame.loc[3, "edge"] = "embed->mlp0"
    frame.to_parquet(tmp_path / "odd.parquet", index=False)
    with pytest.warns(EdgeNameWarning, match="1 edge name"):
        stats = sufficient_statistics(tmp_path / "odd.parquet")
    assert stats.edges[-1] == "embed->mlp0"  # unparsed names come after the graph's edges


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_exact_scores_are_the_pivoted_exact_rows_in_the_statistics_edge_order(tmp_path, dtype):
    frame = tidy_scores(n_inputs=9, n_exact=5, graph=Graph(2, 2), drop_rows=0.2, dtype=dtype)
    frame = frame[~((frame.method == "exact") & (frame.input_id == 3))]  # an exact gap: input 3 has no exact score
    path = write_parts(frame, tmp_path / "parts", n_parts=3, row_group_size=11)
    stats = sufficient_statistics(path)
    values, mask, ids = exact_scores(path, stats.edges)
    exact = frame[frame.method == "exact"]
    np.testing.assert_array_equal(ids, np.sort(exact.input_id.unique()))
    wide = exact.pivot_table(index="edge", columns="input_id", values="score", aggfunc="first")
    wide = wide.reindex(index=list(stats.edges), columns=ids)
    np.testing.assert_array_equal(mask, wide.notna().to_numpy())
    np.testing.assert_array_equal(values, wide.fillna(0.0).to_numpy(np.float64))
    none = exact_scores(path, stats.edges, method="clean-corrupted")
    assert none[0].shape == (len(stats.edges), 0) and none[2].size == 0
