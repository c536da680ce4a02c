"""Launch geometry of the packed-KV attend kernel, swept: threads per threadgroup (= tokens
per tile) and the threadgroups aimed for over the GPU, each timed as `tq bench kv` times
one decode step (fp16 and mlx-lm 4-bit rows of the same run for the ratios).

usage: python benchmarks/device/attend_sweep.py [--contexts 32768,131072]
           [--settings K4V3,K3V2] [--threads 128,256] [--groups 528,1056,2112] [--json F]
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
from tq_cli import bench_kv
from tq_cli.atomic_write import write_text_atomic
from tq_kernels import (
    attention,
    attention_layout,
    attention_merge_source,
    attention_plan,
    attention_source,
)


def configure(threads: int, groups: int) -> None:
    modules = (
        attention,
        attention_layout,
        attention_plan,
        attention_source,
        attention_merge_source,
    )
    for module in modules:
        if hasattr(module, "ATTEND_THREADS"):
            module.ATTEND_THREADS = threads
    attention_plan._TARGET_GROUPS = attention_plan._MMA_TARGET_GROUPS = groups
    for fn in (
        attention._compiled,
        attention._attend_kernel,
        attention._finish_kernel,
        attention_plan._plan_for,
    ):
        fn.cache_clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--settings", default="K4V3,K3V2")
    ap.add_argument("--threads", default="128,256")
    ap.add_argument("--groups", default="528,1056,2112")
    ap.add_argument("--json")
    args = ap.parse_args()
    settings = bench_kv.parse_settings(args.settings)
    contexts = [int(x) for x in args.contexts.split(",")]
    rows = []
    for threads in (int(x) for x in args.threads.split(",")):
        for groups in (int(x) for x in args.groups.split(",")):
            configure(threads, groups)
            for r in bench_kv.attention_rows(contexts, settings):
                r.update(threads=threads, groups=groups)
                rows.append(r)
                print(
                    f"threads {threads:4d} groups {groups:5d} {r['context']:>7} "
                    f"{r['kind']:>12} {r['us_per_call']:8.1f} us  {r['speedup_vs_fp16']:.2f}x fp16",
                    flush=True,
                )
    if args.json:
        result = {"benchmark": "attend_sweep", "mlx": mx.__version__, "rows": rows}
        write_text_atomic(args.json, json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
