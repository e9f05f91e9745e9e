"""Task files: both layouts read, every malformed file gets a clear error."""

import pandas as pd
import pytest

from bayescirc.errors import TaskError
from bayescirc.tasks import read_task, write_task

ROWS = pd.DataFrame({
    "clean": ["When Mary and John went, John gave it to", "When Anna and Bob went, Bob gave it to"],
    "corrupted": ["When Mary and John went, Kate gave it to", "When Anna and Bob went, Sam gave it to"],
    "answer": [" Mary", " Anna"],
    "distractor": [" John", " Bob"],
})


def test_bayescirc_layout_round_trips_through_jsonl(tmp_path):
    path = write_task(ROWS, tmp_path / "t.jsonl")
    task = read_task(path)
    assert list(task.answer) == [" Mary", " Anna"]
    assert task.answer_id.isna().all()


def test_eap_ig_csv_layout_reads_token_ids(tmp_path):
    frame = ROWS[["clean", "corrupted"]].assign(correct_idx=[5, 7], incorrect_idx=[9, 11])
    frame.to_csv(tmp_path / "t.csv", index=False)
    task = read_task(tmp_path / "t.csv")
    assert list(task.answer_id) == [5, 7] and list(task.distractor_id) == [9, 11]


def test_n_inputs_keeps_the_first_rows():
    assert len(read_task(ROWS, n_inputs=1)) == 1


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.drop(columns="answer"), r"missing column\(s\) \['answer'\]"),
    (lambda d: d.iloc[:0], "no rows"),
    (lambda d: d.assign(clean=["", "x"]), "column 'clean' must be a non-empty string; row 0"),
])
def test_malformed_tasks_are_refused(mutate, match):
    with pytest.raises(TaskError, match=match):
        read_task(mutate(ROWS.copy()))


def test_bad_files_name_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"clean": "a"}\n{not json\n')
    with pytest.raises(TaskError, match="line 2"):
        read_task(path)
    with pytest.raises(TaskError, match="no such task file"):
        read_task(tmp_path / "missing.jsonl")
    with pytest.raises(TaskError, match="must hold token ids"):
        read_task(ROWS[["clean", "corrupted"]].assign(correct_idx=["x", "1"], incorrect_idx=[1, 2]))


def test_write_task_refuses_a_bad_table_and_writes_nothing(tmp_path):
    with pytest.raises(TaskError):
        write_task(ROWS.drop(columns="clean"), tmp_path / "t.jsonl")
    assert list(tmp_path.iterdir()) == []
