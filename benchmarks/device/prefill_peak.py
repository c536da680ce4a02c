"""Prefill peak memory of the fp16 cache and TurboQuant caches, with and without the
per-layer evaluation of a prefill chunk (``tq_kvcache.cache.PREFILL_EVAL``), side by side in
one process (random weights of ``--model-dir``'s config; prefill as ``mlx_lm.generate``).

usage: python benchmarks/device/prefill_peak.py --model-dir DIR [--contexts 8192,32768]
           [--settings K4V3,K3V2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import mlx.core as mx
from tq_cli import bench_kv, bench_kv_model
from tq_cli.atomic_write import write_text_atomic
from tq_kvcache import cache as cache_module


def measure(model, prompt, kind, setting, prefill_eval: bool) -> dict:
    cache_module.PREFILL_EVAL = prefill_eval
    cache = bench_kv_model.make_cache(model, kind, setting)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    bench_kv_model.prefill(model, prompt, cache)
    seconds = time.perf_counter() - t0
    row = {
        "context": prompt.shape[0],
        "kind": kind if setting is None else setting["name"],
        "prefill_eval": prefill_eval,
        "prefill_peak_bytes": mx.get_peak_memory() - base,
        "cache_bytes": sum(c.nbytes for c in cache),
        "prefill_tok_per_s": prompt.shape[0] / seconds,
    }
    del cache
    mx.clear_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--settings", default="K4V3,K3V2")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = bench_kv_model.random_model(args.model_dir)
    settings = bench_kv.parse_settings(args.settings)
    vocab = model.args.vocab_size
    rows = []
    contexts = [int(x) for x in args.contexts.split(",")]
    first = contexts[0]
    for T in contexts:
        prompt = mx.random.randint(0, vocab, (T,), key=mx.random.key(T))
        runs = [("fp16", None, False)]
        runs += [("tq", s, flag) for s in settings for flag in (True, False)]
        for kind, setting, flag in runs:
            if T == first:  # compile each cache's kernels outside the measurements
                measure(model, prompt[: 2 * bench_kv_model.PREFILL_STEP + 1], kind, setting, flag)
            row = measure(model, prompt, kind, setting, flag)
            rows.append(row)
            print(json.dumps(row), flush=True)
    fp16 = {r["context"]: r["prefill_peak_bytes"] for r in rows if r["kind"] == "fp16"}
    for r in rows:
        r["peak_vs_fp16"] = r["prefill_peak_bytes"] / fp16[r["context"]]
    result = {
        "benchmark": "prefill_peak",
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "mlx_env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")},
        "rows": rows,
    }
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(
            f"{r['context']:>6} {r['kind']:>6} eval={int(r['prefill_eval'])} "
            f"peak {r['prefill_peak_bytes'] / 2**20:8.0f} MiB  {r['peak_vs_fp16']:.2f}x fp16  "
            f"prefill {r['prefill_tok_per_s']:.0f} tok/s"
        )


if __name__ == "__main__":
    main()
