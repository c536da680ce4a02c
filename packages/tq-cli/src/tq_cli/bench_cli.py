"""The `tq bench` subcommands: distortion, kernels, stream and kv (arguments, dispatch)."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_bench_commands", "emit_json", "float_list", "int_list"]


def _number_list(text: str, convert, what: str) -> list:
    try:
        values = [convert(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {what}s, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one {what}")
    return values


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers."""
    return _number_list(text, int, "integer")


def float_list(text: str) -> list[float]:
    """argparse type: comma-separated numbers."""
    return _number_list(text, float, "number")


def _shape_list(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",")]
    except ValueError:
        shapes = []
    # IN: whole groups of 64 and whole rotation blocks of 64 (the bench's group size).
    if not shapes or any(len(s) != 2 or min(s) < 1 or s[1] % 64 for s in shapes):
        raise argparse.ArgumentTypeError(
            f"expected OUTxIN[,OUTxIN...] with IN a multiple of 64, got {text!r}"
        )
    return shapes


def emit_json(payload, out: str | None) -> None:
    text = json.dumps(payload, indent=2)
    print(text)
    if out:
        from .atomic_write import write_text_atomic

        write_text_atomic(out, text + "\n")


#: MLX-CUDA's graph limits (ops and MB recorded per CUDA graph before it is launched): they
#: decide how long intermediates stay alive, so they belong with any memory figure.
_MLX_ENV = ("MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER")


def _run_context() -> dict:
    """Where and when a benchmark ran: device, MLX version, time, MLX's tuning variables."""
    import os
    import time

    import mlx.core as mx

    return {
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "mlx_env": {k: os.environ[k] for k in _MLX_ENV if k in os.environ},
    }


def _bench_distortion(args: argparse.Namespace) -> int:
    from . import bench_distortion

    for b in args.bits:
        if b not in bench_distortion.PAPER_MSE:
            raise SystemExit(f"tq bench distortion: --bits must be among 1,2,3,4, got {b}")
    for d in args.dims:
        if d < 8:
            raise SystemExit(f"tq bench distortion: --dims must be at least 8, got {d}")
    if args.num_vectors < 100:
        raise SystemExit("tq bench distortion: --num-vectors must be at least 100")
    rows = bench_distortion.run(args.dims, args.bits, args.num_vectors, args.seed)
    table = bench_distortion.render(rows)
    print(table, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        emit_json({"benchmark": "distortion", "rows": rows}, args.out)
    return 0


def _bench_kernels(args: argparse.Namespace) -> int:
    from . import bench_kernels

    if args.calls < 1 or args.repeats < 1:
        raise SystemExit("tq bench kernels: --calls and --repeats must be at least 1")
    from tq_kernels import kernel_backend

    if kernel_backend() is None:
        raise SystemExit(
            "tq bench kernels: times the fused GPU kernels, and this MLX build has no GPU "
            "backend (Metal or CUDA); run it on a Mac or with mlx[cuda] on an NVIDIA GPU"
        )
    result = bench_kernels.run(
        args.calls,
        args.repeats,
        moe=not args.no_moe,
        prefill=not args.no_prefill,
        sweep=args.sweep,
        **({"shapes": args.shapes} if args.shapes else {}),
    )
    print(bench_kernels.render(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        emit_json(result, args.out)
    return 0


def add_bench_commands(sub) -> argparse._SubParsersAction:
    """Register ``tq bench ...`` under ``sub``; returns the bench subparsers (others add
    their own benchmarks there)."""
    bench = sub.add_parser("bench", help="benchmarks (JSON with --json)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    dist = bench_sub.add_parser(
        "distortion", help="TurboQuant_mse/prod distortion vs the paper's figures"
    )
    dist.add_argument("--dims", type=int_list, default=[64, 128, 256])
    dist.add_argument("--bits", type=int_list, default=[1, 2, 3, 4])
    dist.add_argument("--num-vectors", type=int, default=10000)
    dist.add_argument("--seed", type=int, default=0)
    dist.add_argument("--json", action="store_true", help="print JSON (table goes to stderr)")
    dist.add_argument("--out", help="also write the JSON to this file")
    dist.set_defaults(func=_bench_distortion)
    kern = bench_sub.add_parser("kernels", help="fused TurboQuant matvec vs fp16 and affine (GPU)")
    kern.add_argument("--calls", type=int, default=100, help="products chained per eval")
    kern.add_argument("--repeats", type=int, default=5)
    kern.add_argument("--no-moe", action="store_true")
    kern.add_argument("--no-prefill", action="store_true")
    kern.add_argument("--sweep", action="store_true", help="also time launch geometries")
    kern.add_argument(
        "--shapes",
        type=_shape_list,
        help="dense shapes OUTxIN,... (default: 4096x4096,14336x4096,4096x14336,2880x2880)",
    )
    kern.add_argument("--json", action="store_true", help="print JSON (table goes to stderr)")
    kern.add_argument("--out", help="also write the JSON to this file")
    kern.set_defaults(func=_bench_kernels)

    strm = bench_sub.add_parser(
        "stream", help="expert streaming vs resident on a synthetic MoE checkpoint (>= 4 GB)"
    )
    strm.add_argument("--dir", help="where to build the checkpoint (default: a temp dir)")
    strm.add_argument("--gb", type=float, default=4.0, help="checkpoint size to build")
    strm.add_argument("--budget", type=float, default=0.25, help="expert cache / expert bytes")
    strm.add_argument("--tokens", type=int, default=32, help="decoded tokens per run")
    strm.add_argument("--keep", action="store_true", help="keep the built checkpoint")
    strm.add_argument("--json", action="store_true", help="print JSON (table goes to stderr)")
    strm.add_argument("--out", help="also write the JSON to this file")
    strm.set_defaults(func=_bench_stream, cmd_name="tq bench stream")
    _add_bench_kv(bench_sub)
    return bench_sub


def _add_bench_kv(bench_sub) -> None:
    kv = bench_sub.add_parser(
        "kv", help="decode attention over TurboQuant caches vs fp16 and mlx-lm 4-bit (GPU)"
    )
    kv.add_argument("--contexts", type=int_list, default=[8192, 32768, 131072])
    kv.add_argument("--settings", default="K4V3,K3V2", help="K<b>V<b>[-prod][-ref],...")
    kv.add_argument("--heads", type=int, default=32, help="query heads of the attention layer")
    kv.add_argument("--kv-heads", type=int, default=8)
    kv.add_argument("--head-dim", type=int, default=128)
    kv.add_argument("--calls", type=int, default=20, help="decode steps chained per eval")
    kv.add_argument("--repeats", type=int, default=3)
    kv.add_argument("--model", help="also run a whole model (config dir) at --model-contexts")
    kv.add_argument("--model-contexts", type=int_list, default=[8192, 32768])
    kv.add_argument("--decode-tokens", type=int, default=32)
    kv.add_argument(
        "--model-fill",
        choices=("prefill", "random"),
        default="prefill",
        help="fill the whole model's caches by a prefill (measures its speed and peak "
        "memory) or with random keys and values (decode speed only; long contexts quickly)",
    )
    kv.add_argument("--no-attention", action="store_true", help="only the whole-model part")
    kv.add_argument("--json", action="store_true", help="print JSON (tables go to stderr)")
    kv.add_argument("--out", help="also write the JSON to this file")
    kv.set_defaults(func=_bench_kv)


def _bench_kv(args: argparse.Namespace) -> int:
    from . import bench_kv, bench_kv_model

    if args.calls < 1 or args.repeats < 1 or min(args.contexts) < 1:
        raise SystemExit("tq bench kv: --calls, --repeats and --contexts must be at least 1")
    if args.heads % args.kv_heads:
        raise SystemExit(f"tq bench kv: --heads {args.heads} is not a multiple of --kv-heads")
    try:
        settings = bench_kv.parse_settings(args.settings)
    except Exception as e:  # CommandError from the settings parser
        raise SystemExit(f"tq bench kv: {e}") from None
    result = {"benchmark": "kv", "settings": [s["name"] for s in settings], **_run_context()}
    if not args.no_attention:
        result["attention"] = bench_kv.attention_rows(
            args.contexts,
            settings,
            args.heads,
            args.kv_heads,
            args.head_dim,
            args.calls,
            args.repeats,
        )
    if args.model:
        model = bench_kv_model.random_model(args.model)
        result["model"] = bench_kv_model.model_rows(
            model,
            args.model_contexts,
            settings,
            args.decode_tokens,
            args.repeats,
            progress=lambda m: print(f"tq bench kv: {m}", file=sys.stderr, flush=True),
            fill=args.model_fill,
        )
    print(bench_kv.render(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        emit_json(result, args.out)
    return 0


def _bench_stream(args: argparse.Namespace) -> int:
    from . import bench_stream

    result = bench_stream.run(args)
    print(bench_stream.render(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        emit_json(result, args.out)
    return 0
