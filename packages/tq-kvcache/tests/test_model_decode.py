"""Inside real mlx-lm model code: the hooked decode (attention from codes) equals attention over
the dequantized cache, sliding windows and attention sinks included; 8-bit stays near fp16."""

import importlib.util
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from tq_kvcache import TurboQuantKVCache, TurboQuantRotatingKVCache, make_turboquant_cache

_spec = importlib.util.spec_from_file_location(
    "tq_kvcache_tiny_lm", Path(__file__).with_name("tiny_lm.py")
)
tiny_lm = sys.modules.setdefault("tq_kvcache_tiny_lm", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(tiny_lm)


def _decode(model, cache, prompt, steps):
    """Prefill ``prompt`` then feed fixed tokens; the logits of every decode step."""
    model(prompt[None], cache=cache)
    out = []
    for t in range(steps):
        token = mx.array([[(7 * t + 3) % tiny_lm.VOCAB]])
        out.append(model(token, cache=cache)[0, -1])
    return mx.stack(out)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt_oss"])
@pytest.mark.parametrize(
    "knobs", [dict(k_bits=3, v_bits=2), dict(k_bits=3.5, v_bits=2.5, key_mode="prod")]
)
def test_hooked_decode_equals_dequantized_attention(name, knobs, monkeypatch):
    model = tiny_lm.build(name)
    prompt = mx.array(np.random.default_rng(0).integers(0, tiny_lm.VOCAB, 40))
    knobs = dict(knobs, sink_tokens=4, buffer=3, flush_batch=2)
    cache = make_turboquant_cache(model, **knobs)
    assert any(isinstance(c, TurboQuantKVCache) for c in cache)
    if name == "gpt_oss":
        assert isinstance(cache[0], TurboQuantRotatingKVCache) and cache[0].max_size == 24
    calls = []
    import tq_kvcache.hook as hook

    real = hook.cache_attention
    monkeypatch.setattr(hook, "cache_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    packed = _decode(model, cache, prompt, 12)
    assert len(calls) == 12 * 2, "decode did not attend from the packed codes"
    monkeypatch.setattr(TurboQuantKVCache, "uses_packed_attention", lambda self, n: False)
    reference = _decode(model, make_turboquant_cache(model, **knobs), prompt, 12)
    # On a GPU the fused kernels (fast exp, float32 matmuls that may round through TF32)
    # differ from the reference path in the fourth digit; on the CPU both are float32.
    tol = 1e-4 if mx.default_device() == mx.cpu else 2e-3
    np.testing.assert_allclose(np.array(packed), np.array(reference), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
def test_eight_bit_cache_tracks_fp16(name):
    model = tiny_lm.build(name)
    prompt = mx.array(np.random.default_rng(1).integers(0, tiny_lm.VOCAB, 60))
    fp = _decode(model, make_prompt_cache(model), prompt, 8)
    tq = _decode(
        model,
        make_turboquant_cache(model, k_bits=8, v_bits=8, sink_tokens=0, buffer=0, flush_batch=1),
        prompt,
        8,
    )
    cos = mx.sum(fp * tq, -1) / (mx.linalg.norm(fp, axis=-1) * mx.linalg.norm(tq, axis=-1))
    assert mx.min(cos).item() > 0.999
    assert not np.allclose(np.array(fp), np.array(tq), atol=1e-6), "nothing was quantized"


def test_sliding_window_holds_at_most_max_size():
    model = tiny_lm.build("gpt_oss")
    cache = make_turboquant_cache(model, k_bits=4, v_bits=4, buffer=2, flush_batch=2)
    prompt = mx.array(np.arange(50) % tiny_lm.VOCAB)
    _decode(model, cache, prompt, 5)
    window = cache[0]
    assert window.offset == 55 and window.size() == 24
    assert TurboQuantKVCache.size(window) <= 24
    assert cache[1].size() == 55
