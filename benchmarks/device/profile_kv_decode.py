"""Where a decode step's time goes with a TurboQuant cache: the whole step, the step with
attention replaced by a no-op (so cache updates and the rest of the model remain), for the
fp16 cache and TurboQuant caches, after a prefill of --context tokens (random weights); for
TurboQuant also the step with the attention kernels stubbed (outputs of their shapes: the
host and graph cost of the attention path) and every layer's attention alone, chained over
the model's own caches in one eval.

usage: python benchmarks/device/profile_kv_decode.py --model-dir DIR [--context 8192]
           [--settings K4V3,K3V2] [--tokens 32] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
from tq_cli import bench_kv, bench_kv_model
from tq_cli.atomic_write import write_text_atomic


def step_time(model, cache, tok, tokens):
    """(ms per token, last token): the median of 3 rounds of ``tq bench kv``'s
    evaluate-each-token decode loop."""
    times = []
    for _ in range(3):
        rate, tok = bench_kv_model.decode_rate(model, tok, cache, tokens)
        times.append(1.0 / rate)
    return statistics.median(times) * 1e3, tok


def stubbed_step(model, cache, tok, tokens):
    from tq_kernels import attention, zeros_kernel_factory

    saved = attention._attend_kernel, attention._finish_kernel
    attention._attend_kernel = attention._finish_kernel = zeros_kernel_factory
    try:
        return step_time(model, cache, tok, tokens)
    finally:
        attention._attend_kernel, attention._finish_kernel = saved


def attention_alone(model, cache) -> float:
    """ms for one decode step's attention of every layer, chained, on the model's caches."""
    from tq_kvcache.attention import cache_attention

    args = model.args
    heads, dim = args.num_attention_heads, args.hidden_size // args.num_attention_heads
    dim = getattr(args, "head_dim", None) or dim
    q = mx.random.normal((1, heads, 1, dim)).astype(mx.float16)
    mx.eval(q)
    times = []
    for _ in range(4):
        mx.synchronize()
        t0 = time.perf_counter()
        outs = [cache_attention(q, c, dim**-0.5) for c in cache]
        mx.eval(outs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--settings", default="K4V3,K3V2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = bench_kv_model.random_model(args.model_dir)
    settings = bench_kv.parse_settings(args.settings)
    prompt = mx.random.randint(0, 1000, (args.context,))
    out = []
    for kind, s in [("fp16", None)] + [(x["name"], x) for x in settings]:
        cache = bench_kv_model.make_cache(model, kind, s)
        tok = bench_kv_model.prefill(model, prompt, cache)
        full, tok = step_time(model, cache, tok, args.tokens)
        # The same step with attention a no-op: what remains is the model and cache updates.
        noop = lambda q, k, v, cache=None, scale=None, mask=None, sinks=None: q  # noqa: E731
        patched = []
        for name, mod in list(__import__("sys").modules.items()):
            f = getattr(mod, "scaled_dot_product_attention", None)
            if name.startswith("mlx_lm.models.") and f is not None and callable(f):
                patched.append((mod, f))
                mod.scaled_dot_product_attention = noop
        no_attn, tok = step_time(model, cache, tok, args.tokens)
        for mod, f in patched:
            mod.scaled_dot_product_attention = f
        row = {
            "kind": kind,
            "step_ms": full,
            "no_attention_ms": no_attn,
            "attention_ms": full - no_attn,
        }
        if s is not None:
            # The step with the attention kernels replaced by outputs of their shapes (host
            # and graph cost of the attention path), and the layers' attention alone,
            # chained over the model's own caches (what `tq bench kv` times per call).
            row["stub_kernels_ms"], tok = stubbed_step(model, cache, tok, args.tokens)
            row["attention_alone_ms"] = attention_alone(model, cache)
        print(row, flush=True)
        out.append(row)
        del cache
        mx.clear_cache()
    if args.json:
        result = {"context": args.context, "rows": out}
        write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
