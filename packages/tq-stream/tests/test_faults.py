"""Broken checkpoints and settings give a clear StreamError naming the file or setting."""

import json
import os

import mlx.core as mx
import pytest
from moe_models import save_turboquant
from tq_stream import RangeReader, StreamError, index_checkpoint, load_streaming, read_header


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_turboquant("qwen3_moe", tmp_path_factory.mktemp("ckpt") / "q")


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _shard(path):
    return next(path.glob("*.safetensors"))


def test_missing_shard(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "c")
    shard = _shard(path)
    shard.unlink()
    with pytest.raises(StreamError, match=shard.name):
        load_streaming(path, 1 << 30, tokenizer=False)


def test_truncated_shard_names_file_and_tensor(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "c")
    shard = _shard(path)
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(StreamError, match=rf"{shard.name}.*truncated"):
        read_header(shard)
    with pytest.raises(StreamError, match=shard.name):
        load_streaming(path, 1 << 30, tokenizer=False)


def test_corrupt_header(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(StreamError, match="corrupt safetensors header"):
        index_checkpoint(bad)
    bad.write_bytes(b"\x01\x02")
    with pytest.raises(StreamError, match="truncated"):
        read_header(bad)


def test_slice_out_of_file_bounds(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "c")
    shard = _shard(path)
    raw = shard.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + hlen])
    name = next(k for k in header if k.endswith("switch_mlp.gate_proj.indices"))
    lo, hi = header[name]["data_offsets"]
    header[name]["data_offsets"] = [lo + 10**9, hi + 10**9]
    text = json.dumps(header).encode()
    shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + hlen :])
    with pytest.raises(StreamError, match=rf"{shard.name}.*{name}"):
        read_header(shard)


def test_budget_below_one_layers_top_k(checkpoint):
    with pytest.raises(StreamError, match="--expert-cache-gb .* top-2 experts"):
        load_streaming(checkpoint, 1000, tokenizer=False)
    with pytest.raises(StreamError, match="--expert-cache-gb must be positive"):
        load_streaming(checkpoint, 0, tokenizer=False)
    with pytest.raises(StreamError, match="--prefetch-workers"):
        load_streaming(checkpoint, 1 << 30, workers=0, tokenizer=False)


def test_bad_pin_files(checkpoint, tmp_path):
    pin = tmp_path / "pin.json"
    pin.write_text("{oops")
    with pytest.raises(StreamError, match="--pin-file .* malformed"):
        load_streaming(checkpoint, 1 << 30, pin_file=pin, tokenizer=False)
    pin.write_text(json.dumps({"layers": {"model.layers.9.mlp": [0]}}))
    with pytest.raises(StreamError, match="not a streamed expert layer"):
        load_streaming(checkpoint, 1 << 30, pin_file=pin, tokenizer=False)
    with pytest.raises(StreamError, match="--pin-file .* missing"):
        load_streaming(checkpoint, 1 << 30, pin_file=tmp_path / "nope.json", tokenizer=False)


def test_read_error_mid_generation_is_clear(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "c")
    model, _, session = load_streaming(path, 1 << 30, tokenizer=False)
    shard = _shard(path)
    os.truncate(shard, 1000)  # the file shrinks under a running model
    with pytest.raises(StreamError, match=rf"{shard.name}: truncated"):
        mx.eval(model(mx.array([[1, 2, 3]])))
    session.close()


def test_reader_merges_adjacent_ranges(tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(bytes(range(256)))
    reader = RangeReader()
    parts = reader.read_many([(f, 10, 5), (f, 0, 10), (f, 100, 3), (f, 15, 1)])
    assert [bytes(p) for p in parts] == [
        bytes(range(10, 15)),
        bytes(range(10)),
        bytes([100, 101, 102]),
        bytes([15]),
    ]
    assert reader.stats.reads == 2  # [0, 16) in one read, [100, 103) in another
    with pytest.raises(StreamError, match="truncated"):
        reader.read(f, 250, 10)
    reader.close()


def test_prefetch_racing_a_read_keeps_one_copy(checkpoint):
    import threading
    import time

    from tq_stream import ExpertCache, ExpertLoader

    _, _, session = load_streaming(checkpoint, 1 << 30, tokenizer=False)
    lay = session.layouts[0]
    real = session.loader

    class Slow(ExpertLoader):
        def __init__(self):
            pass

        def load(self, layout, experts):
            time.sleep(0.2)
            return real.load(layout, experts)

    cache = ExpertCache(Slow(), 1 << 30)
    t = threading.Thread(target=cache.prefetch, args=(lay, [0]))
    t.start()
    time.sleep(0.05)
    cache.get(lay, [0])
    t.join()
    assert cache.nbytes == lay.expert_nbytes
    session.close()
