"""Prompt caches as versioned safetensors: round trip with mixed layer types; bad files refused."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache
from tq_kvcache import (
    TurboQuantKVCache,
    TurboQuantRotatingKVCache,
    cache_attention,
    load_prompt_cache,
    save_prompt_cache,
)


def _filled():
    mx.random.seed(0)
    k, v = mx.random.normal((1, 2, 60, 64)), mx.random.normal((1, 2, 60, 64))
    tq = TurboQuantKVCache(k_bits=3.5, v_bits=2, sink_tokens=4, buffer=4, flush_batch=1)
    tq.update_and_fetch(k, v)
    tq.update_and_fetch(k[:, :, :1], v[:, :, :1])
    rot = TurboQuantRotatingKVCache(
        max_size=20, keep=2, k_bits=4, v_bits=3, flush_batch=1, buffer=2
    )
    for t in range(30):
        rot.update_and_fetch(k[:, :, t : t + 1], v[:, :, t : t + 1])
    plain = KVCache()
    plain.update_and_fetch(k, v)
    arrays = ArraysCache(2)
    arrays[0] = mx.ones((1, 3))
    return [tq, rot, plain, arrays]


def test_round_trip(tmp_path):
    path = tmp_path / "p.safetensors"
    cache = _filled()
    save_prompt_cache(path, cache, {"model": "tiny"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"model": "tiny"}
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    q = mx.random.normal((1, 4, 1, 64))
    for a, b in zip(cache[:2], loaded[:2]):
        assert (a.offset, a.size(), a.nbytes) == (b.offset, b.size(), b.nbytes)
        np.testing.assert_array_equal(
            np.array(cache_attention(q, a, 0.1)), np.array(cache_attention(q, b, 0.1))
        )
    np.testing.assert_array_equal(np.array(loaded[2].keys), np.array(cache[2].keys[:, :, :60]))
    assert loaded[3][1] is None and loaded[3][0].shape == (1, 3)
    # a loaded cache keeps working
    loaded[0].update_and_fetch(mx.zeros((1, 2, 1, 64)), mx.zeros((1, 2, 1, 64)))
    assert loaded[0].offset == 62


def _rewrite(path, out, **meta_changes):
    arrays, meta = mx.load(str(path), return_metadata=True)
    meta.update(meta_changes)
    mx.save_safetensors(str(out), arrays, meta)


def test_bad_files_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "p.safetensors"
    save_prompt_cache(path, _filled())
    with pytest.raises(ValueError, match="no such"):
        load_prompt_cache(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_prompt_cache(junk)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_prompt_cache(truncated)
    _rewrite(path, tmp_path / "v9.safetensors", format_version="9")
    with pytest.raises(ValueError, match="v9.safetensors.*version"):
        load_prompt_cache(tmp_path / "v9.safetensors")
    _rewrite(path, tmp_path / "other.safetensors", format="something-else")
    with pytest.raises(ValueError, match="not a tq-kvcache"):
        load_prompt_cache(tmp_path / "other.safetensors")
    layers = json.loads(mx.load(str(path), return_metadata=True)[1]["layers"])
    layers[0]["meta"][0] = "7"
    _rewrite(path, tmp_path / "state7.safetensors", layers=json.dumps(layers))
    with pytest.raises(ValueError, match="state7.safetensors.*version"):
        load_prompt_cache(tmp_path / "state7.safetensors")
    layers[0]["meta"][0] = "1"
    layers[0]["class"] = "Pickle"
    _rewrite(path, tmp_path / "cls.safetensors", layers=json.dumps(layers))
    with pytest.raises(ValueError, match="cls.safetensors.*unknown cache class"):
        load_prompt_cache(tmp_path / "cls.safetensors")


def test_wrong_shaped_arrays_are_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    save_prompt_cache(path, _filled())
    arrays, meta = mx.load(str(path), return_metadata=True)
    arrays["0.k.0.idx"] = arrays["0.k.0.idx"][..., :1]
    mx.save_safetensors(str(tmp_path / "bad.safetensors"), arrays, meta)
    with pytest.raises(ValueError, match="bad.safetensors.*malformed"):
        load_prompt_cache(tmp_path / "bad.safetensors")


def test_refuses_unsupported_cache_and_suffix(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        save_prompt_cache(tmp_path / "p.bin", [KVCache()])
    with pytest.raises(TypeError, match="cannot save"):
        save_prompt_cache(tmp_path / "p.safetensors", [object()])
