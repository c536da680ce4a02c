"""fp16 or MLX affine 4-bit generation, whole or sharded with mlx-lm's own ``Model.shard``:
the baseline beside ``tq generate --distributed`` (benchmarks/device/distributed_nccl.sh).

usage: [mlx.launch ... ] python benchmarks/distributed_baseline.py --model FLOAT_DIR
           --variant fp16|affine4 [--prompt TEXT] [--tokens 128] [--json F ({rank} expands)]
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--variant", choices=("fp16", "affine4"), required=True)
    ap.add_argument("--prompt", default="Write a long story about a lighthouse keeper.")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()

    group = mx.distributed.init()
    model, tokenizer = load(args.model, lazy=True)
    model.set_dtype(mx.float16)
    if args.variant == "affine4":
        nn.quantize(model, group_size=64, bits=4)
    if group.size() > 1:
        model.shard(group)
    mx.eval(model.parameters())
    text, last = [], None
    for last in stream_generate(
        model, tokenizer, args.prompt, max_tokens=args.tokens, sampler=make_sampler(0.0)
    ):
        text.append(last.text)
    mx.synchronize()
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    result = {
        "variant": args.variant,
        "rank": group.rank(),
        "size": group.size(),
        "prompt_tps": last.prompt_tps,
        "generation_tps": last.generation_tps,
        "peak_memory_gb": last.peak_memory,
        "text": "".join(text),
    }
    if args.json:
        with open(args.json.replace("{rank}", str(group.rank())), "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "text"}))


if __name__ == "__main__":
    main()
