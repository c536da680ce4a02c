"""Route mlx-lm attention over TurboQuant caches to attention from the packed codes.

mlx-lm's attention modules call ``scaled_dot_product_attention(q, k, v, cache=cache, ...)``,
imported by name from ``mlx_lm.models.base`` into each model module; that function already
dispatches on the cache (``hasattr(cache, "bits")`` for its QuantizedKVCache). We wrap it the
same way, without editing mlx-lm: the module globals of the model's own classes are pointed at
:func:`turboquant_sdpa`, which sends TurboQuant caches with few queries (decode) to
:func:`tq_kvcache.attention.cache_attention` and everything else to the original function
(prefill, fp16 caches, other layers). Installing is idempotent and harmless for other caches.
"""

from __future__ import annotations

import sys

import mlx_lm.models.base as mlx_base

from .attention import cache_attention
from .cache import TurboQuantKVCache

__all__ = ["install_attention_hook", "turboquant_sdpa", "original_sdpa"]

#: mlx-lm's own function, kept before anything is patched.
original_sdpa = getattr(mlx_base.scaled_dot_product_attention, "_tq_original", None) or (
    mlx_base.scaled_dot_product_attention
)


def turboquant_sdpa(queries, keys, values, cache, scale, mask, sinks=None):
    """Drop-in for ``mlx_lm.models.base.scaled_dot_product_attention``."""
    if isinstance(cache, TurboQuantKVCache) and cache.uses_packed_attention(queries.shape[2]):
        return cache_attention(queries, cache, scale=scale, mask=mask, sinks=sinks)
    return original_sdpa(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


turboquant_sdpa._tq_original = original_sdpa


def install_attention_hook(model) -> int:
    """Point every model module that imported mlx-lm's SDPA at :func:`turboquant_sdpa`.

    Returns the number of modules patched now (0 when already installed).
    """
    names = {type(m).__module__ for _, m in model.named_modules()} | {type(model).__module__}
    patched = 0
    for name in sorted(names):
        module = sys.modules.get(name)
        if getattr(module, "scaled_dot_product_attention", None) is original_sdpa:
            module.scaled_dot_product_attention = turboquant_sdpa
            patched += 1
    return patched
