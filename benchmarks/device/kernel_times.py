"""GPU time of each kernel in a chained decode-attention step, from CUPTI through
torch.profiler (torch is on the lent GPU machine; CUPTI sees MLX's kernels too): how much of
a step's wall time the attend and finish kernels take, against fp16 SDPA's kernels.

usage: python benchmarks/device/kernel_times.py [--context 131072] [--setting K4V3]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
from tq_cli.bench_kv import _tq_cache, parse_settings
from tq_kvcache.attention import cache_attention


def main():
    import torch
    from torch.profiler import ProfilerActivity, profile

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--setting", default="K4V3")
    ap.add_argument("--calls", type=int, default=16)
    a = ap.parse_args()
    torch.cuda.init()
    T = a.context
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    k = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
    v = mx.random.normal((1, 8, T, 128)).astype(mx.float16)
    mx.eval(q, k, v)
    (s,) = parse_settings(a.setting)
    caches = [_tq_cache(k, v, s["knobs"]) for _ in range(2)]
    runs = {
        "fp16": lambda: [
            mx.fast.scaled_dot_product_attention(q, k, v, scale=0.088) for _ in range(a.calls)
        ],
        s["name"]: lambda: [cache_attention(q, caches[i % 2], 0.088) for i in range(a.calls)],
    }
    for name, run in runs.items():
        for _ in range(2):
            mx.eval(run())
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(run())
        mx.synchronize()
        wall = (time.perf_counter() - t0) / a.calls * 1e6
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                mx.eval(run())
            mx.synchronize()
        print(f"== {name} at {T}: wall {wall:.1f} us per step ({a.calls} chained)", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


if __name__ == "__main__":
    main()
