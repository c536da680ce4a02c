"""`tq bench generate` on tiny llamas: three caches per context, JSON, the plot, errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
from tq_cli_testkit import LLAMA, assert_one_line_error, run_tq, write_tokenizer

#: matplotlib is tq-cli's [plot] extra: the package's own environment may not have it.
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

#: head_dim 64: mlx-lm's 4-bit cache quantizes the head dimension in groups of 64.
WIDE_HEADS = dict(
    LLAMA, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
    max_position_embeddings=160,
)  # fmt: skip


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """A model directory with config.json and a tokenizer only (no weights)."""
    out = tmp_path_factory.mktemp("cfg") / "wide-llama"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(WIDE_HEADS))
    write_tokenizer(out)
    return out


def test_three_caches_per_context_json_and_plot(capsys, config_only, tmp_path):
    png, out = tmp_path / "gen.png", tmp_path / "gen.json"
    code, stdout, err = run_tq(
        capsys, "bench", "generate", "--model", config_only, "--random-weights",
        "--contexts", "32,96,512", "--decode-tokens", "4", "--repeats", "3",
        "--kv-bits", "3", "--kv-sink", "4", "--kv-buffer", "4",
        "--json", "--out", out, *(["--plot", png] if HAS_MATPLOTLIB else []),
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    assert result == json.loads(out.read_text())
    assert result["contexts"] == [32, 96] and result["skipped_contexts"] == [512]
    assert "random tq4 weights" in result["model"] and result["repeats"] == 3
    rows = {(r["context"], r["cache"]): r for r in result["rows"]}
    assert sorted(rows) == [(c, k) for c in (32, 96) for k in ("fp16", "mlx-q4", "turboquant")]
    for row in rows.values():
        assert "error" not in row, row
        assert len(row["runs"]) == 3 and all(r["generated"] == 4 for r in row["runs"])
        assert row["decode_tps"] > 0 and row["prefill_tps"] > 0
        assert row["peak_memory_bytes"] > 0 and row["cache_bytes"] > 0
    # at 96 tokens (past 4 sinks + 4 buffered + a 64-token flush) 3-bit codes beat mlx-lm's
    # 4-bit cache, which beats fp16
    size = {k: rows[(96, k)]["cache_bytes"] for k in ("fp16", "mlx-q4", "turboquant")}
    assert size["turboquant"] < size["mlx-q4"] < size["fp16"], size
    assert "TurboQuantKVCache" in result["caches"]["turboquant"]
    assert "allocator peak" in result["notes"][0] and "float32" in result["notes"][1]
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "context" in err and "decode tok/s" in err  # the table


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib (tq-cli[plot]) is not installed")
def test_replot_from_json(capsys, tmp_path):
    result = {
        "benchmark": "generate", "model": "m", "device": "cpu", "decode_tokens": 1,
        "caches": {"fp16": "x"}, "skipped_contexts": [], "notes": [],
        "rows": [{"context": c, "cache": "fp16", "prefill_tps": 1.0, "decode_tps": 2.0,
                  "peak_memory_bytes": 10, "cache_bytes": 5} for c in (1024, 2048)],
    }  # fmt: skip
    src, png, out_json = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "all.json"
    src.write_text(json.dumps(result))
    longer = dict(result, rows=[dict(result["rows"][0], context=131072)], skipped_contexts=[])
    (tmp_path / "r2.json").write_text(json.dumps(longer))
    code, out, err = run_tq(
        capsys, "bench", "generate", "--from-json", f"{src},{tmp_path / 'r2.json'}",
        "--plot", png, "--out", out_json,
    )  # fmt: skip
    assert code == 0, err
    assert "2048" in out and "131072" in out and png.stat().st_size > 1000
    assert json.loads(out_json.read_text())["contexts"] == [1024, 2048, 131072]


def test_missing_matplotlib_is_a_clear_error(capsys, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    src = tmp_path / "r.json"
    src.write_text(json.dumps({"benchmark": "generate", "model": "m", "device": "cpu",
                               "decode_tokens": 1, "caches": {}, "skipped_contexts": [],
                               "notes": [], "rows": []}))  # fmt: skip
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = run_tq(capsys, "bench", "generate", "--from-json", src, "--plot", "x.png")
    assert "tq-cli[plot]" in assert_one_line_error(code, err, "tq bench generate:")


@pytest.mark.parametrize(
    "flags, text",
    [
        (["--random-weights"], "--random-weights needs --model"),
        (["--repeats", "0"], "--repeats"),
        (["--from-json", "/nonexistent.json"], "cannot read"),
    ],
)
def test_bad_flags(capsys, flags, text):
    code, _, err = run_tq(capsys, "bench", "generate", *flags)
    assert text in assert_one_line_error(code, err, "tq bench generate:")


def test_contexts_past_the_model_are_refused(capsys, config_only):
    code, _, err = run_tq(
        capsys, "bench", "generate", "--model", config_only, "--random-weights",
        "--contexts", "4096",
    )  # fmt: skip
    assert "max_position_embeddings" in assert_one_line_error(code, err, "tq bench generate:")
