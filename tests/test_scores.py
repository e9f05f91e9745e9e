"""scores.parquet: the contract between collect and fit (schema v1)."""

import json
import warnings

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
from bayescirc.scores import (
    EdgeNameWarning,
    MethodLabelWarning,
    ScoresWriter,
    read_metadata,
    read_scores,
    sufficient_statistics,
    validate_scores,
    write_scores,
)


def small_scores(n_inputs=4, n_exact=2, methods=("exact", "eap"), graph=None, seed=0):
    graph = graph or Graph(1, 2)
    rng = np.random.default_rng(seed)
    rows = [
        (i, e, m, rng.normal())
        for i in range(n_inputs)
        for e in graph.edges
        for m in methods
        if not (m == "exact" and i >= n_exact)
    ]
    return pd.DataFrame(rows, columns=["input_id", "edge", "method", "score"])


# --- round trip and the minimal contract ---------------------------------------------------


def test_round_trip_keeps_rows_and_metadata(tmp_path):
    table = small_scores()
    path = write_scores(table, tmp_path / "s.parquet", metadata={"model": "m", "methods": {"exact": {}, "eap": {}}})
    back = read_scores(path)
    pd.testing.assert_frame_equal(
        back.astype({"edge": str, "method": str}).sort_values(["input_id", "edge", "method"]).reset_index(drop=True),
        table.sort_values(["input_id", "edge", "method"]).reset_index(drop=True),
    )
    meta = read_metadata(path)
    assert meta["schema_version"] == schema.SCHEMA_VERSION
    assert meta["model"] == "m"
    assert meta["sign_convention"] == schema.SIGN_CONVENTION


def test_a_four_column_file_from_plain_pandas_loads(tmp_path):
    small_scores().to_parquet(tmp_path / "plain.parquet", index=False)
    frame = read_scores(tmp_path / "plain.parquet")
    assert len(frame) == len(small_scores())
    assert read_metadata(tmp_path / "plain.parquet") == {}


def test_a_directory_of_parts_reads_as_one_table(tmp_path):
    table = small_scores(n_inputs=6, n_exact=6)
    (tmp_path / "parts").mkdir()
    for k, part in enumerate(np.array_split(np.arange(6), 3)):
        write_scores(table[table.input_id.isin(part)], tmp_path / "parts" / f"part-{k}.parquet")
    assert len(read_scores(tmp_path / "parts")) == len(table)
    stats = sufficient_statistics(tmp_path / "parts")
    assert stats.n.sum() == 6 * len(Graph(1, 2).edges)


def test_integer_scores_are_accepted(tmp_path):
    table = small_scores().assign(score=lambda d: (d.score * 10).round().astype("int64"))
    table.to_parquet(tmp_path / "ints.parquet", index=False)
    assert read_scores(tmp_path / "ints.parquet").score.dtype.kind == "f"


def test_writer_leaves_no_file_when_interrupted(tmp_path):
    path = tmp_path / "s.parquet"
    with pytest.raises(RuntimeError):
        with ScoresWriter(path) as writer:
            writer.write(small_scores())
            raise RuntimeError("collector crashed")
    assert list(tmp_path.iterdir()) == []


def test_write_scores_refuses_a_bad_table_and_writes_nothing(tmp_path):
    with pytest.raises(ScoresError):
        write_scores(small_scores().assign(score=np.nan), tmp_path / "s.parquet")
    assert list(tmp_path.iterdir()) == []


# --- every bad input gets its clear error -----------------------------------------------------


def _write(tmp_path, frame, name="bad.parquet"):
    path = tmp_path / name
    frame.to_parquet(path, index=False)
    return path


def _error(path):
    with pytest.raises(ScoresError) as info:
        read_scores(path)
    return str(info.value)


def test_missing_column_is_named_with_its_near_miss(tmp_path):
    message = _error(_write(tmp_path, small_scores().rename(columns={"input_id": "inputid"})))
    assert "bad.parquet" in message and "'input_id'" in message and "found 'inputid'" in message


def test_wrong_dtype_names_the_column_and_the_fix(tmp_path):
    message = _error(_write(tmp_path, small_scores().astype({"score": str})))
    assert "'score'" in message and "astype('float64')" in message


def test_float_input_ids_are_refused(tmp_path):
    message = _error(_write(tmp_path, small_scores().astype({"input_id": float})))
    assert "'input_id'" in message and "int64" in message


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_name_the_row(tmp_path, value):
    frame = small_scores()
    frame.loc[5, "score"] = value
    message = _error(_write(tmp_path, frame))
    assert "row 5" in message and f"edge={frame.edge[5]!r}" in message and "1 non-finite" in message


def test_duplicate_rows_are_refused(tmp_path):
    frame = small_scores()
    frame = pd.concat([frame, frame.iloc[[3]]], ignore_index=True)
    message = _error(_write(tmp_path, frame))
    assert "duplicate" in message and f"row {len(frame) - 1}" in message


def test_duplicates_across_part_files_are_refused(tmp_path):
    (tmp_path / "parts").mkdir()
    write_scores(small_scores(), tmp_path / "parts" / "a.parquet")
    write_scores(small_scores(), tmp_path / "parts" / "b.parquet")
    assert "duplicate" in _error(tmp_path / "parts")
    with pytest.raises(ScoresError, match="duplicate"):
        sufficient_statistics(tmp_path / "parts")


def test_negative_input_ids_are_refused(tmp_path):
    frame = small_scores()
    frame.loc[2, "input_id"] = -1
    message = _error(_write(tmp_path, frame))
    assert "negative" in message and "row 2" in message


def test_empty_file_is_refused(tmp_path):
    message = _error(_write(tmp_path, small_scores().iloc[:0]))
    assert "empty" in message
    with pytest.raises(ScoresError, match="empty"):
        sufficient_statistics(tmp_path / "bad.parquet")


def test_a_method_category_without_rows_is_refused(tmp_path):
    frame = small_scores().astype({"method": pd.CategoricalDtype(["exact", "eap", "eap-ig-inputs"])})
    with pytest.raises(ScoresError, match="'eap-ig-inputs'.*no rows"):
        validate_scores(frame)
    message = _error(_write(tmp_path, frame))
    assert "eap-ig-inputs" in message and "no rows" in message


def test_a_method_declared_in_metadata_without_rows_is_refused(tmp_path):
    table = pa.Table.from_pandas(small_scores(), preserve_index=False)
    table = table.replace_schema_metadata({schema.METADATA_KEY: json.dumps({"methods": {"exact": {}, "eap": {}, "kl": {}}})})
    pq.write_table(table, tmp_path / "declared.parquet")
    assert "'kl'" in _error(tmp_path / "declared.parquet")


@pytest.mark.parametrize("collect", [{"exact_inputs": 0, "shard": None}, {"exact_inputs": 2, "shard": "2/2"}])
def test_exact_asked_for_but_given_to_no_input_of_this_file_reads(tmp_path, collect):
    """`collect --exact-inputs 0`, or a shard past the exact subset, declares 'exact' and holds no exact rows."""
    frame = small_scores()
    frame = frame[frame["method"] != "exact"]
    meta = {"methods": {"exact": {}, **{m: {} for m in frame["method"].unique()}}, "extra": {"collect": collect}}
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({schema.METADATA_KEY: json.dumps(meta)}), tmp_path / "k0.parquet")
    assert sorted(read_scores(tmp_path / "k0.parquet")["method"].unique()) == sorted(frame["method"].unique())
    assert "exact" not in sufficient_statistics(tmp_path / "k0.parquet").methods


def test_null_values_are_refused(tmp_path):
    frame = small_scores().astype({"edge": object})
    frame.loc[1, "edge"] = None
    message = _error(_write(tmp_path, frame))
    assert "'edge'" in message and "null" in message and "row 1" in message


def test_unknown_edge_names_warn_and_are_kept(tmp_path):
    frame = small_scores()
    frame["edge"] = frame["edge"].replace({"input->m0": "embed->mlp0"})
    path = _write(tmp_path, frame)
    with pytest.warns(EdgeNameWarning, match="embed->mlp0"):
        back = read_scores(path)
    assert "embed->mlp0" in set(back.edge)
    with pytest.warns(EdgeNameWarning):
        assert "embed->mlp0" in sufficient_statistics(path).edges


def test_missing_path_and_non_parquet_files_get_errors(tmp_path):
    with pytest.raises(ScoresError, match="no such file"):
        read_scores(tmp_path / "nope.parquet")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ScoresError, match="not a readable parquet"):
        read_scores(tmp_path / "x.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ScoresError, match="no \\*.parquet"):
        read_scores(tmp_path / "empty_dir")


def test_write_scores_keeps_string_extra_columns_and_writes_scores_in_a_contract_float(tmp_path):
    frame = small_scores().assign(note="seen", split=lambda f: pd.Categorical(np.where(f.input_id < 2, "a", "b")))
    frame["score"] = frame["score"].astype("Float64")  # pandas' nullable float, no missing values
    back = read_scores(write_scores(frame, tmp_path / "extra.parquet"))
    assert set(back.note) == {"seen"} and set(back.split) == {"a", "b"}
    assert pq.read_schema(tmp_path / "extra.parquet").field("score").type == pa.float64()
    half = small_scores().assign(score=lambda f: f.score.astype(np.float16))
    assert pq.read_schema(write_scores(half, tmp_path / "half.parquet")).field("score").type == pa.float64()


def test_string_view_columns_as_polars_writes_them_are_read(tmp_path):
    frame = small_scores()
    table = pa.table({"input_id": frame.input_id.to_numpy(), "edge": pa.array(frame.edge, pa.string_view()),
                      "method": pa.array(frame.method, pa.string_view()), "score": frame.score.to_numpy()})
    pq.write_table(table, tmp_path / "polars.parquet")
    back = read_scores(tmp_path / "polars.parquet")
    assert set(back.edge) == set(frame.edge) and len(back) == len(frame)
    plain = sufficient_statistics(_write(tmp_path, frame, "plain.parquet"))
    view = sufficient_statistics(tmp_path / "polars.parquet")
    assert np.array_equal(view.n, plain.n) and np.allclose(view.sums, plain.sums)


def test_a_damaged_data_page_names_the_file_and_row_group(tmp_path):
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.Table.from_pandas(small_scores(n_inputs=400), preserve_index=False), path,
                   row_group_size=200, compression="zstd")
    data = bytearray(path.read_bytes())
    data[200:2200] = bytes(2000)  # data pages come before the footer, which stays readable
    path.write_bytes(bytes(data))
    for read in (read_scores, sufficient_statistics):
        with pytest.raises(ScoresError, match=r"damaged.parquet: cannot decode .*damaged or truncated"):
            read(path)


def test_more_methods_than_the_pattern_codes_hold_is_an_error_naming_the_file(tmp_path):
    frame = small_scores(n_inputs=1, methods=[f"eap:k={i}" for i in range(65)])
    path = _write(tmp_path, frame)
    with pytest.raises(ScoresError, match=r"bad.parquet: 65 methods: at most 64"):
        sufficient_statistics(path)


def test_input_ids_beyond_int64_are_refused(tmp_path):
    frame = small_scores(n_inputs=2)
    table = pa.table({"input_id": pa.array(frame.input_id.to_numpy().astype(np.uint64) + np.uint64(2**63), pa.uint64()),
                      "edge": frame.edge, "method": frame.method, "score": frame.score})
    pq.write_table(table, tmp_path / "big.parquet")
    with pytest.raises(ScoresError, match="input_id' is 9223372036854775808 at row 0, beyond int64"):
        read_scores(tmp_path / "big.parquet")


def test_metadata_that_is_not_an_object_is_refused(tmp_path):
    table = pa.Table.from_pandas(small_scores(), preserve_index=False)
    for bad in ([1, 2], {"methods": "exact"}):
        pq.write_table(table.replace_schema_metadata({schema.METADATA_KEY: json.dumps(bad).encode()}),
                       tmp_path / "m.parquet")
        with pytest.raises(ScoresError, match="metadata must be a JSON object"):
            read_metadata(tmp_path / "m.parquet")


@pytest.mark.parametrize("label", ["Exact", "EXACT", "exact ", "exakt"])
def test_a_label_that_looks_like_exact_but_is_not_warns(tmp_path, label):
    path = _write(tmp_path, small_scores(methods=(label, "eap")))
    with pytest.warns(MethodLabelWarning, match=f"{label!r} looks like 'exact'"):
        read_scores(path)
    with pytest.warns(MethodLabelWarning):
        sufficient_statistics(path)


# --- sufficient statistics equal a direct groupby -----------------------------------------------


def _groupby_reference(frame):
    return (frame.groupby(["edge", "method"], observed=True).score
            .agg(n="count", sum="sum", sum_sq=lambda s: (s**2).sum()).reset_index())


frames = st.builds(
    lambda n_inputs, n_exact, seed, drop: small_scores(n_inputs, min(n_exact, n_inputs), ("exact", "eap", "eap-ig-inputs"),
                                                       Graph(1, 1), seed).sample(frac=1 - drop, random_state=seed),
    n_inputs=st.integers(1, 8), n_exact=st.integers(0, 8), seed=st.integers(0, 10_000), drop=st.sampled_from([0.0, 0.3]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=frames)
def test_sufficient_statistics_equal_a_groupby(tmp_path, frame):
    path = tmp_path / "h.parquet"
    frame.to_parquet(path, index=False)
    stats = sufficient_statistics(path)
    got = stats.per_method().set_index(["edge", "method"]).sort_index()
    ref = _groupby_reference(frame).set_index(["edge", "method"]).sort_index()
    assert list(got.index) == list(ref.index)
    np.testing.assert_array_equal(got["n"], ref["n"])
    np.testing.assert_allclose(got["sum"], ref["sum"], atol=1e-12)
    np.testing.assert_allclose(got["sum_sq"], ref["sum_sq"], atol=1e-12)

    wide = frame.pivot_table(index=["input_id", "edge"], columns="method", values="score", observed=True)
    if "exact" in wide:
        for method in [m for m in wide.columns if m != "exact"]:
            both = wide[["exact", method]].dropna()
            ref_cross = (both["exact"] * both[method]).groupby(level="edge").sum()
            got_cross = stats.exact_cross().query("method == @method").set_index("edge")["sum_cross"]
            np.testing.assert_allclose(got_cross.sort_index(), ref_cross.sort_index(), atol=1e-12)


def test_patterns_separate_inputs_with_and_without_exact_scores(tmp_path):
    frame = small_scores(n_inputs=5, n_exact=2, methods=("exact", "eap", "eap-ig-inputs"))
    frame.to_parquet(tmp_path / "s.parquet", index=False)
    stats = sufficient_statistics(tmp_path / "s.parquet")
    assert stats.methods == ("exact", "eap", "eap-ig-inputs")
    np.testing.assert_array_equal(stats.patterns, [[True, True, True], [False, True, True]])
    np.testing.assert_array_equal(stats.n[0], [2, 3])
    # approximate-approximate cross products on inputs without exact scores
    wide = frame[frame.input_id >= 2].pivot_table(index=["input_id", "edge"], columns="method", values="score")
    ref = (wide["eap"] * wide["eap-ig-inputs"]).groupby(level="edge").sum()
    e = list(stats.edges).index(ref.index[0])
    assert stats.cross[e, 1, 1, 2] == pytest.approx(ref.iloc[0]) == stats.cross[e, 1, 2, 1]


def test_chunked_statistics_equal_one_pass(tmp_path):
    frame = small_scores(n_inputs=30, n_exact=7, methods=("exact", "eap")).sample(frac=1, random_state=1)
    frame.to_parquet(tmp_path / "unsorted.parquet", index=False, row_group_size=17)
    one = sufficient_statistics(tmp_path / "unsorted.parquet")
    chunked = sufficient_statistics(tmp_path / "unsorted.parquet", memory_budget=1)
    for name in ("n", "sums", "cross"):
        np.testing.assert_allclose(getattr(one, name), getattr(chunked, name), atol=1e-12)


def test_statistics_save_and_load(tmp_path):
    frame = small_scores()
    frame.to_parquet(tmp_path / "s.parquet", index=False)
    stats = sufficient_statistics(tmp_path / "s.parquet")
    stats.save(tmp_path / "stats.npz")
    back = type(stats).load(tmp_path / "stats.npz")
    assert list(back.edges) == list(stats.edges) and back.methods == stats.methods
    np.testing.assert_array_equal(back.cross, stats.cross)


def test_edges_come_in_graph_order(tmp_path):
    graph = Graph(2, 2)
    frame = small_scores(graph=graph).sample(frac=1, random_state=3)
    frame.to_parquet(tmp_path / "s.parquet", index=False)
    edges = list(sufficient_statistics(tmp_path / "s.parquet").edges)
    assert edges[0].startswith("input->a0.h0<q>") and edges[-1] == "m1->logits"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_scores(tmp_path / "s.parquet")
