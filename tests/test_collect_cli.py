"""`bayescirc collect` end to end on a tiny local GPT-2 directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformer_lens")

from tinymodel import make_tiny_model, tiny_task_rows  # noqa: E402

from bayescirc.cli import cli  # noqa: E402
from bayescirc.errors import ModelError  # noqa: E402
from bayescirc.scores import read_metadata, read_scores  # noqa: E402

pytestmark = pytest.mark.tl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_model(root / "gpt2-tiny", n_heads=2)
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in tiny_task_rows()))
    return model, task


def test_collect_writes_scores_that_read_back(tiny, tmp_path):
    model, task = tiny
    out = tmp_path / "scores.parquet"
    result = CliRunner().invoke(cli, ["collect", "--model", str(model), "--task", str(task), "--methods", "exact,eap",
                                      "--out", str(out), "--device", "cpu", "--n-inputs", "4", "--exact-inputs", "2",
                                      "--seed", "7", "--quiet"])
    assert result.exit_code == 0, result.output
    table = read_scores(out)
    # 2 layers x 2 heads: layer 0 receives 1 source on 6 qkv inputs + 3 into m0; layer 1 receives 4 sources
    # on 6 qkv inputs + 6 into m1; logits receive 7
    n_edges = 6 + 3 + 24 + 6 + 7
    assert len(table) == n_edges * (4 + 2)
    assert f"wrote {len(table):,} scores (inputs 0..3, {n_edges} edges, methods eap, exact)" in result.output
    meta = read_metadata(out)
    assert meta["seed"] == 7 and meta["metric"] == "logit-diff" and set(meta["methods"]) == {"exact", "eap"}
    assert np.isfinite(table.score).all()


def test_collect_shards_into_a_directory(tiny, tmp_path):
    model, task = tiny
    out = tmp_path / "parts"
    for k in (1, 2):
        result = CliRunner().invoke(cli, ["collect", "--model", str(model), "--task", str(task), "--methods", "eap",
                                          "--out", str(out), "--shard", f"{k}/2", "--quiet"])
        assert result.exit_code == 0, result.output
        assert f"part-{k}-of-2.parquet" in result.output
    assert sorted(read_scores(out).input_id.unique()) == list(range(len(tiny_task_rows())))
    result = CliRunner().invoke(cli, ["collect", "--model", str(model), "--task", str(task), "--methods", "eap",
                                      "--out", str(out), "--shard", "2/2", "--quiet"])
    assert result.exit_code == 0 and "part-2-of-2.parquet is already complete" in result.output


def test_collect_errors_are_one_line(tiny, tmp_path):
    model, task = tiny
    bad = tmp_path / "bad.jsonl"
    rows = tiny_task_rows()[:2]
    rows[1]["answer"] = "Mary John"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(cli, ["collect", "--model", str(model), "--task", str(bad), "--out",
                                      str(tmp_path / "s.parquet"), "--quiet"])
    assert result.exit_code == 2
    assert "row 1: answer 'Mary John' is 2 tokens" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s.parquet").exists()
    result = CliRunner().invoke(cli, ["collect", "--model", str(model), "--task", str(task), "--methods", "exact,foo",
                                      "--out", str(tmp_path / "s.parquet")])
    assert result.exit_code == 2 and "unknown method(s) ['foo']" in result.output


def test_missing_default_model_says_so(tiny, tmp_path, monkeypatch):
    import bayescirc.bridge as bridge

    def missing(name="ioi-toy"):
        raise ModelError(f"shipped model {name!r} not found")

    monkeypatch.setattr(bridge, "shipped_model", missing)
    _, task = tiny
    result = CliRunner().invoke(cli, ["collect", "--task", str(task), "--out", str(tmp_path / "s.parquet")])
    assert result.exit_code == 2
    assert "no --model given and the default shipped model 'ioi-toy' is missing" in result.output


def test_help_teaches_the_options():
    result = CliRunner().invoke(cli, ["collect", "--help"])
    assert result.exit_code == 0
    for text in ("--exact-inputs", "--shard", "k/n", "metric(patched) - metric(clean)", "halving on out-of-memory",
                 "eap-ig-inputs", "ioi-toy"):
        assert text in result.output
