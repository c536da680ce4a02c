"""The `tq` command line: argument parsing and dispatch to the subcommands."""

from __future__ import annotations

import argparse
import json
import sys


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _emit_json(payload, out: str | None) -> None:
    text = json.dumps(payload, indent=2)
    print(text)
    if out:
        from .atomic_write import write_text_atomic

        write_text_atomic(out, text + "\n")


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
        _emit_json({"benchmark": "distortion", "rows": rows}, args.out)
    return 0


def _info(args: argparse.Namespace) -> int:
    import platform

    import mlx.core as mx
    import tq_core
    from tq_kernels import kernel_backend

    from .blas_check import blas_in_use

    mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))  # load the BLAS before reading the maps
    info = {
        "tq_core": tq_core.__version__,
        "mlx": mx.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(mx.default_device()),
        "kernel_backend": kernel_backend(),
        "cpu_blas": blas_in_use(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>15}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tq", description="TurboQuant for MLX")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, MLX device, kernel backend and CPU BLAS")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_info)

    bench = sub.add_parser("bench", help="benchmarks (JSON with --json)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    dist = bench_sub.add_parser(
        "distortion", help="TurboQuant_mse/prod distortion vs the paper's figures"
    )
    dist.add_argument("--dims", type=_int_list, default=[64, 128, 256])
    dist.add_argument("--bits", type=_int_list, default=[1, 2, 3, 4])
    dist.add_argument("--num-vectors", type=int, default=10000)
    dist.add_argument("--seed", type=int, default=0)
    dist.add_argument("--json", action="store_true", help="print JSON (table goes to stderr)")
    dist.add_argument("--out", help="also write the JSON to this file")
    dist.set_defaults(func=_bench_distortion)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .blas_check import warn_if_reference_blas

    warn_if_reference_blas()
    return args.func(args)


def cli() -> None:
    """Console entry point: fast BLAS on Linux CPUs, then run the command."""
    from .blas_check import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    sys.exit(main())


if __name__ == "__main__":
    cli()
