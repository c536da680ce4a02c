"""Does evaluating an array a second time change how fast the GPU reads it afterwards?

`tq bench kv`'s fp16 SDPA row at 128K read 650 us where a plain loop read 200 us; the
difference was one extra ``mx.eval`` of the already evaluated keys and values
(benchmarks/device/bisect_sdpa.py). This times a plain reduction over arrays evaluated once
and twice, and the packed-KV attention over a cache's code arrays as built and after they
are replaced by fresh copies evaluated once.

usage: python benchmarks/device/probe_memory_state.py [--context 131072] [--json F]
"""

from __future__ import annotations

import mlx.core as mx
from probe_rows import context_probe
from tq_cli.bench_kernels import time_per_call
from tq_cli.bench_kv import _tq_cache, parse_settings
from tq_kvcache.attention import cache_attention


def _gbps(nbytes, fn, calls=20):
    sec = time_per_call(lambda c: [fn() for _ in range(c)], calls, 3)
    return round(sec * 1e6, 1), round(nbytes / sec / 1e9, 1)


def _fresh(d: dict) -> dict:
    out = {k: a + 0 if a.dtype != mx.uint32 else a | 0 for k, a in d.items()}
    mx.eval(out)
    return out


def main():
    T, rows = context_probe("memory_state")
    emit = rows.emit

    x = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
    mx.eval(x)
    us, gb = _gbps(x.nbytes, lambda: x.sum(axis=-1))
    emit(case="sum, evaluated once", us=us, gb_per_s=gb)
    mx.eval(x)
    us, gb = _gbps(x.nbytes, lambda: x.sum(axis=-1))
    emit(case="sum, same array evaluated twice", us=us, gb_per_s=gb)
    y = x + 0
    mx.eval(y)
    us, gb = _gbps(y.nbytes, lambda: y.sum(axis=-1))
    emit(case="sum, a fresh copy of it", us=us, gb_per_s=gb)
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    k = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
    v = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
    mx.eval(q, k, v)
    sdpa = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.088)  # noqa: E731
    us, gb = _gbps(2 * k.nbytes, sdpa)
    emit(case="fp16 sdpa, k/v evaluated once", us=us, gb_per_s=gb)
    mx.eval(k, v)
    us, gb = _gbps(2 * k.nbytes, sdpa)
    emit(case="fp16 sdpa, k/v evaluated twice", us=us, gb_per_s=gb)
    for s in parse_settings("K4V3,K3V2"):
        cache = _tq_cache(k, v, s["knobs"])
        nbytes = cache.nbytes
        att = lambda c=cache: cache_attention(q, c, 0.088)  # noqa: E731
        us, gb = _gbps(nbytes, att)
        emit(case=f"{s['name']} attention, cache as built", us=us, gb_per_s=gb)
        stores = (*cache._packed_k.values(), *cache._packed_v.values())
        us, gb = _gbps(sum(t.nbytes for t in stores), lambda st=stores: [t.max() for t in st])
        emit(case=f"{s['name']} max over the code stores, as built", us=us, gb_per_s=gb)
        cache._packed_k, cache._packed_v = _fresh(cache._packed_k), _fresh(cache._packed_v)
        stores = (*cache._packed_k.values(), *cache._packed_v.values())
        us, gb = _gbps(nbytes, att)
        emit(case=f"{s['name']} attention, code stores fresh copies", us=us, gb_per_s=gb)
        us, gb = _gbps(sum(t.nbytes for t in stores), lambda st=stores: [t.max() for t in st])
        emit(case=f"{s['name']} max over the code stores, fresh", us=us, gb_per_s=gb)
    rows.save()


if __name__ == "__main__":
    main()
