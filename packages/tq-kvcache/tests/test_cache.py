"""TurboQuantKVCache protocol: layout (sinks, flush batches, min_tokens), trim, state, errors,
reconstruction quality against the codebook's distortion, bytes."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache
from tq_core.codebook import sphere_codebook
from tq_kvcache import (
    TurboQuantKVCache,
    TurboQuantRotatingKVCache,
    cache_attention,
    convert_cache,
)


def _kv(n, b=1, h=2, d=64, seed=0):
    mx.random.seed(seed)
    return mx.random.normal((b, h, n, d)), mx.random.normal((b, h, n, d))


def _cos(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return mx.sum(a * b, -1) / (mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("bad", [0, 5, 2.7, True, "3", None, 16])
def test_bad_bits_are_refused(bad):
    with pytest.raises(ValueError, match="k_bits"):
        TurboQuantKVCache(k_bits=bad)
    with pytest.raises(ValueError, match="v_bits"):
        TurboQuantKVCache(v_bits=bad)


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError, match="key_mode"):
        TurboQuantKVCache(key_mode="qjl")
    with pytest.raises(ValueError, match="sink_tokens"):
        TurboQuantKVCache(sink_tokens=-1)
    with pytest.raises(ValueError, match="buffer"):
        TurboQuantKVCache(buffer=1.5)
    with pytest.raises(ValueError, match="max_size"):
        TurboQuantRotatingKVCache(max_size=0)


def test_unsupported_head_dim_and_prod_eight_bits():
    k, v = _kv(4, d=20)
    with pytest.raises(ValueError, match="head_dim"):
        TurboQuantKVCache().update_and_fetch(k, v)
    k, v = _kv(4)
    with pytest.raises(ValueError, match="prod"):
        TurboQuantKVCache(k_bits=8, key_mode="prod").update_and_fetch(k, v)


def test_other_model_shape_is_refused():
    cache = TurboQuantKVCache()
    cache.update_and_fetch(*_kv(3))
    with pytest.raises(ValueError, match="another model"):
        cache.update_and_fetch(*_kv(1, h=4))


def test_layout_sinks_flush_batches_and_buffer():
    cache = TurboQuantKVCache(k_bits=4, v_bits=4, sink_tokens=5, buffer=7, flush_batch=4)
    k, v = _kv(40)
    for t in range(40):
        keys, values = cache.update_and_fetch(k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert keys.shape[2] == t + 1 == cache.offset == cache.size()
        packed = cache.packed_codes()[0]
        n_packed = next(iter(packed.values())).shape[2] if packed else 0
        tail = t + 1 - 5 - n_packed if t >= 5 else 0
        assert n_packed % 4 == 0 and 7 <= tail + (0 if n_packed else 7) and tail <= 7 + 4
    # sinks and tail come back exactly; packed tokens approximately
    np.testing.assert_array_equal(np.array(keys[:, :, :5]), np.array(k[:, :, :5]))
    np.testing.assert_array_equal(np.array(keys[:, :, -7:]), np.array(k[:, :, -7:]))
    assert mx.min(_cos(keys, k)).item() > 0.97
    assert not np.array_equal(np.array(keys[:, :, 5:25]), np.array(k[:, :, 5:25]))


def test_prefill_is_not_compressed_until_next_update():
    cache = TurboQuantKVCache(sink_tokens=2, buffer=4, flush_batch=1)
    k, v = _kv(30)
    keys, _ = cache.update_and_fetch(k, v)
    np.testing.assert_array_equal(np.array(keys), np.array(k))  # prefill attends on fp16
    cache.update_and_fetch(*_kv(1, seed=1))
    assert next(iter(cache.packed_codes()[0].values())).shape[2] == 30 - 2 - 4


def test_min_tokens_defers_compression():
    cache = TurboQuantKVCache(sink_tokens=0, buffer=0, flush_batch=1, min_tokens=20)
    k, v = _kv(30)
    for t in range(30):
        cache.update_and_fetch(k[:, :, t : t + 1], v[:, :, t : t + 1])
        if t < 20:
            assert not cache.packed_codes()[0]
    assert cache.packed_codes()[0]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_reconstruction_cosine_matches_codebook_distortion(bits):
    d = 64
    cache = TurboQuantKVCache(k_bits=bits, v_bits=bits, sink_tokens=0, buffer=0, flush_batch=1)
    k, v = _kv(2048, h=2, d=d)
    cache.update_and_fetch(k, v)
    cache.compress()
    keys, values = cache._full_kv(mx.float32)
    expected = math.sqrt(1 - sphere_codebook(bits, d).distortion)
    for got, x in ((keys, k), (values, v)):
        assert abs(mx.mean(_cos(got, x)).item() - expected) < 0.003


def test_trim_then_continue():
    cache = TurboQuantKVCache(sink_tokens=3, buffer=2, flush_batch=1)
    k, v = _kv(20)
    cache.update_and_fetch(k, v)
    cache.update_and_fetch(*_kv(1, seed=2))
    assert cache.is_trimmable() and cache.trim(6) == 6
    assert cache.offset == cache.size() == 15
    keys, _ = cache.update_and_fetch(*_kv(2, seed=3))
    assert keys.shape[2] == 17
    assert cache.trim(100) == 17 and cache.empty()


def test_state_round_trip_gives_identical_attention():
    for knobs in (dict(k_bits=3, v_bits=2), dict(k_bits=3.5, v_bits=2.5, key_mode="prod")):
        cache = TurboQuantKVCache(sink_tokens=4, buffer=3, flush_batch=1, **knobs)
        cache.update_and_fetch(*_kv(50))
        cache.update_and_fetch(*_kv(1, seed=1))
        again = TurboQuantKVCache.from_state(cache.state, cache.meta_state)
        q = mx.random.normal((1, 4, 1, 64))
        np.testing.assert_array_equal(
            np.array(cache_attention(q, cache, 0.125)), np.array(cache_attention(q, again, 0.125))
        )
        assert again.offset == cache.offset and again.config() == cache.config()


def test_unknown_state_version_is_refused():
    cache = TurboQuantKVCache()
    cache.update_and_fetch(*_kv(3))
    _, meta = cache.meta_state
    with pytest.raises(ValueError, match="version"):
        TurboQuantKVCache.from_state(cache.state, ("99", meta))


def test_bytes_and_compression_ratio():
    cache = TurboQuantKVCache(k_bits=3, v_bits=2, sink_tokens=0, buffer=0, flush_batch=1)
    k, v = _kv(1024, h=8, d=128)
    cache.update_and_fetch(k.astype(mx.float16), v.astype(mx.float16))
    cache.compress()
    assert cache.dense_nbytes() == 2 * 8 * 1024 * 256
    # 3 + 2 bits per coordinate plus two fp16 norms per token and head: 512 / 84 bytes.
    assert cache.nbytes == 8 * 1024 * (128 * 5 // 8 + 4)
    assert cache.dense_nbytes() / cache.nbytes > 4.5


def test_convert_filled_mlx_lm_caches():
    k, v = _kv(40)
    plain = KVCache()
    plain.update_and_fetch(k, v)
    rotating = RotatingKVCache(max_size=16, keep=2)
    for t in range(40):
        rotating.update_and_fetch(k[:, :, t : t + 1], v[:, :, t : t + 1])
    tq_plain, tq_rot = convert_cache([plain, rotating], k_bits=4, v_bits=4, sink_tokens=4, buffer=4)
    assert isinstance(tq_plain, TurboQuantKVCache) and tq_plain.offset == 40
    assert isinstance(tq_rot, TurboQuantRotatingKVCache) and tq_rot.offset == 40
    assert tq_rot.size() == 16 and tq_rot.keep == 2
    keys, _ = tq_rot._full_kv(mx.float32)
    want = mx.concatenate([k[:, :, :2], k[:, :, -14:]], axis=2)
    assert mx.min(_cos(keys, want)).item() > 0.98
    assert tq_plain.packed_codes()[0] and tq_plain.nbytes < plain.nbytes


def test_packed_codes_are_reused_until_the_codes_change():
    cache = TurboQuantKVCache(sink_tokens=0, buffer=0, flush_batch=1)
    cache.update_and_fetch(*_kv(8))
    cache.update_and_fetch(*_kv(1, seed=1))  # flushes the first 8 tokens
    first = cache.packed_codes()
    assert cache.packed_codes() is first  # nothing changed: the same dicts
    before = {n: np.array(a) for n, a in first[0].items()}
    # Trim one packed token and pack a different one: same count, new codes.
    cache.trim(2)
    cache.update_and_fetch(*_kv(1, seed=5))
    cache.update_and_fetch(*_kv(1, seed=6))
    after = cache.packed_codes()
    assert after is not first
    assert {n: a.shape for n, a in after[0].items()} == {n: a.shape for n, a in before.items()}
    assert any(not np.array_equal(np.array(after[0][n]), before[n]) for n in before)
    want = cache._k_codec.decode(after[0])
    assert mx.allclose(want, cache._k_codec.decode(cache.packed_codes()[0])).item()


def test_prefill_chunks_evaluate_each_layer_and_decode_does_not(monkeypatch):
    """A prefill chunk over packed tokens evaluates its keys/values and codes in
    update_and_fetch (one layer's temporaries freed before the next layer's); a decode
    step stays lazy; under mx.compile the evaluation is skipped and the result is exact."""
    from tq_kvcache import cache as cache_module

    calls = []
    real_eval = mx.eval
    monkeypatch.setattr(cache_module.mx, "eval", lambda *a: calls.append(len(a)) or real_eval(*a))
    cache = TurboQuantKVCache(sink_tokens=4, buffer=8, flush_batch=4)
    cache.update_and_fetch(*_kv(40))  # first chunk: nothing packed yet, nothing to evaluate
    assert calls == []
    keys, values = cache.update_and_fetch(*_kv(40, seed=1))  # flushes 28 tokens, then packed
    assert len(calls) == 1 and calls[0] >= 2
    cache.update_and_fetch(*_kv(1, seed=2))  # decode
    assert len(calls) == 1

    monkeypatch.setattr(cache_module, "PREFILL_EVAL", False)
    lazy = TurboQuantKVCache(sink_tokens=4, buffer=8, flush_batch=4)
    lazy.update_and_fetch(*_kv(40))
    want = lazy.update_and_fetch(*_kv(40, seed=1))
    assert len(calls) == 1
    assert mx.array_equal(keys, want[0]).item() and mx.array_equal(values, want[1]).item()

    monkeypatch.setattr(cache_module, "PREFILL_EVAL", True)
    traced = TurboQuantKVCache(sink_tokens=4, buffer=8, flush_batch=4)
    traced.update_and_fetch(*_kv(40))
    k2, v2 = _kv(40, seed=1)
    got = mx.compile(lambda k, v: traced.update_and_fetch(k, v))(k2, v2)
    assert mx.array_equal(got[0], keys).item()


@pytest.mark.parametrize("rotating", [False, True])
def test_mlx_lm_prompt_cache_copies_a_cache_after_decode(rotating):
    """mlx-lm's LRUPromptCache (its server's, and `tq serve`'s) deep-copies a stored cache
    for each request that shares its prefix: after decode steps the copy must be made, hold
    none of the original's derived state (decoded keys, kept launches), and go on exactly
    as the original does."""
    import copy

    from mlx_lm.models.cache import LRUPromptCache

    knobs = dict(k_bits=4, v_bits=3, sink_tokens=4, buffer=3, flush_batch=2)
    cache = TurboQuantRotatingKVCache(64, **knobs) if rotating else TurboQuantKVCache(**knobs)
    cache.update_and_fetch(*_kv(40))
    q = mx.random.normal((1, 4, 1, 64))
    for step in range(3):  # decode: the cache keeps derived state between steps
        cache.update_and_fetch(*_kv(1, seed=10 + step))
        cache_attention(q, cache, 0.125)
    assert cache.__dict__.get("_decoded") is not None
    lru = LRUPromptCache(max_size=4)
    lru.insert_cache("model", list(range(43)), [cache])
    (copied,), rest = lru.fetch_nearest_cache("model", list(range(43)) + [7])
    assert rest == [7] and copied is not cache
    for name in ("_decoded", "_codes_memo", "_fused_parts", "_tq_launch"):
        assert copied.__dict__.get(name) is None
    assert copy.deepcopy(cache).offset == cache.offset == copied.offset
    if not rotating:  # a shorter prompt: the copy is trimmed, the stored cache is not
        (trimmed,), rest = lru.fetch_nearest_cache("model", list(range(30)) + [500])
        assert rest == [500] and trimmed.offset == 30 and cache.offset == 43
    for c in (cache, copied):
        c.update_and_fetch(*_kv(1, seed=99))
    np.testing.assert_array_equal(
        np.array(cache_attention(q, cache, 0.125)), np.array(cache_attention(q, copied, 0.125))
    )
