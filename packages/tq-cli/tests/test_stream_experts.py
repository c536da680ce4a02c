"""`tq generate --stream-experts`, `tq calibrate-experts`, `tq repack-experts` on a tiny MoE."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tq_cli_testkit import VOCAB, assert_one_line_error, run_tq, write_text, write_tokenizer

QWEN3_MOE = {
    "model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "rms_norm_eps": 1e-5, "vocab_size": VOCAB, "tie_word_embeddings": False,
    "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "moe_intermediate_size": 64, "norm_topk_prob": True,
    "rope_theta": 10000.0, "max_position_embeddings": 512, "bos_token_id": 1,
    "eos_token_id": 2,
}  # fmt: skip
GEN = ["--prompt", "the water of time", "--max-tokens", 8, "--temp", 0, "--min-tokens", 8]


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    from tq_cli.main import main
    from tq_core.lm.load import build_model

    root = tmp_path_factory.mktemp("moe")
    src = root / "float"
    src.mkdir()
    mx.random.seed(3)
    model = build_model(dict(QWEN3_MOE))
    params = {k: (v * 8 if "gate.weight" in k else v) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(src / "model.safetensors"), params)  # routers spread: see test
    (src / "config.json").write_text(json.dumps(QWEN3_MOE))
    write_tokenizer(src)
    tq = root / "tq"
    assert main(["convert", "--model", str(src), "--out", str(tq), "--bits", "4"]) == 0
    return root, tq


def test_streamed_generation_equals_resident(moe_dirs, capsys):
    root, tq = moe_dirs
    code, resident, _ = run_tq(capsys, "generate", "--model", tq, *GEN)
    assert code == 0
    stats = root / "stats.json"
    code, streamed, err = run_tq(
        capsys, "generate", "--model", tq, *GEN, "--stream-experts",
        "--expert-cache-gb", 2e-5, "--prefetch-workers", 2, "--stats-json", stats,
    )  # fmt: skip
    assert code == 0, err
    assert streamed == resident
    line = next(x for x in err.splitlines() if x.startswith("Experts:"))
    assert "hit rate" in line and "GB/s" in line and "ms/token" in line
    report = json.loads(stats.read_text())["experts"]
    assert report["bytes_read"] > 0 and report["evictions"] > 0
    assert report["cache_bytes"] <= report["budget_bytes"]


def test_calibrate_pin_and_repack(moe_dirs, capsys):
    root, tq = moe_dirs
    text = write_text(root / "calib.txt", words=300)
    code, _, err = run_tq(
        capsys, "calibrate-experts", "--model", tq, "--data", text, "--tokens", 200,
        "--seq-len", 64, "--pin-gb", 1.5e-5, "--out", root,
    )  # fmt: skip
    assert code == 0, err
    pins = json.loads((root / "pin.json").read_text())
    perm = json.loads((root / "perm.json").read_text())
    layers = sorted(perm["layers"])
    assert len(layers) == 2 and all(sorted(v) == list(range(8)) for v in perm["layers"].values())
    assert 0 < pins["bytes"] <= 1.5e-5 * 2**30 and pins["tokens"] == 200
    assert sum(sum(c) for c in pins["counts"].values()) == 200 * 2 * 2  # top-2, 2 layers
    _, resident, _ = run_tq(capsys, "generate", "--model", tq, *GEN)
    code, pinned, err = run_tq(
        capsys, "generate", "--model", tq, *GEN, "--stream-experts", "--expert-cache-gb",
        4e-5, "--pin-file", root / "pin.json", "--prefetch-ahead",
    )  # fmt: skip
    assert code == 0, err
    assert pinned == resident
    out = root / "repacked"
    code, _, err = run_tq(
        capsys, "repack-experts", "--model", tq, "--perm", root / "perm.json", "--out", out
    )
    assert code == 0, err
    code, repacked, _ = run_tq(capsys, "generate", "--model", out, *GEN)
    assert code == 0 and repacked == resident  # the same function, experts renumbered
    code, _, err = run_tq(
        capsys, "repack-experts", "--model", tq, "--perm", root / "perm.json", "--out", out
    )
    assert "already exists" in assert_one_line_error(code, err, "tq repack-experts: ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stream-experts", "--expert-cache-gb", "-1"], "--expert-cache-gb must be positive"),
        (["--expert-cache-gb", "1"], "need --stream-experts"),
        (["--stream-experts", "--prefetch-workers", "0"], "--prefetch-workers"),
        (["--stream-experts", "--expert-cache-gb", "1e-9"], "smaller than one layer's top-2"),
        (["--stream-experts", "--pin-file", "/nonexistent/pin.json"], "--pin-file"),
    ],
)
def test_bad_streaming_arguments(moe_dirs, capsys, args, message):
    _, tq = moe_dirs
    code, _, err = run_tq(capsys, "generate", "--model", tq, "--prompt", "hi", *args)
    assert message in assert_one_line_error(code, err, "tq generate: ")


def test_bad_perm_file(moe_dirs, capsys, tmp_path):
    _, tq = moe_dirs
    perm = tmp_path / "perm.json"
    perm.write_text(json.dumps({"layers": {"model.layers.0.mlp.switch_mlp": [0, 0, 1]}}))
    code, _, err = run_tq(
        capsys, "repack-experts", "--model", tq, "--perm", perm, "--out", tmp_path / "o"
    )
    assert "not a permutation" in assert_one_line_error(code, err, "tq repack-experts: ")
    assert not (tmp_path / "o").exists()
