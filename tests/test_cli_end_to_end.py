"""Integration: the installed `tq` command converts a tiny model, loads it, generates and
evaluates it, each step a subprocess as a user runs it (skipped when `tq` is not installed).

The tiny llama and its word-level tokenizer come from tq-cli's own tests; the model cache is a
temporary ``$TQ_MODELS_DIR`` and the Hugging Face hub is off, so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TQ = shutil.which("tq", path=os.path.dirname(sys.executable)) or shutil.which("tq")
HELPERS = Path(__file__).parents[1] / "packages/tq-cli/tests/tq_cli_testkit.py"

pytestmark = pytest.mark.skipif(TQ is None, reason="the tq console script is not installed")


def _helpers():
    spec = importlib.util.spec_from_file_location("tq_cli_test_helpers", HELPERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    drop = ("LD_PRELOAD", "_TQ_BLAS_REEXEC")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(TQ_MODELS_DIR=str(root / "models"), HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf"))
    return env


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    h = _helpers()
    base = tmp_path_factory.mktemp("e2e")
    return {
        "float": h.write_tiny_llama(base / "tiny-llama"),
        "data": h.write_text(base / "words.txt"),
        "tq": base / "tiny-tq4",
        "words": set(h.WORDS),
    }


def tq(env, *args, check=True):
    out = subprocess.run(
        [TQ, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_convert_generate_evaluate(env, files):
    out = tq(env, "convert", "--model", files["float"], "--out", files["tq"])
    assert "layers quantized: 16 (16 at 4 bits)" in out.stdout and "bits per weight:" in out.stdout
    config = json.loads((files["tq"] / "config.json").read_text())
    assert config["quantization"]["method"] == "turboquant"

    gen = tq(
        env,
        "generate",
        "--model",
        files["tq"],
        "--prompt",
        "hi",
        "--max-tokens",
        5,
        "--temp",
        0,
        "--min-tokens",
        5,
    )
    words = gen.stdout.split()
    assert len(words) == 5 and set(words) <= files["words"]
    for stat in ("Prompt: 3 tokens", "Generation: 5 tokens", "tokens-per-sec", "Peak memory"):
        assert stat in gen.stderr

    ev = tq(
        env,
        "eval",
        "ppl",
        "--model",
        files["tq"],
        "--data",
        files["data"],
        "--seq-len",
        16,
        "--num-seqs",
        2,
        "--json",
    )
    result = json.loads(ev.stdout)
    assert math.isfinite(result["ppl"]) and result["tokens"] == 30
    assert result["kind"] == "turboquant" and result["bits_per_weight"] > 4

    base = json.loads(
        tq(
            env,
            "eval",
            "ppl",
            "--model",
            files["float"],
            "--data",
            files["data"],
            "--seq-len",
            16,
            "--num-seqs",
            2,
            "--json",
        ).stdout
    )
    assert base["kind"] == "float" and base["tokens"] == 30
    assert result["ppl"] == pytest.approx(base["ppl"], rel=0.1)


def test_generate_from_a_float_model_converts_it_once(env, files):
    first = tq(env, "generate", "--model", files["float"], "--prompt", "hi", "-m", 3)
    cached = Path(env["TQ_MODELS_DIR"]) / "tq" / "tiny-llama-tq4"
    assert "converting" in first.stderr and (cached / "config.json").exists()
    second = tq(env, "generate", "--model", files["float"], "--prompt", "hi", "-m", 3)
    assert "converting" not in second.stderr and second.stdout == first.stdout


def test_errors_are_one_line_without_traceback(env, files, tmp_path):
    if not files["tq"].exists():
        tq(env, "convert", "--model", files["float"], "--out", files["tq"])
    cases = [
        (["convert", "--model", files["float"], "--out", files["tq"]], "already exists"),
        (["convert", "--model", files["float"], "--out", tmp_path / "o", "--bits", "5"],
         "--bits must be one of"),
        (["convert", "--model", tmp_path / "missing", "--out", tmp_path / "o"],
         "no such model directory"),
        (["generate", "--model", tmp_path / "missing"], "no such model directory"),
    ]  # fmt: skip
    for argv, message in cases:
        out = tq(env, *argv, check=False)
        assert out.returncode == 2, (argv, out.stderr)
        assert "Traceback" not in out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"tq {argv[0]}: ") and message in last, out.stderr
