"""`tq eval kv` on tiny llamas: JSON rows, cosines against the codebook expectation, errors;
one run on the real SmolLM2 when it is present."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tq_cli_testkit import LLAMA, assert_one_line_error, run_tq, write_text, write_tiny_llama

SMOLLM2 = Path("~/.cache/tq-models/smollm2-135m-instruct").expanduser()
WIKITEXT = Path(__file__).resolve().parents[4] / "shared" / "data" / "wikitext-2-test.txt"


@pytest.fixture(scope="session")
def hd32_model(tmp_path_factory):
    """A tiny llama with head_dim 32 (fractional bits split it into two 16-channel halves)."""
    from mlx_lm.models import llama

    out = write_tiny_llama(tmp_path_factory.mktemp("hd32") / "tiny-llama-hd32")
    config = dict(LLAMA, num_attention_heads=2, num_key_value_heads=1)
    mx.random.seed(1)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def long_text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("kvdata") / "long.txt", words=1200)


def _kv(capsys, model, data, *extra):
    code, out, err = run_tq(
        capsys, "eval", "kv", "--model", model, "--data", data, "--seq-len", 96,
        "--num-seqs", 2, "--sink", 4, "--buffer", 4, "--chunk", 8, "--json", *extra,
    )  # fmt: skip
    assert code == 0, err
    return json.loads(out), err


def test_kv_rows_cosines_and_agreement(hd32_model, long_text, capsys, tmp_path):
    out_file = tmp_path / "kv.json"
    settings = "K8V8,K4V3,K3.5V3.5,K2V2,K4V3-prod"
    result, err = _kv(capsys, hd32_model, long_text, "--settings", settings, "--out", out_file)
    assert json.loads(out_file.read_text()) == result
    assert "KV cache fidelity on long.txt" in err  # the table
    assert result["eval"] == "kv" and result["prefix"] == 48 and result["chunk"] == 8
    assert result["tokens_scored"] == 2 * (96 - 1 - 48)
    rows = {(r["setting"], r["sink"]): r for r in result["rows"]}
    ref = result["rows"][0]
    assert ref["setting"] == "fp16" and ref["top1_agreement"] == 1.0
    assert len(rows) == 1 + 5 * 2  # every setting at 4/4 and at 0/0
    for r in result["rows"][1:]:
        assert r["layers"] == [0, 1] and 0 < r["packed_fraction"] < 1
        for key in ("k_cos", "v_cos", "attn_cos", "k_cos_expected", "v_cos_expected"):
            assert len(r[key]) == 2 and all(-1 <= c <= 1 for c in r[key]), (key, r[key])
        assert 0 <= r["top1_agreement"] <= 1 and math.isfinite(r["ppl"])
    k8, k2 = rows[("K8V8", 4)], rows[("K2V2", 4)]
    assert k8["ppl_ratio"] == pytest.approx(1, abs=0.01) and k8["top1_agreement"] >= 0.95
    assert min(k8["k_cos"] + k8["v_cos"] + k8["attn_cos"]) > 0.999
    assert k8["k_cos_max_abs_deviation"] < 1e-3
    assert k2["k_cos_mean"] < 0.97 and k2["attn_cos_mean"] < k8["attn_cos_mean"]
    assert abs(k2["ppl_ratio"] - 1) > abs(k8["ppl_ratio"] - 1)
    assert k8["bits_per_element"] > rows[("K4V3", 4)]["bits_per_element"] > k2["bits_per_element"]
    # mse at whole bits: the expectation is sqrt(1 - D_b) of the sphere codebook (d = 32).
    from tq_core.codebook import sphere_codebook

    for r in (rows[("K4V3", 4)], rows[("K2V2", 0)]):
        d_k = sphere_codebook(r["k_bits"], 32).distortion
        assert r["k_cos_expected"] == pytest.approx([math.sqrt(1 - d_k)] * 2, abs=1e-6)
    prod = rows[("K4V3-prod", 4)]
    assert prod["key_mode"] == "prod" and prod["k_cos_mean"] < rows[("K4V3", 4)]["k_cos_mean"]


def test_kv_greedy_agreement(tq_model, data_file, capsys):
    result, _ = _kv(
        capsys, tq_model, data_file, "--settings", "K8V8,K2V2", "--no-zero",
        "--greedy-prompts", 1, "--greedy-tokens", 6,
    )  # fmt: skip
    assert result["kind"] == "turboquant"
    assert [r["setting"] for r in result["rows"]] == ["fp16", "K8V8", "K2V2"]
    for r in result["rows"]:
        assert 0 <= r["greedy"]["agreement"] <= 1
    assert result["rows"][0]["greedy"]["agreement"] == 1.0
    greedy = result["rows"][1]["greedy"]
    assert greedy["prompts"] == 1 and greedy["tokens"] == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--settings", "K4X3"], "not a setting"),
        (["--settings", "K5V3"], "key bits must be one of"),
        (["--settings", "K4V2.7"], "value bits must be one of"),
        (["--settings", "K8V8-prod"], "prod keys take at most 4 bits"),
        (["--settings", "fp16"], "at least one TurboQuant setting"),
        (["--seq-len", 8], "--seq-len must be at least 16"),
        (["--sink", 80], "leaves nothing compressed"),
        (["--prefix", 95], "--prefix must be in"),
        (["--num-seqs", 0], "--num-seqs must be at least 1"),
        (["--sink", -1], "--sink must be >= 0"),
        (["--num-seqs", 50], "need"),
    ],
)
def test_kv_bad_input_is_one_line(float_model, data_file, capsys, args, message):
    base = ["eval", "kv", "--model", float_model, "--data", data_file, "--seq-len", 96,
            "--sink", 4, "--buffer", 4, "--chunk", 8, "--settings", "K4V3"]  # fmt: skip
    code, _, err = run_tq(capsys, *base, *args)
    assert message in assert_one_line_error(code, err, "tq eval kv: ")


def test_kv_missing_files(float_model, data_file, tmp_path, capsys):
    code, _, err = run_tq(capsys, "eval", "kv", "--model", tmp_path / "nope", "--data", data_file)
    assert "no such model directory" in assert_one_line_error(code, err, "tq eval kv: ")
    code, _, err = run_tq(
        capsys, "eval", "kv", "--model", float_model, "--data", tmp_path / "missing.txt"
    )
    assert "no such file" in assert_one_line_error(code, err, "tq eval kv: ")


@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").exists(), reason=f"no model at {SMOLLM2}")
@pytest.mark.skipif(not WIKITEXT.is_file(), reason=f"no WikiText-2 test text at {WIKITEXT}")
def test_kv_on_smollm2(capsys):
    """Real keys and values: per-layer cosines near sqrt(1 - D_b), perplexity near fp16."""
    code, out, err = run_tq(
        capsys, "eval", "kv", "--model", SMOLLM2, "--data", WIKITEXT, "--seq-len", 320,
        "--num-seqs", 1, "--prefix", 192, "--sink", 32, "--buffer", 32, "--no-zero",
        "--settings", "K4V3", "--json",
    )  # fmt: skip
    assert code == 0, err
    row = json.loads(out)["rows"][1]
    assert len(row["layers"]) == 30
    assert row["k_cos_max_abs_deviation"] < 0.005 and row["v_cos_max_abs_deviation"] < 0.005
    assert row["attn_cos_mean"] > 0.99 and row["ppl_ratio"] < 1.1
