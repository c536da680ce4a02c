"""`tq calibrate-experts`: run a text through a streamed MoE model, count the routers'
choices, write pin.json (hottest experts within --pin-gb) and perm.json (expert order)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .main import CommandError
from .stream_options import default_budget

__all__ = ["run"]


def run(args) -> int:
    import mlx.core as mx
    from tq_stream import (
        ExpertUsage,
        StreamError,
        choose_pins,
        co_activation_order,
        index_checkpoint,
        load_streaming,
    )
    from tqdm import tqdm

    from .atomic_write import write_text_atomic

    if args.tokens < 1 or args.seq_len < 1:
        raise CommandError("--tokens and --seq-len must be at least 1")
    if args.pin_gb < 0:
        raise CommandError("--pin-gb must be >= 0")
    model_dir = Path(args.model)
    data = Path(args.data)
    if not data.is_file():
        raise CommandError(f"--data {data}: no such file")
    try:
        if args.expert_cache_gb is not None:
            if args.expert_cache_gb <= 0:
                raise CommandError("--expert-cache-gb must be positive")
            budget = int(args.expert_cache_gb * 2**30)
        else:
            budget = default_budget(model_dir, index_checkpoint(model_dir))
        model, tokenizer, session = load_streaming(model_dir, budget)
    except StreamError as e:
        raise CommandError(str(e)) from None
    try:
        ids = tokenizer.encode(data.read_text(errors="replace"))[: args.tokens]
        if not ids:
            raise CommandError(f"--data {data}: no tokens")
        usage = ExpertUsage({lay.layer: lay.num_experts for lay in session.layouts})
        session.cache.observer = usage.observe
        with tqdm(total=len(ids), desc="calibrating", unit="tok", file=sys.stderr) as bar:
            for start in range(0, len(ids), args.seq_len):
                window = ids[start : start + args.seq_len]
                mx.eval(model(mx.array([window])))
                bar.update(len(window))
        pins = choose_pins(usage, session.layouts, int(args.pin_gb * 2**30))
        perm = {
            "layers": {
                layer: co_activation_order(usage.counts[layer], usage.pairs[layer])
                for layer in usage.counts
            }
        }
    except StreamError as e:
        raise CommandError(str(e)) from None
    finally:
        session.close()
    out = Path(args.out) if args.out else model_dir
    pins["tokens"] = len(ids)
    pins["counts"] = {k: v.tolist() for k, v in usage.counts.items()}
    write_text_atomic(str(out / "pin.json"), json.dumps(pins, indent=1))
    write_text_atomic(str(out / "perm.json"), json.dumps(perm, indent=1))
    pinned = sum(len(v) for v in pins["layers"].values())
    print(
        f"{len(ids)} tokens through {len(usage.counts)} expert layers; pinned {pinned} experts "
        f"({pins['bytes'] / 2**30:.3f} GiB): {out / 'pin.json'}; order: {out / 'perm.json'}",
        file=sys.stderr,
    )
    return 0
