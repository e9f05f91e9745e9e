"""Task generators: valid task files whose corruptions are the ones the literature uses."""

import json
import re

import pytest
from click.testing import CliRunner

from bayescirc.cli import cli
from bayescirc.errors import TaskError
from bayescirc.taskgen import IOI_NAMES, IOI_TEMPLATES, ioi_split, make_task, toy_words
from bayescirc.tasks import read_task, write_task

KINDS = [("ioi", "toy"), ("ioi", "english"), ("induction", "toy"), ("induction", "english"),
         ("greater-than", "english")]


def words(text):
    return re.findall(r"\w+|[^\w\s]+", text)


@pytest.mark.parametrize("kind, vocabulary", KINDS)
def test_generated_tasks_round_trip_with_equal_word_counts(tmp_path, kind, vocabulary):
    frame = make_task(kind, 50, seed=1, vocabulary=vocabulary)
    task = read_task(write_task(frame, tmp_path / "t.jsonl"))
    assert len(task) == 50
    assert list(task.clean) == list(frame.clean) and list(task.answer) == list(frame.answer)
    for clean, corrupted in zip(task.clean, task.corrupted):
        assert len(clean.split()) == len(corrupted.split())
        assert len(words(clean)) == len(words(corrupted))
        assert sum(a != b for a, b in zip(words(clean), words(corrupted))) == 1
    assert (task.answer != task.distractor).all()


@pytest.mark.parametrize("kind, vocabulary", KINDS)
def test_same_seed_same_rows_other_seed_other_rows(kind, vocabulary):
    a = make_task(kind, 20, seed=5, vocabulary=vocabulary)
    assert a.equals(make_task(kind, 20, seed=5, vocabulary=vocabulary))
    assert not a.equals(make_task(kind, 20, seed=6, vocabulary=vocabulary))


@pytest.mark.parametrize("vocabulary", ["toy", "english"])
def test_ioi_abc_corruption_replaces_exactly_the_repeated_subject(vocabulary):
    for row in make_task("ioi", 200, seed=2, vocabulary=vocabulary).itertuples():
        clean, corrupted = words(row.clean), words(row.corrupted)
        io, s = row.answer.strip(), row.distractor.strip()
        assert row.answer == f" {io}" and row.distractor == f" {s}"
        assert clean.count(io) == 1 and clean.count(s) == 2
        s2 = len(clean) - 1 - clean[::-1].index(s)
        changed = [i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b]
        assert changed == [s2]
        third = corrupted[s2]
        assert third not in (io, s) and third[0].isupper()
        assert corrupted.count(io) == corrupted.count(s) == corrupted.count(third) == 1


def test_induction_answer_is_what_followed_the_last_word_before_and_corruption_moves_it():
    for row in make_task("induction", 200, seed=3).itertuples():
        clean, corrupted = row.clean.split(), row.corrupted.split()
        last = clean[-1]
        assert clean.count(last) == 2  # the current word occurred once before
        assert clean[clean.index(last) + 1] == row.answer.strip()
        assert corrupted[corrupted.index(last) + 1] == row.distractor.strip()
        assert row.distractor.strip() not in clean and row.answer.strip() not in corrupted


def test_induction_prompts_end_inside_a_later_repeat_of_a_span_of_distinct_words():
    for row in make_task("induction", 200, seed=4).itertuples():
        clean = row.clean.split()
        k = sum(clean.count(w) == 2 for w in set(clean))  # words seen twice: the repeated part
        suffix, head = clean[-k:], clean[:-k]
        assert len(set(head)) == len(head) and all(clean.count(w) == 2 for w in suffix)
        start = head.index(suffix[0])
        assert head[start:start + k] == suffix  # a contiguous earlier copy
        assert 4 <= len(head) - start <= 12 + 6 and start <= 5  # span + gap, and the unrepeated prefix


def test_greater_than_answers_are_later_years_and_distractors_earlier_or_equal():
    for row in make_task("greater-than", 200, seed=5, vocabulary="english").itertuples():
        start = int(re.search(r"17(\d\d) to", row.clean).group(1))
        assert row.clean.endswith(" to the year 17") and re.search(r"from the year 1701 to", row.corrupted)
        assert re.fullmatch(r"\d\d", row.answer) and re.fullmatch(r"\d\d", row.distractor)
        assert int(row.answer) > start >= int(row.distractor) >= 1


def test_toy_ioi_evaluation_split_shares_no_template_or_name_pair_with_training():
    eval_templates, eval_pairs = ioi_split("eval")
    train_templates, train_pairs = ioi_split("train")
    assert not set(eval_templates) & set(train_templates)
    assert set(eval_templates) | set(train_templates) == set(IOI_TEMPLATES)
    assert not set(eval_pairs) & set(train_pairs)
    assert len(eval_pairs) + len(train_pairs) == len(IOI_NAMES) * (len(IOI_NAMES) - 1) // 2
    assert {n for p in eval_pairs for n in p} == {n for p in train_pairs for n in p} == set(IOI_NAMES)
    # the held-out templates use only words that training shows the model
    train_words = {w for t in train_templates for w in words(t)}
    assert {w for t in eval_templates for w in words(t)} <= train_words

    def pair_and_template(frame):
        out = set()
        for row in frame.itertuples():
            pair = frozenset((row.answer.strip(), row.distractor.strip()))
            template = next(t for t in IOI_TEMPLATES
                            if re.fullmatch(re.escape(t).replace(r"\[A\]", r"\w+").replace(r"\[B\]", r"\w+")
                                            .replace(r"\[S\]", r"\w+").replace(r"\[PLACE\]", r"\w+")
                                            .replace(r"\[OBJECT\]", r"\w+"), row.clean))
            out.add((pair, template))
        return out

    seen = pair_and_template(make_task("ioi", 400, seed=0, split="train"))
    held = pair_and_template(make_task("ioi", 400, seed=0, split="eval"))
    assert not {p for p, _ in seen} & {p for p, _ in held}
    assert not {t for _, t in seen} & {t for _, t in held}
    assert {frozenset(p) for p in eval_pairs} >= {p for p, _ in held}


@pytest.mark.parametrize("kind", ["ioi", "induction"])
def test_toy_answers_and_prompts_are_in_the_toy_vocabulary(kind):
    vocab = set(toy_words(kind))
    for row in make_task(kind, 100, seed=0).itertuples():
        assert set(words(row.clean)) <= vocab and set(words(row.corrupted)) <= vocab
        assert row.answer.strip() in vocab and row.distractor.strip() in vocab


@pytest.mark.parametrize("call, match", [
    (lambda: make_task("sva", 3), "unknown task kind 'sva'"),
    (lambda: make_task("ioi", 0), "n must be a positive integer"),
    (lambda: make_task("ioi", 3, vocabulary="french"), "unknown vocabulary 'french'"),
    (lambda: make_task("greater-than", 3, vocabulary="toy"), "greater-than has no toy vocabulary"),
])
def test_bad_requests_are_refused_with_what_to_do(call, match):
    with pytest.raises(TaskError, match=match):
        call()


def test_cli_writes_the_same_rows_as_make_task(tmp_path):
    out = tmp_path / "ioi.jsonl"
    result = CliRunner().invoke(cli, ["task", "ioi", "--n", "30", "--seed", "7", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "30 ioi prompt pairs" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == make_task("ioi", 30, seed=7).to_dict(orient="records")


def test_cli_greater_than_defaults_to_english_and_toy_is_a_one_line_error(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["task", "greater-than", "--n", "5", "--out", str(tmp_path / "gt.jsonl")])
    assert ok.exit_code == 0 and "english vocabulary" in ok.output
    bad = runner.invoke(cli, ["task", "greater-than", "--vocabulary", "toy", "--out", str(tmp_path / "x.jsonl")])
    assert bad.exit_code == 2 and "greater-than has no toy vocabulary" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "x.jsonl").exists()


def test_cli_help_teaches_the_options():
    text = CliRunner().invoke(cli, ["task", "--help"]).output
    for needle in ("ioi", "induction", "greater-than", "--n", "--seed", "--vocabulary", "--out", "ABC", "default"):
        assert needle in text
