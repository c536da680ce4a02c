"""Bisect why `tq bench kv`'s fp16 SDPA row at 128K reads ~650 us where a plain loop reads ~200.

usage: python benchmarks/device/bisect_sdpa.py [--context 131072] [--json F]
Each variant times mx.fast.scaled_dot_product_attention over one (k, v) copy, chained.
"""

from __future__ import annotations

import mlx.core as mx
from probe_rows import context_probe
from tq_cli.bench_kernels import time_per_call
from tq_cli.bench_kv import _context_rows, _copies, _per_step


def _sdpa_time(q, k, v, scale, calls):
    return 1e6 * time_per_call(
        lambda c: [mx.fast.scaled_dot_product_attention(q, k, v, scale=scale) for _ in range(c)],
        calls,
        3,
    )


def bench_style(T, calls, scale=128**-0.5):
    mx.random.seed(T)
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    k = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
    v = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
    mx.eval(q, k, v)
    return _sdpa_time(q, k, v, scale, calls)


def via_per_step(T, calls, eval_again=False, nbytes=False):
    mx.random.seed(T)
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    k = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
    v = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
    mx.eval(q, k, v)
    if nbytes:
        _ = k.nbytes + v.nbytes
    if eval_again:
        mx.eval([(k, v)])
    step = lambda c: mx.fast.scaled_dot_product_attention(q, *c, scale=128**-0.5)  # noqa: E731
    return 1e6 * _per_step(step, [(k, v)], calls, 3)


def rows_copy(T, calls, imports=True):
    """The fp16 part of bench_kv._context_rows, line for line."""
    if imports:
        from mlx_lm.models.base import quantized_scaled_dot_product_attention  # noqa: F401
        from tq_kernels import kernel_backend  # noqa: F401
        from tq_kvcache.attention import cache_attention  # noqa: F401

    scale = 128**-0.5
    mx.random.seed(T)
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    k = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
    v = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
    mx.eval(q, k, v)
    dense = k.nbytes + v.nbytes
    kv = [(k, v)] + [(k + 0, v + 0) for _ in range(_copies(dense, calls) - 1)]
    mx.eval(kv)
    sec = _per_step(
        lambda c: mx.fast.scaled_dot_product_attention(q, *c, scale=scale), kv, calls, 3
    )
    return sec * 1e6


def probe_style(T, calls, scale=0.088):
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    k = mx.random.normal((1, 8, T, 128), key=mx.random.key(0)).astype(mx.float16)
    v = mx.random.normal((1, 8, T, 128), key=mx.random.key(1)).astype(mx.float16)
    mx.eval(k, v)
    return _sdpa_time(q, k, v, scale, calls)


def main():
    T, rows = context_probe("bisect_sdpa")
    variants = [
        ("probe calls16", lambda: probe_style(T, 16)),
        ("via _per_step calls20", lambda: via_per_step(T, 20)),
        ("via _per_step + eval([(k, v)])", lambda: via_per_step(T, 20, eval_again=True)),
        ("via _per_step + nbytes", lambda: via_per_step(T, 20, nbytes=True)),
        ("rows_copy calls20", lambda: rows_copy(T, 20)),
        ("bench_rows calls20", lambda: _context_rows(T, [], 32, 8, 128, 20, 3)[0]["us_per_call"]),
        ("bench_style calls20", lambda: bench_style(T, 20)),
    ]
    for name, f in variants:
        rows.emit(context=T, variant=name, us_per_call=round(f(), 1))
        mx.clear_cache()
    rows.save()


if __name__ == "__main__":
    main()
