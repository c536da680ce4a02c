"""Tests for `tq bench stream` at a tiny size: the JSON is complete and sane, streamed runs
give the resident run's tokens, and bad arguments are one-line errors."""

import json

import pytest
from tq_cli import bench_stream, bench_stream_checkpoint, main


def test_tiny_benchmark_json(tmp_path, capsys):
    out = tmp_path / "stream.json"
    argv = ["bench", "stream", "--gb", "0.01", "--tokens", "3", "--dir", str(tmp_path / "w")]
    assert main(argv + ["--json", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert json.loads(out.read_text()) == result
    assert "sequential read" in captured.err and "streamed+prefetch" in captured.err
    assert not (tmp_path / "w" / "checkpoint").exists()  # removed without --keep

    sizes = result["sizes"]
    assert sizes["file_bytes"] >= 0.01e9
    assert sizes["expert_bytes"] + sizes["non_expert_bytes"] == sizes["tensor_bytes"]
    assert 0 < sizes["non_expert_bytes"] < sizes["expert_bytes"]
    assert result["budget_bytes"] == int(0.25 * sizes["expert_bytes"])
    assert result["model"]["num_hidden_layers"] >= bench_stream_checkpoint.MIN_LAYERS
    assert result["sequential_read"]["bytes"] == sizes["file_bytes"]
    assert result["sequential_read"]["gb_per_s"] > 0
    assert result["baseline_process"]["peak_rss_bytes"] > 0

    assert result["tokens_equal"] is True and result["logits_equal"] is True
    runs = {r["run"]: r for r in result["rows"]}
    assert list(runs) == ["resident", "streamed", "streamed+prefetch"]
    assert len(result["decode"]["resident_greedy_tokens"][0]) == 3 + 1
    for name, r in runs.items():
        assert r["tokens_equal"] and r["logits_equal"] and r["finite"]
        assert r["tok_per_s"] > 0
        assert r["peak_rss_bytes"] >= r["rss_after_load_bytes"] > 0
        if name == "resident":
            assert r["ratio_to_resident"] == 1.0
            continue
        resident = runs["resident"]
        assert r["ratio_to_resident"] == pytest.approx(r["tok_per_s"] / resident["tok_per_s"])
        assert r["prefetch_ahead"] is (name == "streamed+prefetch")
        assert 0.0 <= r["hit_rate"] <= 1.0
        assert r["hits"] + r["misses"] > 0
        assert r["cache_bytes_at_end"] <= result["budget_bytes"]
        assert r["whole_process_report"]["bytes_read"] > 0  # the cold start reads experts
        assert r["rss_target_bytes"] == result["rss_target"]["target_bytes"]
        assert isinstance(r["rss_target_met"], bool)
        assert r["cache_bytes_consistent"] is True
        decode_peak = r["decode_peak_rss_bytes"]
        assert decode_peak is None or 0 < decode_peak <= r["peak_rss_bytes"]
        frac = r["page_cache_fraction_before"]
        assert frac is None or frac < 0.05
    # each process's own peak, not the parent's (ru_maxrss would inherit it)
    assert result["baseline_process"]["peak_rss_bytes"] < 1e9
    assert "comparison" in result["rss_target"]


def test_render_marks_a_miss():
    row = {
        "run": "streamed", "tok_per_s": 1.0, "ratio_to_resident": 0.5, "hit_rate": 0.5,
        "bytes_read": 10**9, "read_gb_per_s": 1.0, "stall_ms_per_token": 2.0,
        "peak_rss_bytes": 2 * 10**9, "peak_rss_above_baseline_bytes": 1.8e9,
        "decode_peak_rss_above_baseline_bytes": None,
        "rss_target_bytes": 10**9, "rss_target_met": False, "tokens_equal": True,
        "logits_equal": False,
    }  # fmt: skip
    result = {
        "model": {"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": 16,
                  "num_experts_per_tok": 2, "hidden_size": 128, "bits": 4},
        "sizes": {"file_bytes": 10**9, "expert_bytes": 9 * 10**8},
        "budget_fraction": 0.25, "budget_bytes": 2 * 10**8, "rows": [row],
        "sequential_read": {"gb_per_s": 1.5, "bytes": 10**9, "chunk_bytes": 16 << 20},
        "baseline_process": {"peak_rss_bytes": 2 * 10**8},
        "rss_target": {"non_expert_bytes_in_memory": 10**7, "slack": 0.1},
    }  # fmt: skip
    line = bench_stream.render(result).splitlines()[3]
    assert line.split()[-2:] == ["NO", "NO"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "0"], "--budget must be in"),
        (["--budget", "1.5"], "--budget must be in"),
        (["--budget", "-0.1"], "--budget must be in"),
        (["--gb", "0"], "--gb must be positive"),
        (["--gb", "-2"], "--gb must be positive"),
        (["--tokens", "0"], "--tokens must be at least 1"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(["bench", "stream", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_not_enough_disk(tmp_path, monkeypatch, capsys):
    class Usage:
        free = 1000

    monkeypatch.setattr(bench_stream.shutil, "disk_usage", lambda _: Usage())
    assert main(["bench", "stream", "--gb", "0.01", "--dir", str(tmp_path)]) == 2
    assert "not enough disk space" in capsys.readouterr().err


def test_budget_below_one_layers_top_k(tmp_path, capsys):
    argv = ["bench", "stream", "--gb", "0.002", "--budget", "0.001", "--dir", str(tmp_path)]
    assert main(argv) == 2
    assert "less than one layer's top-" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint").exists()
