"""Decode attention straight from a TurboQuant cache: the reference path in ``mlx.core`` ops.

For queries q (B, Hq, L, D) against a cache laid out ``[fp16 sinks | packed codes | fp16
tail]`` (DESIGN.md, KV; arXiv 2504.19874 Sec. 3): scores against packed keys are
``|k_i| <R q, C[idx_i]>`` (+ the QJL term in prod mode), the value sum over packed tokens is
accumulated in the rotated basis and un-rotated once, and no fp16 key or value of a packed
token is ever built. GQA groups the ``Hq / H`` query heads of a KV head; masks are mlx-lm's
(None, "causal", boolean or additive arrays over the cache's tokens); ``sinks`` are GPT-OSS
attention-sink logits, one per query head, that join the softmax denominator only.
Computed in float32; the output has the queries' dtype. Fused kernels must match this.
"""

from __future__ import annotations

import mlx.core as mx

from .fused_attention import fused_cache_attention

__all__ = ["packed_attention", "cache_attention", "reference_cache_attention"]


def _grouped(x: mx.array, kv_heads: int) -> mx.array:
    """(B, Hq, L, D) -> (B, H, rep * L, D): the query heads sharing one KV head, stacked."""
    b, hq, L, d = x.shape
    return x.reshape(b, kv_heads, (hq // kv_heads) * L, d)


def _apply_mask(scores: mx.array, mask, num_queries: int) -> mx.array:
    """Scores (B, H, rep, L, T); ``mask`` as mlx-lm builds it for the same T tokens."""
    if mask is None:
        return scores
    L, T = scores.shape[-2:]
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask {mask!r}")
        mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]
    if mask.ndim == 4:
        b, heads = mask.shape[:2]
        kv_heads = scores.shape[1]
        if heads == 1:
            mask = mask[:, :, None]
        else:
            mask = mask.reshape(b, kv_heads, heads // kv_heads, *mask.shape[2:])
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    return scores + mask.astype(scores.dtype)


def packed_attention(
    queries: mx.array,
    segments,
    codecs,
    scale: float,
    mask=None,
    sinks: mx.array | None = None,
) -> mx.array:
    """Attention output (B, Hq, L, Dv) of ``queries`` over a cache's segments.

    ``segments`` = (sink_k, sink_v, k_codes, v_codes, tail_k, tail_v) as
    :meth:`TurboQuantKVCache.segments` returns; ``codecs`` = (k_codec, v_codec).
    """
    sink_k, sink_v, k_codes, v_codes, tail_k, tail_v = segments
    k_codec, v_codec = codecs
    b, hq, L, _ = queries.shape
    some = next(x for x in (sink_k, tail_k, *k_codes.values()) if x is not None)
    kv_heads = some.shape[1]
    if hq % kv_heads:
        raise ValueError(f"{hq} query heads do not group over {kv_heads} KV heads")
    rep = hq // kv_heads
    q = _grouped(queries.astype(mx.float32) * scale, kv_heads)  # (B, H, rep*L, D)

    parts = []  # (scores (B, H, rep*L, n), kind, payload)
    if sink_k is not None and sink_k.shape[2]:
        parts.append((q @ sink_k.astype(mx.float32).swapaxes(-1, -2), "fp", sink_v))
    n_packed = next(iter(k_codes.values())).shape[2] if k_codes else 0
    if n_packed:
        parts.append((k_codec.scores(q, k_codes), "codes", v_codes))
    if tail_k is not None and tail_k.shape[2]:
        parts.append((q @ tail_k.astype(mx.float32).swapaxes(-1, -2), "fp", tail_v))

    scores = mx.concatenate([p[0] for p in parts], axis=-1)
    T = scores.shape[-1]
    scores = _apply_mask(scores.reshape(b, kv_heads, rep, L, T), mask, L)
    peak = mx.max(scores, axis=-1, keepdims=True)
    if sinks is not None:
        sink_logits = sinks.astype(mx.float32).reshape(1, kv_heads, rep, 1, 1)
        peak = mx.maximum(peak, sink_logits)
    peak = mx.where(mx.isfinite(peak), peak, mx.zeros_like(peak))
    weights = mx.exp(scores - peak)
    denom = mx.sum(weights, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + mx.exp(sink_logits - peak)
    weights = weights.reshape(b, kv_heads, rep * L, T)

    out, start = None, 0
    for s, kind, payload in parts:
        n = s.shape[-1]
        w = weights[..., start : start + n]
        start += n
        if kind == "fp":
            piece = w @ payload.astype(mx.float32)
        else:
            piece = v_codec.weighted_sum(w, payload)
        out = piece if out is None else out + piece
    out = out.reshape(b, kv_heads, rep, L, -1) / denom
    return out.reshape(b, hq, L, -1).astype(queries.dtype)


def cache_attention(queries, cache, scale: float, mask=None, sinks=None) -> mx.array:
    """Attention over a :class:`TurboQuantKVCache`: the fused GPU kernels where they apply
    (:mod:`tq_kvcache.fused_attention`), else :func:`packed_attention`."""
    out = fused_cache_attention(queries, cache, scale, mask, sinks)
    if out is not None:
        return out
    return reference_cache_attention(queries, cache, scale, mask, sinks)


def reference_cache_attention(queries, cache, scale: float, mask=None, sinks=None) -> mx.array:
    """:func:`packed_attention` over a :class:`TurboQuantKVCache` (the reference path)."""
    return packed_attention(queries, cache.segments(), cache.codecs, scale, mask, sinks)
