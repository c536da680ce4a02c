"""Reference attention from packed codes equals dequantize-then-SDPA (the fused kernels are
compared with this reference in test_fused_attention.py)."""

import mlx.core as mx
import numpy as np
import pytest
from tq_kvcache.attention import reference_cache_attention as cache_attention
from tq_kvcache.cache import TurboQuantKVCache

# float32 on the CPU; a GPU may round float32 matmuls through TF32.
ATOL, RTOL = (2e-5, 1e-4) if mx.default_device() == mx.cpu else (2e-3, 2e-3)


def _filled_cache(b, h, d, n, dv=None, seed=0, **knobs):
    mx.random.seed(seed)
    dv = dv or d
    cache = TurboQuantKVCache(**knobs)
    k = mx.random.normal((b, h, n, d)) * (1 + mx.arange(d) / d)
    v = mx.random.normal((b, h, n, dv))
    keys, values = cache.update_and_fetch(k, v)
    cache.compress()
    return cache


def _reference(cache, q, scale, mask=None, sinks=None):
    """Dequantized keys/values of every segment, then the fp kernel (float32)."""
    sk, sv, kc, vc, tk, tv = cache.segments()
    k_codec, v_codec = cache.codecs
    ks = [x for x in (sk, k_codec.decode(kc) if kc else None, tk) if x is not None]
    vs = [x for x in (sv, v_codec.decode(vc) if vc else None, tv) if x is not None]
    keys = mx.concatenate([x.astype(mx.float32) for x in ks], axis=2)
    values = mx.concatenate([x.astype(mx.float32) for x in vs], axis=2)
    return mx.fast.scaled_dot_product_attention(
        q.astype(mx.float32), keys, values, scale=scale, mask=mask, sinks=sinks
    )


CASES = [
    # b, hq, h, d, n, L, knobs
    (1, 4, 2, 64, 100, 1, dict(k_bits=4, v_bits=3, sink_tokens=4, buffer=8)),
    (2, 6, 3, 64, 77, 1, dict(k_bits=3, v_bits=2, sink_tokens=0, buffer=0)),
    (1, 8, 8, 128, 300, 3, dict(k_bits=2, v_bits=2, sink_tokens=16, buffer=5)),
    (1, 2, 1, 96, 65, 1, dict(k_bits=8, v_bits=1, sink_tokens=1, buffer=0)),
    (1, 4, 2, 64, 90, 2, dict(k_bits=3.5, v_bits=2.5, sink_tokens=3, buffer=4)),
    (1, 4, 1, 64, 90, 1, dict(k_bits=3, v_bits=4, key_mode="prod", sink_tokens=0, buffer=3)),
    (1, 4, 2, 128, 70, 1, dict(k_bits=2.5, v_bits=3.5, key_mode="prod", sink_tokens=2, buffer=0)),
]


@pytest.mark.parametrize("b,hq,h,d,n,L,knobs", CASES)
def test_packed_attention_matches_dequantized_sdpa(b, hq, h, d, n, L, knobs):
    cache = _filled_cache(b, h, d, n, **knobs)
    assert cache.codecs[0] is not None and cache.packed_codes()[0], "nothing was packed"
    q = mx.random.normal((b, hq, L, d))
    mask = "causal" if L > 1 else None
    got = cache_attention(q, cache, scale=d**-0.5, mask=mask)
    want = _reference(cache, q, d**-0.5, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL, rtol=RTOL)


def test_boolean_and_additive_masks_and_sinks():
    b, hq, h, d, n, L = 2, 4, 2, 64, 50, 2
    cache = _filled_cache(b, h, d, n, k_bits=3, v_bits=3, sink_tokens=2, buffer=3)
    T = cache.size()
    q = mx.random.normal((b, hq, L, d))
    keep = mx.random.uniform(shape=(b, 1, L, T)) > 0.3
    keep = keep | (mx.arange(T) == T - 1)  # no fully masked row
    sinks = mx.random.normal((hq,))
    for mask in (keep, mx.where(keep, 0.0, -1e9).astype(mx.float32)):
        got = cache_attention(q, cache, scale=0.2, mask=mask, sinks=sinks)
        want = _reference(cache, q, 0.2, mask=mask, sinks=sinks)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL, rtol=RTOL)


def test_per_head_mask_and_window():
    b, hq, h, d, n = 1, 4, 2, 64, 40
    cache = _filled_cache(b, h, d, n, k_bits=4, v_bits=2, sink_tokens=0, buffer=2)
    T = cache.size()
    q = mx.random.normal((b, hq, 1, d))
    window = mx.arange(T) >= T - 16  # sliding window of 16
    got = cache_attention(q, cache, scale=0.125, mask=window)
    want = _reference(cache, q, 0.125, mask=window)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL, rtol=RTOL)
    per_head = mx.random.uniform(shape=(b, hq, 1, T)) > 0.5
    per_head = per_head | (mx.arange(T) == 0)
    got = cache_attention(q, cache, scale=0.125, mask=per_head)
    want = _reference(cache, q, 0.125, mask=per_head)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL, rtol=RTOL)


def test_float16_queries_keep_dtype():
    cache = _filled_cache(1, 2, 64, 40, k_bits=4, v_bits=4, sink_tokens=0, buffer=0)
    q = mx.random.normal((1, 2, 1, 64)).astype(mx.float16)
    out = cache_attention(q, cache, scale=0.125)
    assert out.dtype == mx.float16 and out.shape == (1, 2, 1, 64)
