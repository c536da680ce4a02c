"""`tq eval jsonl` on a tiny llama: side-by-side scores, matching rules, malformed task files,
the shipped task file."""

from __future__ import annotations

import json

import pytest
from tq_cli_testkit import WORDS, assert_one_line_error, run_tq


@pytest.fixture()
def tasks_file(tmp_path):
    context = " ".join(WORDS[(7 * i) % 200] for i in range(80))
    tasks = [
        {"id": "ctx", "context": context, "prompt": "what is it", "answer": "w1",
         "match": "substring"},
        {"prompt": "hello there", "answer": "the", "match": "exact"},
        {"prompt": "one two", "answer": "two"},
    ]  # fmt: skip
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(t) for t in tasks) + "\n\n")
    return path


def _run(capsys, model, tasks, *extra):
    return run_tq(
        capsys, "eval", "jsonl", tasks, "--model", model, "--sink", 4, "--buffer", 8,
        "--max-tokens", 4, *extra,
    )  # fmt: skip


def test_jsonl_side_by_side(float_model, tasks_file, capsys, tmp_path):
    out_file = tmp_path / "scores.json"
    code, out, err = _run(
        capsys, float_model, tasks_file, "--settings", "K8V8,K2V2", "--json", "--out", out_file
    )
    assert code == 0, err
    result = json.loads(out)
    assert json.loads(out_file.read_text()) == result
    assert "tasks of tasks.jsonl" in err
    assert [r["setting"] for r in result["rows"]] == ["fp16", "K8V8", "K2V2"]
    fp16 = result["rows"][0]
    assert fp16["same_text_as_fp16"] == 1.0 and fp16["same_verdict_as_fp16"] == 1.0
    for r in result["rows"]:
        assert r["tasks"] == 3 and 0 <= r["accuracy"] <= 1
        assert r["correct"] == round(3 * r["accuracy"])
    details = result["tasks"]
    assert [d["id"] for d in details] == ["ctx", "2", "3"]
    assert [d["line"] for d in details] == [1, 2, 3]
    assert details[0]["context_tokens"] > 80 and details[1]["context_tokens"] < 10
    for d in details:
        assert set(d["outputs"]) == {"fp16", "K8V8", "K2V2"}
        assert d["match"] in ("exact", "substring")
    # Short prompts sit in the fp16 sinks: every cache gives the same text.
    for d in details[1:]:
        assert len(set(d["outputs"].values())) == 1


def test_matches():
    from tq_cli.eval_jsonl import matches

    assert matches("  Lisbon.\nmore text", "lisbon", "exact")
    assert matches('"42"', "42", "exact")
    assert not matches("It is 42", "42", "exact")
    assert matches("The code is 4817.", "4817", "substring")
    assert matches("the  Secret   CODE", "secret code", "substring")
    assert not matches("48 17", "4817", "substring")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a", "answer": "b"}', "{not json"], "line 2: not valid JSON"),
        (['["prompt", "answer"]'], "line 1: expected a JSON object, got list"),
        (['{"answer": "b"}'], 'line 1: "prompt" must be a non-empty string'),
        (['{"prompt": "a", "answer": 3}'], 'line 1: "answer" must be a non-empty string'),
        (["", '{"prompt": "a", "answer": "b", "match": "regex"}'], 'line 2: "match" must be'),
        (['{"prompt": "a", "answer": "b", "context": 5}'], 'line 1: "context" must be a string'),
        (["", "  "], "no tasks"),
    ],
)
def test_malformed_lines_name_the_line(float_model, tmp_path, capsys, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, _, err = _run(capsys, float_model, path)
    line = assert_one_line_error(code, err, "tq eval jsonl: ")
    assert message in line and "bad.jsonl" in line


def test_jsonl_bad_input(float_model, tasks_file, tmp_path, capsys):
    code, _, err = _run(capsys, float_model, tmp_path / "missing.jsonl")
    assert "no such task file" in assert_one_line_error(code, err, "tq eval jsonl: ")
    code, _, err = _run(capsys, float_model, tasks_file, "--settings", "K2V1.25")
    assert "value bits must be one of" in assert_one_line_error(code, err, "tq eval jsonl: ")
    code, _, err = _run(capsys, float_model, tasks_file, "--max-tokens", 0)
    assert "--max-tokens" in assert_one_line_error(code, err, "tq eval jsonl: ")
    code, _, err = _run(capsys, tmp_path, tasks_file)
    assert "not a model directory" in assert_one_line_error(code, err, "tq eval jsonl: ")


def test_shipped_tasks_parse():
    from tq_cli.eval_jsonl import DEFAULT_TASKS, load_tasks

    tasks = load_tasks(DEFAULT_TASKS)
    assert 20 <= len(tasks) <= 30
    assert len({t["id"] for t in tasks}) == len(tasks)
    long = [t for t in tasks if len(t["context"]) > 2000]  # beyond sinks + buffer in tokens
    assert len(long) >= len(tasks) // 2
    for t in long:
        assert t["match"] == "substring" and t["answer"].lower() in t["context"].lower()
