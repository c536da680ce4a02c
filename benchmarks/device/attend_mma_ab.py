"""Packed-KV decode attention per step with the attend kernel's packed splits on the tensor
cores (mma) and on the SIMT body, side by side in one process, with fp16 SDPA as the
reference point, and the largest difference between the two kernels' outputs.

usage: python benchmarks/device/attend_mma_ab.py [--contexts 4096,32768,131072]
           [--settings K4V3,K3V2] [--calls 16] [--json F]
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
import tq_kernels.attention as attention
from tq_cli.atomic_write import write_text_atomic
from tq_cli.bench_kernels import time_per_call
from tq_cli.bench_kv import _tq_cache, parse_settings
from tq_kvcache.attention import cache_attention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--settings", default="K4V3,K3V2")
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for T in (int(x) for x in a.contexts.split(",")):
        copies = max(1, min(a.calls, -(-(256 << 20) // (2 * 8 * T * 128 * 2))))
        q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
        kv = []
        for i in range(copies):
            k = mx.random.normal((1, 8, T, 128), key=mx.random.key(2 * i)).astype(mx.float16)
            v = mx.random.normal((1, 8, T, 128), key=mx.random.key(2 * i + 1)).astype(mx.float16)
            mx.eval(k, v)
            kv.append((k, v))
        sec = time_per_call(
            lambda c, kv=kv, q=q: [
                mx.fast.scaled_dot_product_attention(q, *kv[i % len(kv)], scale=0.088)
                for i in range(c)
            ],
            a.calls,
            3,
        )
        fp16 = sec * 1e6
        emit({"context": T, "kind": "fp16", "us_per_call": round(fp16, 1)})
        for s in parse_settings(a.settings):
            caches = [_tq_cache(k, v, s["knobs"]) for k, v in kv[: max(1, copies // 2)]]
            outs = {}
            for mma in (True, False, True):
                attention.MMA_ATTEND = mma
                out = cache_attention(q, caches[0], 0.088)
                mx.eval(out)
                outs[mma] = out.astype(mx.float32)
                sec = time_per_call(
                    lambda c, cs=caches, q=q: [
                        cache_attention(q, cs[i % len(cs)], 0.088) for i in range(c)
                    ],
                    a.calls,
                    3,
                )
                us = sec * 1e6
                emit(
                    {
                        "context": T,
                        "kind": s["name"],
                        "mma": mma,
                        "us_per_call": round(us, 1),
                        "speedup_vs_fp16": round(fp16 / us, 2),
                    }
                )
            diff = float(mx.abs(outs[True] - outs[False]).max())
            scale = float(mx.abs(outs[False]).max())
            emit({"context": T, "kind": s["name"], "mma_vs_simt_max_rel_diff": diff / scale})
            attention.MMA_ATTEND = False
            del caches
        del kv
        mx.clear_cache()
    if a.json:
        write_text_atomic(a.json, json.dumps({"benchmark": "attend_mma_ab", "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
