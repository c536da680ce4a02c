"""fp16 SDPA and TurboQuant attention per decode step at long context, chained over 1 or N
distinct caches (the `tq bench kv` way reuses one fp16 copy once it exceeds 256 MiB; the
baseline in ../shared/device/README.md chains calls "each on its own weights").

usage: python benchmarks/device/probe_sdpa.py [--contexts 32768,131072] [--copies 1,16]
           [--setting K4V3] [--via-bench] [--json F]

With --via-bench each context is also timed by `tq bench kv`'s own `_context_rows` in the
same process: on the H100 (MLX 0.32.4) its fp16 row at 128K read 650 us where this probe
read 200 us. The cause, found with benchmarks/device/bisect_sdpa.py: the bench evaluated
its keys and values a second time, which makes MLX's SDPA over them 3.3x slower; it now
evaluates them once and the two agree (docs/kvcache.md).
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
from tq_cli.atomic_write import write_text_atomic
from tq_cli.bench_kernels import time_per_call
from tq_cli.bench_kv import _context_rows, _tq_cache, parse_settings
from tq_kvcache.attention import cache_attention


def bench_kv_rows(T: int, settings: list, calls: int) -> list[dict]:
    """`tq bench kv`'s rows for one context (fp16, mlx-lm 4-bit, the settings)."""
    return _context_rows(T, settings, 32, 8, 128, calls, 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--copies", default="1,16")
    ap.add_argument("--setting", default="K4V3")
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--via-bench", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    (setting,) = parse_settings(args.setting)
    rows = []
    for T in (int(x) for x in args.contexts.split(",")):
        q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
        for n in (int(x) for x in args.copies.split(",")):
            kv = []
            for i in range(n):
                k = mx.random.normal((1, 8, T, 128), key=mx.random.key(2 * i)).astype(mx.float16)
                v = mx.random.normal((1, 8, T, 128), key=mx.random.key(2 * i + 1)).astype(
                    mx.float16
                )
                mx.eval(k, v)
                kv.append((k, v))

            def fp16(c, kv=kv, q=q):
                return [
                    mx.fast.scaled_dot_product_attention(q, *kv[i % len(kv)], scale=0.088)
                    for i in range(c)
                ]

            sec = time_per_call(fp16, args.calls, 3)
            rows.append({"context": T, "copies": n, "kind": "fp16", "us_per_call": sec * 1e6})
            caches = [_tq_cache(k, v, setting["knobs"]) for k, v in kv]
            del kv

            def tq(c, caches=caches, q=q):
                return [cache_attention(q, caches[i % len(caches)], 0.088) for i in range(c)]

            sec = time_per_call(tq, args.calls, 3)
            rows.append(
                {"context": T, "copies": n, "kind": setting["name"], "us_per_call": sec * 1e6}
            )
            del caches
            mx.clear_cache()
            for r in rows[-2:]:
                print(json.dumps(r), flush=True)
        if args.via_bench:
            for r in bench_kv_rows(T, [setting], args.calls):
                row = {"context": T, "copies": "bench", "kind": r["kind"]}
                row["us_per_call"] = r["us_per_call"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        result = {"benchmark": "probe_sdpa", "mlx": mx.__version__, "rows": rows}
        write_text_atomic(args.json, json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
