"""`--kv-*` options: build a TurboQuant KV cache for generation and report its bytes."""

from __future__ import annotations

import argparse

from .main import CommandError

DEFAULT_SINK = 128
DEFAULT_BUFFER = 128


def _bits(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return int(value) if value.is_integer() else value


def add_kv_arguments(parser: argparse.ArgumentParser) -> None:
    """The TurboQuant KV cache flags (shared by generate and the kv evaluations)."""
    g = parser.add_argument_group("TurboQuant KV cache (default: fp16 cache)")
    g.add_argument(
        "--kv-bits", type=_bits, metavar="B", help="bits for keys and values: 1-4, 8, 2.5, 3.5"
    )
    g.add_argument("--kv-k-bits", type=_bits, metavar="K", help="bits for keys (with --kv-v-bits)")
    g.add_argument("--kv-v-bits", type=_bits, metavar="V", help="bits for values")
    g.add_argument(
        "--kv-key-mode",
        choices=("mse", "prod"),
        default="mse",
        help="keys: TurboQuant_mse, or prod (b-1 bits mse + 1-bit QJL, unbiased scores)",
    )
    g.add_argument(
        "--kv-sink", type=int, default=DEFAULT_SINK, metavar="N", help="first N tokens kept fp16"
    )
    g.add_argument(
        "--kv-buffer",
        type=int,
        default=DEFAULT_BUFFER,
        metavar="N",
        help="most recent N tokens kept fp16 (flushed to packed codes in batches)",
    )
    g.add_argument(
        "--kv-min-tokens",
        type=int,
        default=0,
        metavar="N",
        help="compress nothing until the cache holds N tokens",
    )


def kv_knobs(args) -> dict | None:
    """TurboQuantKVCache arguments from the parsed flags, or None for the fp16 cache."""
    k, v = args.kv_k_bits, args.kv_v_bits
    if args.kv_bits is not None:
        if k is not None or v is not None:
            raise CommandError("give --kv-bits, or --kv-k-bits with --kv-v-bits, not both")
        k = v = args.kv_bits
    elif (k is None) != (v is None):
        raise CommandError("--kv-k-bits and --kv-v-bits go together (or use --kv-bits)")
    if k is None:
        return None
    for flag in ("kv_sink", "kv_buffer", "kv_min_tokens"):
        if getattr(args, flag) < 0:
            raise CommandError(f"--{flag.replace('_', '-')} must be >= 0")
    knobs = dict(
        k_bits=k,
        v_bits=v,
        key_mode=args.kv_key_mode,
        sink_tokens=args.kv_sink,
        buffer=args.kv_buffer,
        min_tokens=args.kv_min_tokens,
    )
    from tq_kvcache import TurboQuantKVCache

    try:
        TurboQuantKVCache(**knobs)
    except ValueError as e:
        message = str(e).replace("k_bits", "--kv-k-bits").replace("v_bits", "--kv-v-bits")
        raise CommandError(message) from None
    return knobs


def make_kv_cache(model, args) -> list | None:
    """The TurboQuant prompt cache for ``model`` from the flags (None: mlx-lm's default)."""
    knobs = kv_knobs(args)
    if knobs is None:
        return None
    from tq_kvcache import make_turboquant_cache

    return make_turboquant_cache(model, **knobs)


def cache_bytes(cache: list) -> tuple[int, int]:
    """(bytes held, bytes mlx-lm's unquantized cache would hold for the same tokens, in the
    model's dtype) over all layers; other layer caches count the same on both sides."""
    held = fp16 = 0
    for c in cache:
        nbytes = getattr(c, "nbytes", 0)
        held += nbytes
        fp16 += c.dense_nbytes() if hasattr(c, "dense_nbytes") else nbytes
    return held, fp16


def cache_report(cache: list) -> str:
    held, fp16 = cache_bytes(cache)
    ratio = fp16 / held if held else 0.0
    return (
        f"KV cache: {held / 2**20:.3f} MiB (unquantized: {fp16 / 2**20:.3f} MiB), "
        f"compression {ratio:.2f}x"
    )
