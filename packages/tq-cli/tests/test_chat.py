"""`tq chat` with stdin piped: streamed replies, commands, stats, the cache kept across turns."""

from __future__ import annotations

import io
import re

import pytest
from tq_cli_testkit import WORDS, assert_one_line_error, run_tq

STATS = re.compile(
    r"\[(\d+) tokens at [\d.]+ tok/s; prompt (\d+) tokens \((\d+) new\) at [\d.]+ tok/s; "
    r"KV cache ([\d.]+) MiB \(unquantized ([\d.]+) MiB, ([\d.]+)x\)\]"
)


def chat(capsys, monkeypatch, lines: str, *flags):
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    return run_tq(capsys, "chat", *flags)


def test_turns_commands_and_stats(capsys, monkeypatch, tq_model):
    code, out, err = chat(
        capsys, monkeypatch, "hi the\n/help\nof and to\n/bogus\n/reset\nhi the\n/quit\nnever\n",
        "--model", tq_model, "-m", "5", "--kv-sink", "4", "--kv-buffer", "4",
    )  # fmt: skip
    assert code == 0, err
    replies = out.splitlines()
    assert len(replies) == 3  # "never" comes after /quit
    assert all(len(r.split()) == 5 and set(r.split()) <= set(WORDS) for r in replies)
    assert replies[0] == replies[2]  # greedy, and /reset forgot the conversation
    assert "/reset" in err and "unknown command /bogus" in err
    assert "TurboQuant KV cache k_bits=4, v_bits=3" in err  # K4V3 by default
    stats = [tuple(map(float, m)) for m in STATS.findall(err)]
    assert len(stats) == 3
    (g1, p1, n1, *_), (g2, p2, n2, *_), (g3, p3, n3, *_) = stats
    assert (g1, p1, n1) == (5, 4, 4)  # <|user|> hi the <|assistant|>
    # the second turn reuses the cached first turn: only the new tokens run
    assert p2 > p1 + 5 and n2 < p2 - 5
    assert (p3, n3) == (4, 4)  # after /reset the cache started empty


def test_no_turboquant_keeps_the_fp16_cache_and_matches_generate(capsys, monkeypatch, tq_model):
    code, out, err = chat(capsys, monkeypatch, "hi the\n", "--model", tq_model, "-m", "6",
                          "--no-turboquant")  # fmt: skip
    assert code == 0, err
    assert "fp16 KV cache" in err and "TurboQuant weights" in err
    (stats,) = STATS.findall(err)
    assert float(stats[5]) == 1.0
    code, gen_out, _ = run_tq(
        capsys, "generate", "--model", tq_model, "--prompt", "hi the", "-m", "6"
    )
    assert out.strip() == gen_out.strip()


def test_compressed_cache_is_smaller(capsys, monkeypatch, tq_model):
    words = " ".join(WORDS[10:150])  # past sink + buffer + flush_batch (64)
    code, _, err = chat(capsys, monkeypatch, f"{words}\n", "--model", tq_model, "-m", "4",
                        "--kv-bits", "3", "--kv-sink", "4", "--kv-buffer", "4")  # fmt: skip
    assert code == 0, err
    (stats,) = STATS.findall(err)
    assert float(stats[5]) > 2.0  # 3-bit codes hold most of the ~145 tokens


def test_float_model_with_no_turboquant_loads_as_is(capsys, monkeypatch, float_model):
    code, out, err = chat(capsys, monkeypatch, "hi\n", "--model", float_model, "-m", "3",
                          "--no-turboquant")  # fmt: skip
    assert code == 0, err
    assert "float weights" in err and len(out.split()) == 3


@pytest.mark.parametrize(
    "flags, text",
    [
        (["--max-tokens", "0"], "--max-tokens"),
        (["--no-turboquant", "--kv-bits", "3"], "--no-turboquant"),
        (["--kv-bits", "9"], "bits"),
    ],
)
def test_bad_flags(capsys, monkeypatch, tq_model, flags, text):
    code, _, err = chat(capsys, monkeypatch, "", "--model", tq_model, *flags)
    assert text in assert_one_line_error(code, err, "tq chat:")
