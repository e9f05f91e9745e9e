"""Writing outputs: nothing half-written, nothing foreign replaced, JSON that strict parsers read."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from fitfixtures import four_draw_fit

from bayescirc import _io, schema
from bayescirc.errors import BayescircError


def strict_load(text):
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_strict_json_writes_null_for_undefined_numbers_and_plain_numbers_for_numpy():
    text = _io.strict_json({"a": float("nan"), "b": [np.float32(0.5), np.inf], "c": np.arange(2), "d": np.int64(3)})
    assert strict_load(text) == {"a": None, "b": [0.5, None], "c": [0, 1], "d": 3}


def test_a_saved_fit_is_strict_json_even_with_undefined_figures(tmp_path):
    fit = four_draw_fit()
    fit.summary["diagnostics"] = {"svi_final_loss": float("nan")}
    fit.metadata["extra"] = {"temperature": float("inf")}
    fit.save(tmp_path / "fit")
    assert strict_load((tmp_path / "fit" / schema.FIT_SUMMARY_FILE).read_text())["diagnostics"] == {
        "svi_final_loss": None}
    meta = pq.read_schema(tmp_path / "fit" / schema.FIT_EDGES_FILE).metadata[schema.METADATA_KEY]
    assert strict_load(meta.decode())["extra"] == {"temperature": None}


def test_the_current_directory_can_be_the_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with _io.atomic_dir(".", replaces=("a.txt",)) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (tmp_path / "a.txt").read_text() == "new"


def test_a_failed_swap_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    real, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(_io.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="disk full"), _io.atomic_dir(out, replaces=("a.txt",)) as tmp:
        (tmp / "a.txt").write_text("new")
    monkeypatch.undo()
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or renamed copies left


def test_an_output_directory_holding_other_files_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(BayescircError, match="holds mine.txt, which this command does not write"):
        with _io.atomic_dir(out, replaces=("a.txt",)):
            pytest.fail("the body ran")
    assert (out / "mine.txt").read_text() == "keep"
    (tmp_path / "file").write_text("")
    with pytest.raises(BayescircError, match="is a file"):
        _io.check_replaceable(tmp_path / "file", ("a.txt",))


def test_outputs_get_the_permissions_of_a_plain_write(tmp_path):
    mask = os.umask(0o022)
    try:
        with _io.atomic_path(tmp_path / "report.html") as tmp:
            tmp.write_text("<html></html>")
        with _io.atomic_dir(tmp_path / "plots", replaces=("a.png",)) as tmp:
            (tmp / "a.png").write_bytes(b"")
    finally:
        os.umask(mask)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert (tmp_path / "plots").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
