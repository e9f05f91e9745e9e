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
    bad.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")  # a blank line: row 1 is on line 3
    result = CliRunner().invoke(cli, ["collect", "--model", str(model), "--task", str(bad), "--out",
                                      str(tmp_path / "s.parquet"), "--quiet"])
    assert result.exit_code == 2
    assert f"{bad} line 3 (row 1): answer 'Mary John' is 2 tokens" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "s.parquet").exists()
    result = CliRunner().invoke(cli, ["collect", "--model", str(model), "--task", str(task), "--methods", "exact,foo",
                                      "--out", str(tmp_path / "s.parquet")])
    assert result.exit_code == 2 and "unknown method(s) ['foo']" in result.output


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the model loads: what is refused must be refused before."""
    import bayescirc.bridge as bridge

    def fail(*args, **kwargs):
        pytest.fail("the model was loaded before the options were checked")

    monkeypatch.setattr(bridge, "load_model", fail)


def _collect(model, task, *options):
    return CliRunner().invoke(cli, ["collect", "--model", str(model), "--task", str(task), "--methods", "eap",
                                    "--quiet", *options])


def _one_error_line(result):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0, result.output
    return result.output


@pytest.mark.parametrize("options, message", [
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--device", "cuda:99"], "device 'cuda:99' requested but torch sees"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
])
def test_bad_device_or_dtype_is_one_line_before_loading(tiny, tmp_path, no_loading, options, message):
    model, task = tiny
    output = _one_error_line(_collect(model, task, "--out", str(tmp_path / "s.parquet"), *options))
    assert message in output
    assert not any(tmp_path.iterdir())


def test_out_must_be_a_directory_with_shard(tiny, tmp_path, no_loading):
    model, task = tiny
    out = tmp_path / "s.parquet"
    out.write_text("not scores")
    output = _one_error_line(_collect(model, task, "--out", str(out), "--shard", "1/2"))
    assert f"--out {out} is a file, but with --shard --out must be a directory" in output
    assert out.read_text() == "not scores"


def test_out_that_is_not_a_scores_file_is_never_overwritten(tiny, tmp_path, no_loading):
    model, task = tiny
    before = task.read_text()
    output = _one_error_line(_collect(model, task, "--out", str(task)))
    assert f"--out {task} is the task file; refusing to overwrite it" in output
    assert task.read_text() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    output = _one_error_line(_collect(model, task, "--out", str(notes)))
    assert f"--out {notes} exists and is not a bayescirc scores file; refusing to overwrite it" in output
    assert notes.read_text() == "keep me"


def test_more_shards_than_inputs_is_refused(tiny, tmp_path, no_loading):
    model, task = tiny
    out = tmp_path / "parts"
    output = _one_error_line(_collect(model, task, "--out", str(out), "--n-inputs", "4", "--shard", "5/10"))
    assert "--shard 5/10: the task has only 4 inputs to split" in output
    assert not out.exists()


def test_overlapping_shard_layouts_are_refused(tiny, tmp_path, no_loading):
    """Parts of a k/3 split beside those of a k/2 split would cover inputs twice; so would a single run."""
    model, task = tiny
    out = tmp_path / "parts"
    out.mkdir()
    for k in (1, 2):
        (out / f"part-{k}-of-2.parquet").write_bytes(b"")
    output = _one_error_line(_collect(model, task, "--out", str(out), "--shard", "1/3"))
    assert f"{out} already holds parts of another split (part-1-of-2.parquet, part-2-of-2.parquet); --shard 1/3" in output
    output = _one_error_line(_collect(model, task, "--out", str(out)))
    assert "already holds parts of another split" in output and "a run without --shard" in output
    assert sorted(p.name for p in out.iterdir()) == ["part-1-of-2.parquet", "part-2-of-2.parquet"]


def test_a_mistyped_model_directory_is_one_line(tiny, tmp_path, monkeypatch):
    """Hub loading fails offline (tests run with HF_HUB_OFFLINE=1); the message says there is no such directory."""
    _, task = tiny
    (tmp_path / "models" / "ioi-toy").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    output = _one_error_line(_collect("models/ioi-tooy", task, "--out", "s.parquet", "--device", "cpu"))
    assert "could not load model 'models/ioi-tooy': " in output
    assert "There is no local directory 'models/ioi-tooy' either. Did you mean 'models/ioi-toy'?" in output
    assert ".." not in output


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
