"""`tq eval niah` on a tiny llama: needle placement inside the compressed region, JSON, errors;
the fp16 and 4-bit caches find the needle in the real SmolLM2 when it is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tq_cli_testkit import assert_one_line_error, run_tq, write_text

SMOLLM2 = Path("~/.cache/tq-models/smollm2-135m-instruct").expanduser()
WIKITEXT = Path(__file__).resolve().parents[4] / "shared" / "data" / "wikitext-2-test.txt"


@pytest.fixture(scope="session")
def hay(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("niah") / "hay.txt", words=600)


def _base(model, data):
    return ["eval", "niah", "--model", model, "--data", data, "--lengths", "64,96",
            "--depths", "0,0.5,1", "--trials", 2, "--sink", 4, "--buffer", 8,
            "--max-tokens", 3]  # fmt: skip


def test_niah_json_and_needle_placement(float_model, hay, capsys, tmp_path):
    out_file = tmp_path / "niah.json"
    code, out, err = run_tq(
        capsys, *_base(float_model, hay), "--settings", "K8V8,K2V2", "--json", "--out", out_file
    )
    assert code == 0, err
    result = json.loads(out)
    assert json.loads(out_file.read_text()) == result
    assert "needle in a haystack" in err and "pass rate per depth" in err
    assert [r["setting"] for r in result["rows"]] == ["fp16", "K8V8", "K2V2"]
    for r in result["rows"]:
        assert set(r["by_length"]) == {"64", "96"} and set(r["by_depth"]) == {"0.0", "0.5", "1.0"}
        assert 0 <= r["pass_rate"] <= 1 and 0 <= r["same_as_fp16"] <= 1
        assert len(r["grid"]) == 2 and all(len(g) == 3 for g in r["grid"])
    assert result["rows"][0]["same_as_fp16"] == 1.0
    trials = result["trial_answers"]
    assert len(trials) == 2 * 3 * 2
    assert len({t["code"] for t in trials}) > 1
    for t in trials:
        assert set(t["answers"]) == {"fp16", "K8V8", "K2V2"}
        # The needle starts after the sinks and ends before the fp16 buffer: in the codes.
        assert 4 <= t["needle_position"] < t["document_tokens"] - 8
    shallow = [t["needle_position"] for t in trials if t["depth"] == 0]
    deep = [t["needle_position"] for t in trials if t["depth"] == 1]
    assert max(shallow) < min(deep)


def test_build_trial_layout(float_model):
    from tq_cli.eval_niah import INTRO, NEEDLE, build_trial
    from tq_cli.kv_harness import chat_parts, encode, load_model

    class Args:
        sink, buffer = 6, 10

    _, tokenizer, _ = load_model(str(float_model))
    parts = chat_parts(tokenizer)
    hay = list(range(200, 260)) * 4
    doc, question, pos = build_trial(tokenizer, parts, hay, 80, 0.5, 1234, Args)
    assert len(doc) + len(question) == 80
    head = encode(tokenizer, parts[0] + INTRO)
    needle = encode(tokenizer, NEEDLE.format(code=1234))
    assert doc[: len(head)] == head and doc[len(head) : pos] == hay[: pos - len(head)]
    assert doc[pos : pos + len(needle)] == needle
    assert Args.sink <= pos and pos + len(needle) <= len(doc) - Args.buffer


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lengths", "24"], "too short to put a needle"),
        (["--lengths", "8"], "at least 16 tokens"),
        (["--depths", "0.5,1.5"], "--depths must lie in [0, 1]"),
        (["--trials", 0], "--trials must be at least 1"),
        (["--settings", "K4"], "not a setting"),
        (["--settings", "K9V3"], "key bits must be one of"),
        (["--buffer", -2], "--buffer must be >= 0"),
        (["--lengths", "2000"], "the longest length needs"),
    ],
)
def test_niah_bad_input_is_one_line(float_model, hay, capsys, args, message):
    code, _, err = run_tq(capsys, *_base(float_model, hay), "--settings", "K4V3", *args)
    assert message in assert_one_line_error(code, err, "tq eval niah: ")


def test_niah_missing_model(tmp_path, hay, capsys):
    code, _, err = run_tq(capsys, "eval", "niah", "--model", tmp_path / "none", "--data", hay)
    assert "no such model directory" in assert_one_line_error(code, err, "tq eval niah: ")


@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").exists(), reason=f"no model at {SMOLLM2}")
@pytest.mark.skipif(not WIKITEXT.is_file(), reason=f"no WikiText-2 test text at {WIKITEXT}")
def test_niah_on_smollm2(capsys):
    code, out, err = run_tq(
        capsys, "eval", "niah", "--model", SMOLLM2, "--data", WIKITEXT, "--lengths", 400,
        "--depths", 0.5, "--trials", 1, "--sink", 32, "--buffer", 32, "--settings", "K4V3",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert rows[0]["pass_rate"] == 1.0 and rows[1]["pass_rate"] == 1.0, out
