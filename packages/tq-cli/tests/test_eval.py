"""`tq eval ppl` on a tiny llama: TurboQuant, float and affine rows, errors."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from tq_cli_testkit import (
    TINY_LAYERS,
    VOCAB,
    assert_one_line_error,
    run_tq,
)


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
