"""`tq bench kv` on the CPU: rows for every cache at a tiny context, and its argument errors."""

import pytest
from tq_cli import bench_kv
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
