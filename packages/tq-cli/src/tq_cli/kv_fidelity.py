"""KV cache fidelity: expected and measured reconstruction cosines, attention replayed per layer."""

from __future__ import annotations

import contextlib
import math
import sys

__all__ = ["cosine", "expected_cosine", "layer_fidelity", "recording_attention", "score_window"]


def _part_gains(part) -> tuple[float, float]:
    """``(a, g)`` with E<x, x^> = a |x|^2 and E|x^|^2 = g |x|^2 for one codec part.

    mse: a = g = 1 - D (centroid condition). prod: unbiased, a = 1; the QJL estimate of the
    residual r has E|q|^2 = |r|^2 (pi/2 + 1 - 1/w) for a w x w Gaussian sketch, so
    g = 1 + D (pi/2 - 1/w) with D the distortion of the (b-1)-bit mse stage (1 without one).
    """
    from tq_core.codebook import sphere_codebook

    d = sphere_codebook(part.mse_bits, part.width).distortion if part.mse_bits else 1.0
    if part.prod:
        return 1.0, 1.0 + d * (math.pi / 2 - 1.0 / part.width)
    return 1.0 - d, 1.0 - d


def expected_cosine(codec, x):
    """Expected cosine between each vector of ``x`` (B, H, N, D) and its reconstruction,
    mean over vectors: ``sum_p e_p a_p / sqrt(sum_p e_p g_p)`` with e_p the energy share of
    part p (whole bits: one part, so sqrt(1 - D_b) for mse)."""
    import mlx.core as mx

    x = x.astype(mx.float32)
    if codec.perm is not None:
        index = mx.broadcast_to(codec.perm[None, :, None, :], x.shape)
        x = mx.take_along_axis(x, index, axis=-1)
    energy = mx.maximum(mx.sum(x * x, axis=-1), 1e-30)
    a_sum = g_sum = 0.0
    for part in codec.parts:
        share = mx.sum(mx.square(x[..., part.start : part.start + part.width]), axis=-1) / energy
        a, g = _part_gains(part)
        a_sum = a_sum + a * share
        g_sum = g_sum + g * share
    return mx.mean(a_sum / mx.sqrt(g_sum)).item()


def cosine(a, b):
    """Cosine along the last axis, (...,)."""
    import mlx.core as mx

    a, b = a.astype(mx.float32), b.astype(mx.float32)
    den = mx.sqrt(mx.sum(a * a, axis=-1) * mx.sum(b * b, axis=-1))
    return mx.sum(a * b, axis=-1) / mx.maximum(den, 1e-30)


@contextlib.contextmanager
def recording_attention(model, layer_of: dict):
    """Record (queries, mask, output, scale, sinks) of every attention call of the layers in
    ``layer_of`` (id(cache) -> layer), wrapping the SDPA the model's modules call."""
    names = {type(m).__module__ for _, m in model.named_modules()} | {type(model).__module__}
    records = {"on": False, "calls": {}}
    patched = []
    for name in sorted(names):
        module = sys.modules.get(name)
        fn = getattr(module, "scaled_dot_product_attention", None)
        if fn is None:
            continue

        def recorder(queries, keys, values, cache, scale, mask, sinks=None, _fn=fn):
            out = _fn(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
            layer = layer_of.get(id(cache))
            if records["on"] and layer is not None:
                records["calls"].setdefault(layer, []).append((queries, mask, out, scale, sinks))
            return out

        module.scaled_dot_product_attention = recorder
        patched.append((module, fn))
    try:
        yield records
    finally:
        for module, fn in patched:
            module.scaled_dot_product_attention = fn


def score_window(model, window, prefix: int, chunk: int, cache, records=None) -> dict:
    """Prefill ``prefix`` tokens, then score the rest chunk by chunk: losses and argmaxes."""
    import mlx.core as mx
    import mlx.nn as nn

    n = window.shape[0]
    model(window[None, :prefix], cache=cache)
    mx.eval([c.state for c in cache])
    losses, tops = [], []
    if records is not None:
        records["on"] = True
    for start in range(prefix, n - 1, chunk):
        stop = min(start + chunk, n - 1)
        logits = model(window[None, start:stop], cache=cache)[0].astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, window[start + 1 : stop + 1], reduction="none")
        top = mx.argmax(logits, axis=-1)
        mx.eval(loss, top, [c.state for c in cache])
        losses.append(loss)
        tops.append(top)
    if records is not None:
        records["on"] = False
    return {"loss": mx.concatenate(losses), "top": mx.concatenate(tops)}


def layer_fidelity(keys, values, calls, prefix: int, knobs: dict) -> dict:
    """Replay one layer's dense keys/values/queries through a fresh cache of ``knobs``."""
    import mlx.core as mx
    from tq_kvcache import TurboQuantKVCache, cache_attention

    cache = TurboQuantKVCache(**knobs)
    cache.update_and_fetch(keys[:, :, :prefix], values[:, :, :prefix])
    mx.eval(cache.state)
    pos, attn_sum, attn_n = prefix, 0.0, 0
    for queries, mask, ref, scale, sinks in calls:
        n = queries.shape[2]
        cache.update_and_fetch(keys[:, :, pos : pos + n], values[:, :, pos : pos + n])
        out = cache_attention(queries, cache, scale=scale, mask=mask, sinks=sinks)
        cos = cosine(out, ref)
        attn_sum += mx.sum(cos).item()
        attn_n += cos.size
        pos += n
    sink_k, _, k_codes, v_codes, _, _ = cache.segments()
    start = 0 if sink_k is None else sink_k.shape[2]
    n_packed = next(iter(k_codes.values())).shape[2] if k_codes else 0
    out = {"attn": attn_sum / max(attn_n, 1), "packed": n_packed, "tokens": cache.size()}
    k_codec, v_codec = cache.codecs
    for name, codec, codes, x in (("k", k_codec, k_codes, keys), ("v", v_codec, v_codes, values)):
        if not n_packed:
            out[name], out[name + "_exp"] = None, None
            continue
        orig = x[:, :, start : start + n_packed]
        out[name] = mx.mean(cosine(codec.decode(codes), orig)).item()
        out[name + "_exp"] = expected_cosine(codec, orig)
    return out
