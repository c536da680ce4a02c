"""Decode tokens/s of one model architecture as float16, mlx affine and TurboQuant, side by
side in one run (random weights of the real shapes: speed does not depend on their values).

TurboQuant variants run with tq-kernels' fused kernels where they apply (``tq4``, ``tq3``)
or forced onto tq-core's reference path (``tq4-ref``, ``tq3-ref``: ``TQ_KERNELS=0``).

usage: python benchmarks/decode_speed.py --model-dir DIR_WITH_CONFIG_AND_TOKENIZER
           [--variants fp16,affine4,affine3,tq4,tq3,tq4-ref,tq3-ref] [--tokens 128]
           [--repeats 3] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load_config, load_tokenizer
from tq_core import QuantRecipe, dispatch, quantize_model
from tq_core.lm.load import build_model

PROMPT = "Write a long story about a lighthouse keeper and the sea. " * 2


def make_model(config: dict, variant: str) -> nn.Module:
    mx.random.seed(0)
    model = build_model(config)
    model.update(
        tree_map(
            lambda p: (0.02 * mx.random.normal(p.shape)).astype(mx.float16), model.parameters()
        )
    )
    mx.eval(model.parameters())
    if variant.startswith("affine"):
        nn.quantize(model, group_size=64, bits=int(variant[-1]))
    elif variant.startswith("tq"):
        bits = int(variant.removesuffix("-ref")[-1])
        quantize_model(model, QuantRecipe(bits=bits, group_size=64))
        model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return model


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def decode_run(model, tokenizer, tokens: int) -> dict:
    last = None
    for last in stream_generate(
        model, tokenizer, PROMPT, max_tokens=tokens, sampler=make_sampler(temp=0.0)
    ):
        pass
    return {
        "decode_tps": last.generation_tps,
        "prompt_tps": last.prompt_tps,
        "generated": last.generation_tokens,
        "process_peak_gb": last.peak_memory,  # all variants stay loaded: process-wide
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--variants", default="fp16,affine4,affine3,tq4,tq3,tq4-ref,tq3-ref")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    backend = None
    try:  # entry points may not be installed (device runs use PYTHONPATH): register directly
        from tq_kernels import kernel_backend, register_all

        register_all()
        backend = kernel_backend()
    except ImportError:
        pass
    config = load_config(__import__("pathlib").Path(args.model_dir))
    config.pop("quantization", None)
    tokenizer = load_tokenizer(args.model_dir)
    # Never stop early at EOS: every run decodes the same number of tokens.
    tokenizer._eos_token_ids = set()
    variants = args.variants.split(",")
    models = {v: make_model(config, v) for v in variants}

    def mode(variant):
        ref = variant.endswith("-ref")
        return dispatch.reference_only() if ref else contextlib.nullcontext()

    for v in variants:
        with mode(v):
            decode_run(models[v], tokenizer, 8)  # warmup (kernel compilation, allocations)
    # Round-robin over the variants, so drift of a shared host's speed hits every variant
    # alike rather than whichever ran during a slow spell.
    runs = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            with mode(v):
                runs[v].append(decode_run(models[v], tokenizer, args.tokens))
    rows = []
    for variant in variants:
        fused = variant.startswith("tq") and not variant.endswith("-ref") and backend
        rs = runs[variant]
        row = {
            "variant": variant,
            "fused_kernels": bool(fused),
            "device": str(mx.default_device()),
            "weight_bytes": weight_bytes(models[variant]),
            "decode_tps_median": statistics.median(r["decode_tps"] for r in rs),
            "prompt_tps_median": statistics.median(r["prompt_tps"] for r in rs),
            "process_peak_gb": max(r["process_peak_gb"] for r in rs),
            "runs": rs,
        }
        rows.append(row)
        print(
            f"{variant:8s} decode {row['decode_tps_median']:8.1f} tok/s  "
            f"prompt {row['prompt_tps_median']:8.1f} tok/s  weights "
            f"{row['weight_bytes'] / 1e6:8.1f} MB",
            flush=True,
        )
    base = {r["variant"]: r["decode_tps_median"] for r in rows}
    for r in rows:
        for ref in ("fp16", "affine4", "affine3", "tq4-ref", "tq3-ref"):
            if ref in base:
                r[f"ratio_to_{ref}"] = r["decode_tps_median"] / base[ref]
    out = {
        "benchmark": "decode_speed",
        "model_dir": args.model_dir,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "order": "round-robin over variants, after one warmup each",
        "kernel_backend": backend,
        "kernels_failed": sorted(dispatch._failed),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
    }
    text = json.dumps(out, indent=2)
    if args.json:  # written whole or not at all
        from tq_cli.atomic_write import write_text_atomic

        write_text_atomic(args.json, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
