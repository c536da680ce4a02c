"""`tq generate` on a tiny llama: streaming, sampling, chat, default model, errors."""

from __future__ import annotations

import io
import json
import math
import sys

import mlx.core as mx
import pytest
from tq_cli_testkit import (
    WORDS,
    assert_one_line_error,
    run_tq,
)


def test_generate_streams_tokens_and_stats(tq_model, capsys):
    argv = [
        "generate",
        "--model",
        tq_model,
        "--prompt",
        "hi",
        "--max-tokens",
        5,
        "--temp",
        0,
        "--min-tokens",
        5,
    ]
    code, out, err = run_tq(capsys, *argv)
    assert code == 0, err
    words = out.split()
    assert len(words) == 5 and all(w in WORDS for w in words)
    assert "Prompt: 3 tokens" in err  # <|user|> hi <|assistant|>
    assert "Generation: 5 tokens" in err and "tokens-per-sec" in err
    assert "Peak memory:" in err and "GB" in err
    assert run_tq(capsys, *argv)[1] == out  # greedy: the same text again


def test_generate_raw_prompt_and_sampling(tq_model, capsys):
    argv = [
        "generate",
        "--model",
        tq_model,
        "--prompt",
        "hi there",
        "--no-chat-template",
        "--max-tokens",
        6,
        "--temp",
        0.9,
        "--top-p",
        0.9,
        "--seed",
        3,
        "--rep-penalty",
        1.3,
        "--rep-ctx",
        4,
        "--min-tokens",
        6,
    ]
    code, out, err = run_tq(capsys, *argv)
    assert code == 0, err
    assert "Prompt: 2 tokens" in err and len(out.split()) == 6
    assert run_tq(capsys, *argv)[1] == out  # same seed, same sample


def test_min_tokens_suppresses_eos():
    from tq_cli.generate_cmd import suppress_eos

    processor = suppress_eos({2}, prompt_len=3, min_tokens=2)
    logits = mx.zeros((1, 8))
    for generated, blocked in ((0, True), (1, True), (2, False), (5, False)):
        tokens = mx.zeros((3 + generated,), dtype=mx.int32)
        out = processor(tokens, logits)
        assert (out[0, 2].item() == -math.inf) is blocked
        assert out[0, 1].item() == 0 and out[0, 3].item() == 0


def test_min_tokens_in_generation(tq_model, monkeypatch, capsys):
    """A model whose favourite token is EOS: without --min-tokens it stops at once."""
    import tq_cli.generate_cmd as gen
    from tq_core.lm import load

    model, tok = load(tq_model)
    real_call = type(model).__call__

    def eos_first(self, *a, **k):
        logits = real_call(self, *a, **k)
        return logits + mx.where(mx.arange(logits.shape[-1]) == 2, 100.0, 0.0)

    monkeypatch.setattr(type(model), "__call__", eos_first)
    monkeypatch.setattr(gen, "load_tq", lambda path: (model, tok))
    code, out, err = run_tq(capsys, "generate", "--model", tq_model, "--prompt", "hi")
    assert code == 0 and out.strip() == "" and "no text generated" in err
    code, out, err = run_tq(
        capsys,
        "generate",
        "--model",
        tq_model,
        "--prompt",
        "hi",
        "--min-tokens",
        4,
        "--max-tokens",
        10,
    )
    assert code == 0 and len(out.split()) == 4 and "Generation: 5 tokens" in err


def test_chat_reads_stdin_until_quit(tq_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nthe water\n/quit\nnot read\n"))
    code, out, err = run_tq(
        capsys, "generate", "--model", tq_model, "--chat", "--max-tokens", 3, "--min-tokens", 3
    )
    assert code == 0, err
    replies = out.strip().splitlines()
    assert len(replies) == 2 and all(len(r.split()) == 3 for r in replies)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))  # EOF ends too
    code, out, _ = run_tq(capsys, "generate", "--model", tq_model, "--chat", "-m", 2)
    assert code == 0 and len(out.strip().splitlines()) <= 1


def test_generate_converts_a_float_model_once(float_model, offline_cache, capsys):
    argv = ["generate", "--model", float_model, "--prompt", "hi", "-m", 3, "--min-tokens", 3]
    code, out, err = run_tq(capsys, *argv, "--preset", "tq3")
    assert code == 0, err
    cached = offline_cache / "tq" / "tiny-llama-tq3"
    assert f"cached in {cached}" in err
    quant = json.loads((cached / "config.json").read_text())["quantization"]
    assert quant["method"] == "turboquant" and quant["bits"] == 3
    assert json.loads((cached / "tq-source.json").read_text())["source"] == str(float_model)
    code, out2, err = run_tq(capsys, *argv, "--preset", "tq3")
    assert code == 0 and "converting" not in err and out2 == out


def test_default_model_is_used_without_model(float_model, offline_cache, capsys):
    """With the default model's float directory in the cache, `tq generate` converts it to tq4
    (cached) and generates: no network is touched."""
    from tq_cli.default_model import MODEL_NAME, default_model_dir

    default = offline_cache / MODEL_NAME
    default.mkdir(parents=True)
    for f in float_model.iterdir():
        (default / f.name).write_bytes(f.read_bytes())
    assert default_model_dir() == default
    code, out, err = run_tq(capsys, "generate", "--prompt", "hi", "-m", 2, "--min-tokens", 2)
    assert code == 0, err
    assert (offline_cache / "tq" / f"{MODEL_NAME}-tq4" / "config.json").exists()
    assert len(out.split()) == 2


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_corrupt_checkpoint_is_a_one_line_error(tq_model, data_file, tmp_path, capsys, command):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tq_model.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    if command == "generate":
        code, _, err = run_tq(capsys, "generate", "--model", broken, "--prompt", "hi")
        prefix = "tq generate: "
    else:
        code, _, err = run_tq(capsys, "eval", "ppl", "--model", broken, "--data", data_file)
        prefix = "tq eval ppl: "
    line = assert_one_line_error(code, err, prefix)
    assert shard.name in line and "truncated" in line


def test_generate_missing_model_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_tq(capsys, "generate", "--model", tmp_path / "nope", "--prompt", "hi")
    assert "no such model directory" in assert_one_line_error(code, err, "tq generate: ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-tokens", "0"], "--max-tokens"),
        (["--top-p", "0"], "--top-p"),
        (["--temp", "-1"], "--temp"),
        (["--chat", "--prompt", "x"], "not both"),
    ],
)
def test_generate_bad_arguments(tq_model, capsys, args, message):
    code, _, err = run_tq(capsys, "generate", "--model", tq_model, *args)
    assert message in assert_one_line_error(code, err, "tq generate: ")


# --------------------------------------------------------------------------- eval


# --------------------------------------------------------------------------- KV cache


def test_generate_with_turboquant_kv_cache(tq_model, capsys):
    base = ["generate", "--model", tq_model, "--prompt", "hi " * 200, "--max-tokens", 6]
    base += ["--min-tokens", 6, "--no-chat-template"]
    code, fp_out, fp_err = run_tq(capsys, *base)
    assert code == 0 and "KV cache:" not in fp_err
    argv = [*base, "--kv-k-bits", 8, "--kv-v-bits", 8, "--kv-sink", 4, "--kv-buffer", 4]
    code, out, err = run_tq(capsys, *argv)
    assert code == 0, err
    assert len(out.split()) == 6 and "tokens-per-sec" in err
    line = next(x for x in err.splitlines() if x.startswith("KV cache:"))
    ratio = float(line.split("compression ")[1].rstrip("x"))
    assert 1.0 < ratio < 4.0  # 8-bit codes with 8 fp16 tokens per layer kept
    code, _, err = run_tq(
        capsys, *base, "--kv-bits", 3, "--kv-key-mode", "prod", "--kv-sink", 0, "--kv-buffer", 0
    )
    assert code == 0, err
    ratio = float(err.split("compression ")[1].split("x")[0])
    assert ratio > 1.5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kv-bits", "5"], "--kv-k-bits"),
        (["--kv-bits", "3", "--kv-k-bits", "4"], "not both"),
        (["--kv-k-bits", "4"], "go together"),
        (["--kv-bits", "3", "--kv-sink", "-1"], "--kv-sink"),
    ],
)
def test_generate_bad_kv_arguments(tq_model, capsys, args, message):
    code, _, err = run_tq(capsys, "generate", "--model", tq_model, *args)
    assert message in assert_one_line_error(code, err, "tq generate: ")
