"""`tq bench kv` on the CPU: rows for every cache at a tiny context, and its argument errors."""

import pytest
from tq_cli import bench_kv, bench_kv_model
from tq_cli.main import main


def test_attention_rows_compare_every_cache():
    settings = bench_kv.parse_settings("K4V3,K3V2-ref")
    rows = bench_kv.attention_rows(
        [300], settings, heads=4, kv_heads=2, head_dim=64, calls=2, repeats=1
    )
    kinds = [r["kind"] for r in rows]
    assert kinds[:2] == ["fp16", "mlx-lm-4bit"] and kinds[3] == "K3V2-ref"
    assert kinds[2].startswith("K4V3")  # "(reference: no GPU)" on the CPU
    fp16 = rows[0]
    assert fp16["speedup_vs_fp16"] == pytest.approx(1.0)
    for r in rows[1:]:
        assert r["us_per_call"] > 0 and r["cache_bytes"] < fp16["cache_bytes"]
        assert r["compression_vs_fp16"] == pytest.approx(fp16["cache_bytes"] / r["cache_bytes"])
    assert "compression" in bench_kv.render({"attention": rows})
    # Each TurboQuant row says which attention path it timed (the reference on the CPU).
    assert [r.get("attend_path") for r in rows] == [None, None, "reference", "reference"]
    assert "reference" in bench_kv.render({"attention": rows})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--settings", "K9V3"], "K9V3"),
        (["--heads", "6", "--kv-heads", "4"], "multiple"),
        (["--calls", "0"], "at least 1"),
    ],
)
def test_bad_arguments_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "kv", "--contexts", "64", *argv])
    assert message in str(err.value)


def test_json_records_where_it_ran_and_mlx_graph_limits(tmp_path, monkeypatch):
    import json

    import mlx.core as mx

    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "100")
    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER", raising=False)
    out = tmp_path / "kv.json"
    argv = ["bench", "kv", "--contexts", "300", "--settings", "K4V3", "--heads", "4"]
    argv += ["--kv-heads", "2", "--head-dim", "64", "--calls", "1", "--repeats", "1"]
    assert main([*argv, "--json", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mlx"] == mx.__version__ and result["device"] == str(mx.default_device())
    assert result["mlx_env"] == {"MLX_MAX_MB_PER_BUFFER": "100"}
    assert result["time"][:2] == "20" and len(result["attention"]) == 3


def test_prefill_is_mlx_lms_and_model_rows_compare_every_cache(tmp_path, monkeypatch):
    """bench_kv_model.prefill runs mlx-lm's generate_step over the prompt (chunked, nothing
    generated), and model_rows gives each cache's peak, bytes and decode speed."""
    import mlx.core as mx
    from tq_cli_testkit import write_tiny_llama

    monkeypatch.setattr(bench_kv_model, "PREFILL_STEP", 64)
    model = bench_kv_model.random_model(str(write_tiny_llama(tmp_path / "llama")))
    prompt = mx.arange(300) % 50
    (setting,) = bench_kv.parse_settings("K4V3", sink=16, buffer=16)
    for kind in ("fp16", "tq"):
        cache = bench_kv_model.make_cache(model, kind, setting)
        tok = bench_kv_model.prefill(model, prompt, cache)
        assert tok.tolist() == [prompt[-1].item()]
        assert all(c.offset == 300 for c in cache)  # the prompt, and no generated token
    assert cache[0].packed_codes()[0]  # the TurboQuant cache holds packed tokens
    # mlx-lm's generate_step over the filled cache: the one-token prompt's step, then 5
    # steps (generate_step computes a token ahead of the one it yields; 5 tokens yielded,
    # 3 of them timed).
    rate, last = bench_kv_model.generate_rate(model, tok, cache, 3)
    assert rate > 0 and last.shape == (1,) and all(c.offset == 300 + 6 for c in cache)

    rows = bench_kv_model.model_rows(model, [300], [setting], decode_tokens=2, repeats=1)
    by_kind = {r["kind"]: r for r in rows}
    assert set(by_kind) == {"fp16", "mlx-lm-4bit", "K4V3"}
    tq, fp16 = by_kind["K4V3"], by_kind["fp16"]
    assert tq["decode_tok_per_s"] > 0 and tq["prefill_peak_bytes"] > 0
    assert tq["generate_tok_per_s"] > 0
    assert tq["generate_vs_fp16"] == tq["generate_tok_per_s"] / fp16["generate_tok_per_s"]
    assert tq["cache_bytes"] < fp16["cache_bytes"]
    assert tq["peak_vs_fp16"] == tq["prefill_peak_bytes"] / fp16["prefill_peak_bytes"]


def test_random_fill_fills_every_layer_and_reports_decode_only(tmp_path):
    """--model-fill random: every layer's cache holds the context (a TurboQuant cache packs
    it), rows carry decode speed and bytes but no prefill figures, and the table shows
    dashes for them."""
    from tq_cli_testkit import write_tiny_llama

    model = bench_kv_model.random_model(str(write_tiny_llama(tmp_path / "llama")))
    (setting,) = bench_kv.parse_settings("K4V3", sink=16, buffer=16)
    cache = bench_kv_model.make_cache(model, "tq", setting)
    tok = bench_kv_model.random_fill(model, cache, 300)
    assert tok.shape == (1,) and all(c.offset == 300 for c in cache)
    cache[0].compress()  # the last chunk waits in the fp16 tail until the next update
    assert cache[0].packed_codes()[0]

    rows = bench_kv_model.model_rows(
        model, [300], [setting], decode_tokens=2, repeats=1, fill="random"
    )
    by_kind = {r["kind"]: r for r in rows}
    tq, fp16 = by_kind["K4V3"], by_kind["fp16"]
    assert tq["fill"] == "random" and tq["prefill_tok_per_s"] is None
    assert tq["decode_tok_per_s"] > 0 and "peak_vs_fp16" not in tq
    assert tq["cache_bytes"] < fp16["cache_bytes"]
    table = bench_kv.render({"model": rows})
    assert "K4V3" in table and " - " in table
    with pytest.raises(ValueError, match="fill must be one of"):
        bench_kv_model.model_rows(model, [300], [setting], fill="zeros")


def test_model_fill_random_from_the_command_line(tmp_path, capsys):
    import json

    from tq_cli_testkit import write_tiny_llama

    model_dir = write_tiny_llama(tmp_path / "llama")
    out = tmp_path / "kv.json"
    argv = ["bench", "kv", "--no-attention", "--model", str(model_dir), "--model-contexts"]
    argv += ["300", "--settings", "K4V3", "--decode-tokens", "2", "--repeats", "1"]
    assert main([*argv, "--model-fill", "random", "--json", "--out", str(out)]) == 0
    by_kind = {r["kind"]: r for r in json.loads(out.read_text())["model"]}
    # (mlx-lm's 4-bit cache cannot quantize this tiny model's 16-wide heads: an error row)
    assert all(
        by_kind[k]["fill"] == "random" and "error" not in by_kind[k] for k in ("fp16", "K4V3")
    )
