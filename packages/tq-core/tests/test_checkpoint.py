"""Tests for tq_core.checkpoint: atomic writes and clear errors for broken checkpoints."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from tq_core import CheckpointError, load_weights, read_quantization, save_checkpoint
from tq_core.checkpoint import quantization_block


def _model():
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    mx.eval(m.parameters())
    return m


def _config():
    return {"model_type": "toy", "quantization": quantization_block({}, {"bits": 4})}


def test_round_trip_and_shards(tmp_path):
    m = _model()
    out = save_checkpoint(m, _config(), tmp_path / "ck", max_shard_bytes=10_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 2 and shards[0].startswith("model-00001-of-")
    assert out.stat().st_mode & 0o777 == 0o755
    w = load_weights(out)
    assert mx.array_equal(w["layers.0.weight"], m.layers[0].weight).item()
    config, quant = read_quantization(out)
    assert quant["method"] == "turboquant" and quant["format_version"] == 1


def test_existing_output_is_refused_then_replaced(tmp_path):
    out = tmp_path / "ck"
    save_checkpoint(_model(), _config(), out)
    with pytest.raises(FileExistsError):
        save_checkpoint(_model(), _config(), out)
    save_checkpoint(_model(), _config(), out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_save_leaves_nothing(tmp_path):
    bad = {"model_type": "toy", "quantization": {"not": object()}}  # not JSON-serializable
    with pytest.raises(TypeError):
        save_checkpoint(_model(), bad, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_truncated_shard_is_named(tmp_path):
    out = save_checkpoint(_model(), _config(), tmp_path / "ck")
    shard = next(out.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        w = load_weights(out)
        mx.eval(list(w.values()))


def test_missing_shard_and_tensor(tmp_path):
    out = save_checkpoint(_model(), _config(), tmp_path / "ck")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["layers.9.weight"] = next(iter(index["weight_map"].values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers.9.weight'\]"):
        load_weights(out)
    next(out.glob("*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(out)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "x"}, "not a TurboQuant checkpoint"),
        ({"quantization": {"group_size": 64, "bits": 4}}, "affine"),
        (
            {"quantization": {"method": "turboquant", "format_version": 99, "layers": {}}},
            "format version 99",
        ),
        ({"quantization": {"method": "turboquant", "format_version": 1}}, "layers"),
    ],
)
def test_bad_configs(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        read_quantization(tmp_path)


def test_garbled_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_quantization(tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        read_quantization(tmp_path / "nowhere")


def test_writer_flushes_full_shards_and_refuses_duplicates(tmp_path):
    from tq_core.checkpoint_writer import CheckpointWriter

    with CheckpointWriter(tmp_path / "ck", max_shard_bytes=1000) as writer:
        writer.add({"a": mx.zeros((200,)), "b": mx.ones((200,))})  # 800 bytes each
        # "a" went to disk when "b" did not fit beside it; nothing is published yet.
        assert len(list(writer.tmp.glob("part-*.safetensors"))) == 1
        assert not (tmp_path / "ck").exists()
        with pytest.raises(ValueError, match="added twice"):
            writer.add({"a": mx.zeros((1,))})
        out = writer.finish(_config())
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    w = load_weights(out)
    assert mx.array_equal(w["b"], mx.ones((200,))).item()


def test_writer_error_inside_block_removes_everything(tmp_path):
    from tq_core.checkpoint_writer import CheckpointWriter

    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "ck", max_shard_bytes=100) as writer:
            writer.add({"a": mx.zeros((100,)), "b": mx.zeros((100,))})
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
