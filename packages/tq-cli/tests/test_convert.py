"""`tq convert` on a tiny llama: checkpoints, summaries and one-line errors."""

from __future__ import annotations

import json

import pytest
from tq_cli_testkit import (
    LLAMA,
    TINY_LAYERS,
    VOCAB,
    assert_one_line_error,
    run_tq,
)


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


def test_convert_use_qjl_round_trips_through_load(float_model, tmp_path, capsys):
    import mlx.core as mx
    from tq_core.lm import load

    out = tmp_path / "qjl"
    code, stdout, err = run_tq(
        capsys, "convert", "--model", float_model, "--out", out, "--bits", "2", "--use-qjl"
    )
    assert code == 0, err
    assert "QJL residual" in err
    layers = json.loads((out / "config.json").read_text())["quantization"]["layers"]
    assert layers and all(spec.get("qjl") is True for spec in layers.values())
    bpw = float(stdout.split("bits per weight:")[1].split()[0])
    # 2-bit codes + fp16 scale per 64, 1 sign bit + fp16 residual scale per 64, and two fp16
    # sign vectors (rotation, sketch) per layer input, as in test_checkpoint_stats_...
    n = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128) + 2 * VOCAB * 64
    signs = (2 * (6 * 64 + 128) + 2 * 64) * 16
    expected = n * (2 + 1) + 2 * (n // 64 * 16) + 2 * signs
    assert bpw == pytest.approx(expected / n, abs=1e-3)
    model, _ = load(out, tokenizer=False)
    assert model.model.layers[0].mlp.up_proj.use_qjl
    logits = model(mx.array([[1, 5, 9]]))
    assert logits.shape == (1, 3, VOCAB) and mx.all(mx.isfinite(logits)).item()


def test_convert_says_which_layers_the_group_size_leaves_float(float_model, tmp_path, capsys):
    out = tmp_path / "g128"
    code, _, err = run_tq(capsys, "convert", "--model", float_model, "--out", out,
                          "--group-size", 128)  # fmt: skip
    assert code == 0, err
    # hidden size 64: every projection reading the residual stream stays float at gs 128
    assert "stay in full precision: group size 128 does not divide their input size (64)" in err
