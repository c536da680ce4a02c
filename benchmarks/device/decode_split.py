"""Where a pipelined decode step goes (the loop of mlx-lm's ``generate_step``): per token,
the host building step n + 1's graph, ``mx.async_eval`` encoding it (MLX's ``eval_gpu`` of
every op, CUDA graph work), and waiting for step n's token. The fp16 cache and TurboQuant
caches over one model (random weights), all filled by a prefill of --context tokens, then
measured in turns (a round of each cache, then the next round; medians after a warmup);
with --profile, the top host functions of each step but the first row's (cProfile).

``--weights fp16,affine3,tq3``: the rows are weight variants of the model (decode_speed.py's,
random weights) over fp16 caches instead. ``--fill random``: every layer's cache gets random
keys and values in 4K-token chunks instead of a prefill (decode speed does not depend on
what the cache holds, and a 128K prefill of a 3B model takes minutes).

usage: python benchmarks/device/decode_split.py --model-dir DIR [--context 8192]
           [--settings K4V3,K3V2 | --weights fp16,affine3,tq3] [--tokens 64] [--rounds 4]
           [--fill prefill|random] [--profile] [--json F]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_config
from probe_rows import ProbeRows
from tq_cli import bench_kv, bench_kv_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: decode_speed
from decode_speed import make_model  # noqa: E402


def split_round(model, cache, tok, tokens, profiler=None):
    """([build, encode, wait] ms per token over ``tokens`` steps, the last token)."""

    def step(y):
        return mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)

    y = step(tok)
    mx.async_eval(y)
    parts = [0.0, 0.0, 0.0]
    for _ in range(tokens):
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        nxt = step(y)
        if profiler:
            profiler.disable()
        t1 = time.perf_counter()
        mx.async_eval(nxt)
        t2 = time.perf_counter()
        y.item()
        t3 = time.perf_counter()
        parts[0] += t1 - t0
        parts[1] += t2 - t1
        parts[2] += t3 - t2
        y = nxt
    mx.eval(y)
    return [p / tokens * 1e3 for p in parts], y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--settings", default="K4V3,K3V2")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="measured rounds (after a warmup)")
    ap.add_argument("--fill", choices=("prefill", "random"), default="prefill")
    ap.add_argument(
        "--weights",
        help="compare weight variants (e.g. fp16,affine3,tq3; decode_speed.py's) over fp16 "
        "caches instead of caches over one model",
    )
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = ProbeRows("decode_split", a.json)
    prompt = mx.random.randint(0, 1000, (a.context,))
    if a.weights:
        config = load_config(Path(a.model_dir))
        config.pop("quantization", None)
        kinds = [(v, None) for v in a.weights.split(",")]
        models = {v: make_model(config, v) for v, _ in kinds}
    else:
        model = bench_kv_model.random_model(a.model_dir)
        kinds = [("fp16", None)] + [(s["name"], s) for s in bench_kv.parse_settings(a.settings)]
        models = {kind: model for kind, _ in kinds}
    live = {}
    for kind, s in kinds:  # every cache filled first, then the rounds visit them in turn
        model = models[kind]
        cache = make_prompt_cache(model) if a.weights else bench_kv_model.make_cache(model, kind, s)
        if a.fill == "random":
            first = bench_kv_model.random_fill(model, cache, a.context)
        else:
            first = bench_kv_model.prefill(model, prompt, cache)
        live[kind] = [cache, first, []]
    for _ in range(a.rounds + 1):
        for kind, entry in live.items():
            parts, entry[1] = split_round(models[kind], entry[0], entry[1], a.tokens)
            entry[2].append(parts)
    for kind, (_, _, rounds) in live.items():
        build, encode, wait = (statistics.median(r[i] for r in rounds[1:]) for i in range(3))
        rows.emit(
            context=a.context,
            fill=a.fill,
            kind=kind,
            build_ms=round(build, 3),
            async_eval_ms=round(encode, 3),
            wait_ms=round(wait, 3),
            token_ms=round(build + encode + wait, 3),
        )
    if a.profile:
        for kind, s in kinds[1:]:
            prof = cProfile.Profile()
            split_round(models[kind], live[kind][0], live[kind][1], a.tokens, prof)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
            print(kind, text.getvalue()[:6000])
    rows.save()


if __name__ == "__main__":
    main()
