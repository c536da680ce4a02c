"""kv_fidelity: the expected reconstruction cosine matches what random vectors measure."""

from __future__ import annotations

import mlx.core as mx
import pytest


@pytest.mark.parametrize(("mode", "bits"), [("mse", 2), ("mse", 3), ("mse", 4), ("prod", 3)])
def test_expected_cosine_matches_random_vectors(mode, bits):
    """On isotropic vectors the reconstruction cosine is the codebook's expectation."""
    from tq_cli.kv_fidelity import cosine, expected_cosine
    from tq_kvcache import TurboQuantKVCache

    mx.random.seed(bits)
    x = mx.random.normal((1, 2, 2048, 64))
    cache = TurboQuantKVCache(k_bits=bits, v_bits=bits, key_mode=mode, sink_tokens=0, buffer=0)
    cache.update_and_fetch(x, x)
    cache.compress()
    _, _, k_codes, _, _, _ = cache.segments()
    codec = cache.codecs[0]
    measured = mx.mean(cosine(codec.decode(k_codes), x)).item()
    assert measured == pytest.approx(expected_cosine(codec, x), abs=2e-3)
