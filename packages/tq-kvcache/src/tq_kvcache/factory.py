"""Build TurboQuant caches for an mlx-lm model, or convert an existing mlx-lm cache list.

Per-layer cache types are preserved (DESIGN.md, KV): KVCache -> TurboQuantKVCache,
RotatingKVCache -> TurboQuantRotatingKVCache, CacheList members converted one by one;
linear-attention / SSM caches (ArraysCache, MambaCache, ...) stay as they are.
"""

from __future__ import annotations

from mlx_lm.models.cache import CacheList, KVCache, RotatingKVCache, make_prompt_cache

from .cache import TurboQuantKVCache
from .hook import install_attention_hook
from .rotating import TurboQuantRotatingKVCache

__all__ = ["make_turboquant_cache", "convert_cache", "to_turboquant"]


def to_turboquant(cache, **knobs):
    """One mlx-lm cache -> its TurboQuant counterpart (contents compressed); others unchanged."""
    if isinstance(cache, TurboQuantKVCache):
        return cache
    if isinstance(cache, CacheList):
        return CacheList(*(to_turboquant(c, **knobs) for c in cache.caches))
    if type(cache) is KVCache:
        new = TurboQuantKVCache(**knobs)
    elif type(cache) is RotatingKVCache:
        rot_knobs = {k: v for k, v in knobs.items() if k != "sink_tokens"}
        new = TurboQuantRotatingKVCache(max_size=cache.max_size, keep=cache.keep, **rot_knobs)
    else:
        return cache
    if not cache.empty() and cache.offset:
        keys, values = _temporal(cache)
        new.update_and_fetch(keys, values)
        new.offset = cache.offset
        new.compress()
    return new


def _temporal(cache):
    """Keys and values of an mlx-lm cache in temporal order."""
    if isinstance(cache, RotatingKVCache):
        return cache._temporal_order(cache.keys), cache._temporal_order(cache.values)
    return cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :]


def convert_cache(prompt_cache: list, **knobs) -> list:
    """Convert an mlx-lm prompt cache (list per layer) to TurboQuant caches."""
    return [to_turboquant(c, **knobs) for c in prompt_cache]


def make_turboquant_cache(model, max_kv_size: int | None = None, **knobs) -> list:
    """mlx-lm's ``make_prompt_cache(model)`` with attention layers as TurboQuant caches.

    ``knobs`` are :class:`TurboQuantKVCache` arguments (k_bits, v_bits, key_mode,
    sink_tokens, buffer, flush_batch, min_tokens, seed). Also installs the attention hook so
    decode attends straight from the packed codes (:mod:`tq_kvcache.hook`).
    """
    TurboQuantKVCache(**knobs)  # validate the knobs once, before touching the model
    install_attention_hook(model)
    return convert_cache(make_prompt_cache(model, max_kv_size=max_kv_size), **knobs)
