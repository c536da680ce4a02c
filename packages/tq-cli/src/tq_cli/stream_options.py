"""`tq generate --stream-experts ...`: the expert-streaming flags, loading and the report."""

from __future__ import annotations

import argparse
import json
import sys

from .main import CommandError

__all__ = ["add_stream_arguments", "check_stream_arguments", "load_streamed", "print_report"]


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("expert streaming (MoE models larger than memory)")
    g.add_argument(
        "--stream-experts",
        action="store_true",
        help="keep MoE experts on disk and read them as the router picks them",
    )
    g.add_argument(
        "--expert-cache-gb",
        type=float,
        default=None,
        help="memory for experts (GiB; default: a quarter of all expert bytes)",
    )
    g.add_argument("--prefetch-workers", type=int, default=8, help="parallel expert reads")
    g.add_argument(
        "--prefetch-ahead",
        action="store_true",
        help="read the next layer's likely experts early (turns itself off if it misses)",
    )
    g.add_argument("--pin-file", help="pin.json from `tq calibrate-experts`: never evicted")
    g.add_argument("--stats-json", help="write generation and streaming stats to this file")


def check_stream_arguments(args) -> None:
    streaming = (args.expert_cache_gb, args.pin_file, args.prefetch_ahead)
    if not args.stream_experts and any(v not in (None, False) for v in streaming):
        raise CommandError("--expert-cache-gb/--pin-file/--prefetch-ahead need --stream-experts")
    if args.expert_cache_gb is not None and args.expert_cache_gb <= 0:
        raise CommandError("--expert-cache-gb must be positive")
    if args.prefetch_workers < 1:
        raise CommandError("--prefetch-workers must be at least 1")


def load_streamed(path, args):
    """``(model, tokenizer, session)`` with experts streamed from ``path``."""
    from tq_stream import StreamError, index_checkpoint, load_streaming

    try:
        if args.expert_cache_gb is None:
            budget = default_budget(path, index_checkpoint(path))
        else:
            budget = int(args.expert_cache_gb * 2**30)
        return load_streaming(
            path,
            budget,
            workers=args.prefetch_workers,
            prefetch_ahead=args.prefetch_ahead,
            pin_file=args.pin_file,
        )
    except StreamError as e:
        raise CommandError(str(e)) from None


def default_budget(path, slots) -> int:
    """A quarter of the bytes of every tensor with 'experts'/'switch_mlp' in its name."""
    expert = sum(
        s.nbytes for name, s in slots.items() if "switch_mlp." in name or ".experts." in name
    )
    if not expert:
        raise CommandError(f"{path}: no expert tensors to stream (not a MoE checkpoint?)")
    return max(expert // 4, 1)


def print_report(session, tokens: int, out=None) -> dict:
    r = session.report(tokens=tokens)
    out = out or sys.stderr
    print(
        f"Experts: hit rate {100 * r['hit_rate']:.1f}%, read {r['bytes_read'] / 1e9:.3f} GB "
        f"at {r['read_gb_per_s']:.2f} GB/s, stall {r.get('stall_ms_per_token', 0):.1f} "
        f"ms/token, cache {r['cache_bytes'] / 2**30:.3f} of {r['budget_bytes'] / 2**30:.3f} "
        f"GiB, prefetch {'on' if r['prefetch_enabled'] else 'off'}",
        file=out,
    )
    return r


def write_stats(path, stats: dict) -> None:
    from .atomic_write import write_text_atomic

    write_text_atomic(path, json.dumps(stats, indent=2))
