"""Decode attention over a TurboQuant cache on the fused GPU kernels of tq-kernels.

Same contract as :func:`tq_kvcache.attention.cache_attention` (the reference, which defines
the result): rotate the query once per key part, let the kernels score the packed codes and
accumulate values in the rotated basis (split over the sequence, online softmax, GQA, the
fp16 sinks and tail in the same launch), un-rotate once. Returns ``None`` where the kernels
do not apply (no GPU, array masks, more than 16 query rows per KV head, odd head dims), and
the reference runs. A kernel that fails (a compile error) is switched off for the process
with one warning.
"""

from __future__ import annotations

import os
import warnings
from functools import cache
from operator import is_

import mlx.core as mx
from tq_core.rotation import rotate, unrotate
from tq_kernels import kernel_backend
from tq_kernels.attention import (
    MAX_ATTEND_ROWS,
    KeyPart,
    ValuePart,
    fp_splits,
    packed_kv_attention,
    raw_launcher,
    raw_layout,
    raw_queries_apply,
    tensor_core_splits,
)
from tq_kernels.attention_plan import knobs as plan_knobs

from .codec import KVCodec, _gather_channels, _scatter_channels

__all__ = ["fused_cache_attention", "fused_attention_enabled", "attend_path"]

#: Attributes this module keeps on a cache object (its kernel parts and the kept launch):
#: derived from the cache's arrays, so a copied cache leaves them behind (cache.py).
CACHE_ATTRIBUTES = ("_fused_parts", "_tq_launch")

_failed = False
#: Layouts whose kernels have run once: MLX compiles a kernel when the graph is evaluated,
#: so the first call of each layout is evaluated here, where a failure can still fall back.
_verified: set = set()


def fused_attention_enabled() -> bool:
    """False on the CPU, with ``TQ_KERNELS=0``, or after a kernel failure."""
    if _failed or os.environ.get("TQ_KERNELS", "1") == "0":
        return False
    return kernel_backend() is not None and mx.default_device() == mx.gpu


@cache
def _codebook(bits: int, width: int, sphere) -> mx.array:
    c = sphere(bits, width).centroids_mx()
    mx.eval(c)
    return c


def _parts(codec: KVCodec, codes: dict, values: bool):
    from tq_core.codebook import sphere_codebook

    parts = []
    for i, part in enumerate(codec.parts):
        if part.width % 32:
            return None
        cb = _codebook(part.mse_bits, part.width, sphere_codebook) if part.mse_bits else None
        # A rotation of one Hadamard block can be applied inside the kernels.
        signs = part.rotation.signs if part.rotation.block == part.width else None
        if values:
            parts.append(
                ValuePart(part.width, part.bits, codes[f"{i}.idx"], codes[f"{i}.norm"], cb, signs)
            )
        else:
            parts.append(
                KeyPart(
                    part.width,
                    part.mse_bits,
                    codes.get(f"{i}.idx"),
                    codes.get(f"{i}.norm"),
                    cb,
                    codes.get(f"{i}.sgn"),
                    codes.get(f"{i}.rnorm"),
                    signs,
                )
            )
    return tuple(parts)


def _cached_parts(cache, k_codec, v_codec, k_codes: dict, v_codes: dict):
    """``(keys, values, raw, layouts)``: the kernels' parts, whether raw mode applies, and
    its layouts by query shape; rebuilt only when the cache hands out new code dicts
    (:meth:`TurboQuantKVCache.packed_codes` returns the same ones until the codes change)
    and kept on the cache object, so they live and die with it."""
    memo = cache.__dict__.get("_fused_parts")
    if memo is not None and memo[0] is k_codes and memo[1] is v_codes:
        return memo[2]
    keys, values = _parts(k_codec, k_codes, False), _parts(v_codec, v_codes, True)
    raw = keys is not None and values is not None and raw_queries_apply(keys, values)
    # (keys, values, raw mode applies, raw layouts by query shape)
    prepared = (keys, values, raw, {})
    cache.__dict__["_fused_parts"] = (k_codes, v_codes, prepared)
    return prepared


def _query_rows(q: mx.array, codec: KVCodec) -> mx.array:
    """The packed-query row layout of :func:`packed_kv_attention`: rotated parts, then
    sketched parts (Algorithm 2's ``S q``)."""
    qp = _gather_channels(q, codec.perm)
    pieces = []
    for part in codec.parts:
        if part.mse_bits:
            pieces.append(rotate(qp[..., part.start : part.start + part.width], part.rotation))
    for part in codec.parts:
        if part.prod:
            pieces.append(qp[..., part.start : part.start + part.width] @ part.sketch.T)
    return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=-1)


def _unrotate_values(rot: mx.array, codec: KVCodec) -> mx.array:
    outs = [unrotate(rot[..., p.start : p.start + p.width], p.rotation) for p in codec.parts]
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)
    return _scatter_channels(out, codec.perm)


def _mask_applies(mask) -> bool:
    """The masks the fused kernels take: none, or mlx-lm's ``"causal"``."""
    return mask is None or (isinstance(mask, str) and mask == "causal")


def _route(queries, cache, mask):
    """``None`` where the fused kernels do not take this call, else ``(segments, prepared,
    layout, mma, rows)``: the cache's segments, its kernel parts, the raw-mode layout
    (``None`` in prepared mode), whether the packed splits run on the tensor cores, and the
    query rows per KV head."""
    if not fused_attention_enabled() or not _mask_applies(mask):
        return None
    segments = cache.segments()
    _, _, k_codes, v_codes, tail_k, _ = segments
    if not k_codes:
        return None  # nothing packed yet: the reference attends over fp16 tokens only
    k_codec, v_codec = cache.codecs
    b, hq, L, dk = queries.shape
    probe = next(iter(k_codes.values()))
    kv_heads = probe.shape[1]
    if hq % kv_heads or (hq // kv_heads) * L > MAX_ATTEND_ROWS or dk % 32:
        return None
    if L > 1 and (tail_k is None or tail_k.shape[2] < L):
        return None  # the queries' own tokens must sit in the fp16 tail for the causal mask
    prepared = _cached_parts(cache, k_codec, v_codec, k_codes, v_codes)
    keys, values, raw, layouts = prepared
    if keys is None or values is None or v_codec.dim % 32:
        return None
    layout, mma = None, False
    if raw:
        layout = layouts.get(queries.shape)
        if layout is None:
            kp, vp = k_codec.perm is not None, v_codec.perm is not None
            layout = layouts[queries.shape] = raw_layout(keys, values, queries.shape, kp, vp)
        mma = tensor_core_splits(layout, probe.shape[2], b * kv_heads)
    return segments, prepared, layout, mma, (hq // kv_heads) * L


def attend_path(queries, cache, mask=None) -> str:
    """Which path decode attention over ``cache`` takes for ``queries``: ``"tensor cores"``
    or ``"simt"`` (the fused kernels' packed splits) or ``"reference"``."""
    route = _route(queries, cache, mask)
    if route is None:
        return "reference"
    return "tensor cores" if route[3] else "simt"


def _launch_key(queries, segments, scale, mask, sinks) -> tuple:
    """What a kept raw-mode launch depends on beyond the cache's codecs (see
    :func:`tq_kernels.attention.raw_launcher`): arrays by identity, the rest by value."""
    sink_k, _, k_codes, v_codes, tail_k, _ = segments
    n_sink = 0 if sink_k is None else sink_k.shape[2]
    n_tail = 0 if tail_k is None else tail_k.shape[2]
    by_identity = (k_codes, v_codes, sink_k, sinks)
    return by_identity, (queries.shape, queries.dtype, mask, scale, fp_splits(n_sink + n_tail),
                         n_tail > 0, n_tail >= queries.shape[2], plan_knobs())  # fmt: skip


def _kept_launch(queries, cache, scale, mask, sinks):
    """The decode step's output through the launch kept on ``cache`` by the last call, when
    nothing it depends on changed (the common case: between two flushes of the cache a
    decode step differs from the last only in its queries and fp16 tail), else ``None``.
    This skips the routing and launch planning, the host work that kept whole-model decode
    behind the fp16 cache (docs/kvcache.md)."""
    kept = cache.__dict__.get("_tq_launch")
    if kept is None or not fused_attention_enabled() or not _mask_applies(mask):
        return None
    segments = cache.segments()
    ids, values = _launch_key(queries, segments, scale, mask, sinks)
    (kept_ids, kept_values), launch = kept
    if values != kept_values or not all(map(is_, ids, kept_ids)):
        return None
    sink_k, sink_v, _, _, tail_k, tail_v = segments
    try:
        return launch(queries, (sink_k, sink_v, tail_k, tail_v))
    except Exception:  # routed afresh by the caller, whose failure path warns and falls back
        cache.__dict__.pop("_tq_launch", None)
        return None


def fused_cache_attention(queries, cache, scale: float, mask=None, sinks=None):
    """Attention output (B, Hq, L, Dv) from the fused kernels, or ``None``."""
    global _failed
    out = _kept_launch(queries, cache, scale, mask, sinks)
    if out is not None:
        return out
    cache.__dict__.pop("_tq_launch", None)
    route = _route(queries, cache, mask)
    if route is None:
        return None
    segments, prepared, layout, mma, rows = route
    sink_k, sink_v, _, _, tail_k, tail_v = segments
    keys, values, raw, _ = prepared
    k_codec, v_codec = cache.codecs
    fp_segments = (sink_k, sink_v, tail_k, tail_v)
    launch = None
    try:
        if raw:
            launch = raw_launcher(
                queries.shape,
                queries.dtype,
                scale,
                keys,
                values,
                fp_segments,
                mask is not None,
                sinks,
                k_codec.perm,
                v_codec.perm,
                layout,
            )
            out = launch(queries, fp_segments)
        else:
            out = _prepared_attention(
                queries, scale, keys, values, fp_segments, mask, sinks, k_codec, v_codec
            )
        # One entry per compiled variant: the tensor-core splits are another kernel that
        # takes over once the context is long enough, and must be verified in turn.
        dk = queries.shape[-1]
        key = (k_codec.bits, k_codec.mode, v_codec.bits, dk, v_codec.dim, rows, queries.dtype)
        key += (mma,)
        if key not in _verified:
            mx.eval(out)
            _verified.add(key)
        if launch is not None:
            cache.__dict__["_tq_launch"] = (
                _launch_key(queries, segments, scale, mask, sinks),
                launch,
            )
    except Exception as exc:  # a compile failure must not take generation down
        _failed = True
        warnings.warn(
            f"tq: the fused KV attention kernel failed ({type(exc).__name__}: {exc}); "
            "using the reference attention for this process",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return out


def _prepared_attention(queries, scale, keys, values, fp_segments, mask, sinks, kc, vc):
    """Prod keys or rotations of several blocks: rotate/sketch the queries and un-rotate the
    output with ``mlx.core`` ops around the kernels."""
    b, hq, L, dk = queries.shape
    kv_heads = keys[0].idx.shape[1] if keys[0].bits else keys[0].sgn.shape[1]
    rep = hq // kv_heads
    qf = (queries.astype(mx.float32) * scale).reshape(b, kv_heads, rep * L, dk)
    sink_rows = None
    if sinks is not None:
        sink_rows = mx.repeat(sinks.astype(mx.float32).reshape(kv_heads, rep), L, axis=1)
    rot, fp = packed_kv_attention(
        _query_rows(qf, kc), qf, keys, values, fp_segments, L, mask is not None, sink_rows
    )
    out = _unrotate_values(rot, vc) + fp
    return out.reshape(b, hq, L, -1).astype(queries.dtype)
