"""One packed-KV decode attention step at long context, for Nsight Compute: three warmup
steps, then the profiled one. Each step is two launches (attend, finish), so run it as
``ncu --kernel-name regex:tq_kv_ --launch-skip 6 --launch-count 2 --section ... python
benchmarks/device/ncu_attend.py [CONTEXT] [SETTING]`` (``run-kv.sh`` does, with ``NCU``)."""

from __future__ import annotations

import sys

import mlx.core as mx
from tq_cli.bench_kv import _tq_cache, parse_settings
from tq_kvcache.attention import cache_attention

T = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
(s,) = parse_settings(sys.argv[2] if len(sys.argv) > 2 else "K4V3")
q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
k = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
v = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
mx.eval(q, k, v)
cache = _tq_cache(k, v, s["knobs"])
for _ in range(4):  # 3 warmup steps, then the profiled one
    mx.eval(cache_attention(q, cache, 0.088))
mx.synchronize()
