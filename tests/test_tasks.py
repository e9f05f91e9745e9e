"""Task files: both layouts read, every malformed file gets a clear error."""

import json

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


def test_csv_line_with_unquoted_commas_is_refused_naming_the_line(tmp_path):
    """Unquoted commas in a prompt would shift its fields into other columns (or the index) silently."""
    path = tmp_path / "ioi.csv"
    ROWS.iloc[:1].to_csv(path, index=False)
    with open(path, "a") as fh:
        fh.write("When Amy and Bob went to the store, Carl gave a drink to,"
                 "When Amy and Bob went to the store, Dan gave a drink to, Amy, Bob\n")
    with pytest.raises(TaskError, match=r"ioi\.csv: line 3 has 6 fields but the header has 4\. Quote .*JSONL"):
        read_task(path)


@pytest.mark.parametrize("name, content, match", [
    ("empty.csv", "", "the file is empty"),
    ("task.jsonl", None, "is a directory"),
    ("huge.jsonl", '{"clean": "a", "corrupted": "b", "correct_idx": 99999999999999999999, "incorrect_idx": 1}\n',
     "'correct_idx' must hold token ids .*line 1 has 99999999999999999999"),
    ("bool.jsonl", '{"clean": "a", "corrupted": "b", "correct_idx": 3, "incorrect_idx": false}\n',
     "'incorrect_idx' must hold token ids .*line 1 has False"),
])
def test_unreadable_task_files_are_task_errors_naming_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    path.mkdir() if content is None else path.write_text(content)
    with pytest.raises(TaskError, match=match) as caught:
        read_task(path)
    assert str(path) in str(caught.value)


def test_errors_in_files_name_the_file_line_not_the_data_row(tmp_path):
    """Blank JSONL lines and the CSV header count: the line number is the one an editor shows."""
    jsonl = tmp_path / "t.jsonl"
    rows = ROWS.to_dict(orient="records")
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps({**rows[1], "clean": ""}) + "\n")
    with pytest.raises(TaskError, match="column 'clean' must be a non-empty string; line 3 has ''"):
        read_task(jsonl)
    csv = tmp_path / "t.csv"
    ROWS[["clean", "corrupted"]].assign(correct_idx=[5, -7], incorrect_idx=[9, 11]).to_csv(csv, index=False)
    with pytest.raises(TaskError, match="'correct_idx' must hold token ids .*; line 3 has '-7'"):
        read_task(csv)


def test_write_task_writes_missing_extra_values_as_json_null(tmp_path):
    """Strict JSON parsers (jq, JavaScript) refuse NaN; a missing value is null."""
    path = write_task(ROWS.assign(note=[1.5, float("nan")]), tmp_path / "t.jsonl")

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    notes = [json.loads(line, parse_constant=refuse)["note"] for line in path.read_text().splitlines()]
    assert notes == [1.5, None]
