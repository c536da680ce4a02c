"""One rank of the distributed tests: load a TurboQuant checkpoint sharded over the launched
group (or whole, for the reference), then write prompt logits, greedy tokens and per-rank
bytes as JSON. Run by ``mlx.launch`` (tests/test_distributed.py) or plainly for one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="directory for rank<r>.json")
    p.add_argument("--mode", choices=("single", "tensor", "pipeline"), required=True)
    p.add_argument("--prompt", required=True, help="comma-separated token ids")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--kv-bits", type=float, default=0, help="0: mlx-lm's fp16 cache")
    p.add_argument("--die-rank", type=int, help="this rank exits (status 3) after loading")
    return p.parse_args()


def _cache(model, kv_bits: float):
    if not kv_bits:
        return make_prompt_cache(model)
    from tq_kvcache import make_turboquant_cache

    bits = int(kv_bits) if float(kv_bits).is_integer() else kv_bits
    return make_turboquant_cache(model, k_bits=bits, v_bits=bits, sink_tokens=4, buffer=4)


def _kv_heads(cache) -> int | None:
    """KV heads a layer's cache holds (None for a cache this rank never filled)."""
    shape = getattr(cache, "_shape", None)  # TurboQuantKVCache: (batch, heads, k_dim, v_dim)
    if shape is not None:
        return int(shape[1])
    keys = getattr(cache, "keys", None)
    return None if keys is None else int(keys.shape[1])


def main() -> None:
    args = _parse()
    from tq_core.lm import load, sharded_load

    prompt = mx.array([int(t) for t in args.prompt.split(",")])
    if args.mode == "single":
        rank, size = 0, 1
        model, _ = load(args.checkpoint, tokenizer=False)
    else:
        group = mx.distributed.init(strict=True)
        rank, size = group.rank(), group.size()
        groups = {"tensor_group": group} if args.mode == "tensor" else {"pipeline_group": group}
        model, _ = sharded_load(args.checkpoint, tokenizer=False, **groups)
    if args.die_rank == rank:
        print(f"rank {rank} exits on purpose", file=sys.stderr, flush=True)
        os._exit(3)
    param_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))

    logits = model(prompt[None])[0]
    mx.eval(logits)
    cache = _cache(model, args.kv_bits)
    tokens = []
    start = time.perf_counter()
    for token, _ in generate_step(
        prompt, model, max_tokens=args.max_tokens, sampler=lambda x: mx.argmax(x, axis=-1),
        prompt_cache=cache,
    ):  # fmt: skip
        tokens.append(int(token))
    seconds = time.perf_counter() - start
    mx.eval([c.state for c in cache if not c.empty()])
    result = {
        "rank": rank,
        "size": size,
        "tokens": tokens,
        "logits": logits.astype(mx.float32).tolist(),
        "param_bytes": param_bytes,
        "kv_bytes": sum(c.nbytes for c in cache),
        "kv_types": sorted({type(c).__name__ for c in cache}),
        "kv_heads": sorted({h for h in map(_kv_heads, cache) if h is not None}),
        "seconds": seconds,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
