"""Save and load prompt caches (TurboQuant and plain mlx-lm layers) as versioned safetensors.

mlx-lm's own ``load_prompt_cache`` looks cache classes up by name in its own module, so it
cannot rebuild TurboQuant caches; this module writes one safetensors file whose metadata
holds a schema tag, a version and, per layer, the cache class and its meta state (JSON).
Arrays are stored as ``<layer>.<name>``. Loading refuses unknown versions, unknown classes
and anything that does not fit the declared layout, naming the file. Never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

from .cache import TurboQuantKVCache
from .rotating import TurboQuantRotatingKVCache

__all__ = ["FORMAT", "FORMAT_VERSION", "save_prompt_cache", "load_prompt_cache"]

FORMAT = "tq-kvcache.prompt-cache"
FORMAT_VERSION = 1
_TQ_CLASSES = {c.__name__: c for c in (TurboQuantKVCache, TurboQuantRotatingKVCache)}


def _layer_entry(cache) -> tuple[dict, dict[str, mx.array]]:
    """(JSON-able description, arrays) of one layer's cache."""
    name = type(cache).__name__
    if name in _TQ_CLASSES and type(cache) is _TQ_CLASSES[name]:
        return {"class": name, "meta": list(cache.meta_state)}, dict(cache.state)
    if type(cache) is KVCache:
        arrays = {}
        if cache.keys is not None:
            arrays = {
                "keys": cache.keys[..., : cache.offset, :],
                "values": cache.values[..., : cache.offset, :],
            }
        return {"class": name, "meta": {"offset": cache.offset}}, arrays
    if type(cache) is RotatingKVCache:
        arrays = {}
        if cache.keys is not None:
            arrays = {"keys": cache.keys, "values": cache.values}
        meta = {
            "offset": cache.offset,
            "keep": cache.keep,
            "max_size": cache.max_size,
            "idx": cache._idx,
        }
        return {"class": name, "meta": meta}, arrays
    if type(cache) is ArraysCache:
        arrays = {f"a{i}": a for i, a in enumerate(cache.cache) if a is not None}
        return {"class": name, "meta": {"size": len(cache.cache)}}, arrays
    raise TypeError(
        f"cannot save a {name} layer cache: supported are TurboQuantKVCache, "
        "TurboQuantRotatingKVCache, KVCache, RotatingKVCache and ArraysCache"
    )


def save_prompt_cache(path, cache: list, metadata: dict[str, str] | None = None) -> None:
    """Write ``cache`` (one entry per layer) and string ``metadata`` to a safetensors file."""
    path = str(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"prompt cache files end in .safetensors, got {path}")
    layers, arrays = [], {}
    for i, c in enumerate(cache):
        entry, layer_arrays = _layer_entry(c)
        layers.append(entry)
        arrays.update({f"{i}.{n}": a for n, a in layer_arrays.items()})
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps(layers),
        "user": json.dumps({str(k): str(v) for k, v in (metadata or {}).items()}),
    }
    mx.save_safetensors(path, arrays, meta)


def _rebuild(entry: dict, arrays: dict[str, mx.array]):
    name, meta = entry["class"], entry["meta"]
    if name in _TQ_CLASSES:
        return _TQ_CLASSES[name].from_state(arrays, tuple(meta))
    if name == "KVCache":
        c = KVCache()
        if arrays:
            c.keys, c.values = arrays["keys"], arrays["values"]
        c.offset = int(meta["offset"])
        return c
    if name == "RotatingKVCache":
        c = RotatingKVCache(max_size=int(meta["max_size"]), keep=int(meta["keep"]))
        if arrays:
            c.keys, c.values = arrays["keys"], arrays["values"]
        c.offset, c._idx = int(meta["offset"]), int(meta["idx"])
        return c
    if name == "ArraysCache":
        c = ArraysCache(int(meta["size"]))
        for key, a in arrays.items():
            c.cache[int(key[1:])] = a
        return c
    raise ValueError(f"unknown cache class {name!r}")


def load_prompt_cache(path, return_metadata: bool = False):
    """Read a prompt cache written by :func:`save_prompt_cache` (and its metadata if asked)."""
    path = str(path)
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such prompt cache file")
    try:
        arrays, meta = mx.load(path, return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError for malformed files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tq-kvcache prompt cache (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{path}: prompt cache format version {meta.get('format_version')!r} is not "
            f"supported (this tq-kvcache reads version {FORMAT_VERSION})"
        )
    try:
        layers = json.loads(meta["layers"])
        user = json.loads(meta.get("user", "{}"))
        per_layer: list[dict] = [{} for _ in layers]
        for key, a in arrays.items():
            i, name = key.split(".", 1)
            per_layer[int(i)][name] = a
        cache = [_rebuild(e, a) for e, a in zip(layers, per_layer)]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: corrupt prompt cache ({e})") from None
    return (cache, user) if return_metadata else cache
