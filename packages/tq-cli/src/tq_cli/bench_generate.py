"""`tq bench generate`: fp16, mlx-lm 4-bit and TurboQuant KV caches over context lengths."""

from __future__ import annotations

import json
import sys

from .bench_generate_measure import CACHES, DEFAULT_CONTEXTS, benchmark
from .bench_generate_report import plot, read_results, render
from .main import CommandError
from .model_options import add_model_arguments


def add_arguments(parser) -> None:
    from .kv_options import add_kv_arguments

    add_model_arguments(
        parser,
        "TurboQuant checkpoint or float model (default: SmolLM2-135M-Instruct); with "
        "--random-weights a directory holding config.json and the tokenizer is enough",
        preset_help="recipe for converting a float --model (default tq4)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from --model's config.json with random weights (speed does "
        "not depend on their values)",
    )
    parser.add_argument(
        "--weights",
        choices=("tq4", "tq3", "fp16"),
        default="tq4",
        help="with --random-weights: TurboQuant 4/3-bit (group 64) or float weights",
    )
    parser.add_argument(
        "--contexts",
        type=_context_list,
        default=DEFAULT_CONTEXTS,
        help="prompt lengths in tokens (default 1K..128K, as far as the model allows)",
    )
    parser.add_argument(
        "--beyond-max-context",
        action="store_true",
        help="also run contexts past the model's max_position_embeddings (speed only)",
    )
    parser.add_argument(
        "--caches", type=_cache_list, default=list(CACHES), help="subset of fp16,mlx-q4,turboquant"
    )
    parser.add_argument("--decode-tokens", type=int, default=64, help="decoded per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON (table goes to stderr)")
    parser.add_argument("--out", help="also write the JSON here (rewritten after every cell)")
    parser.add_argument("--plot", metavar="FILE.png", help="plot tok/s and memory vs context")
    parser.add_argument(
        "--from-json",
        metavar="FILE[,FILE...]",
        help="do not run: read result JSONs (rows of several runs merged) to --plot them",
    )
    add_kv_arguments(parser)


def _context_list(text: str) -> list[int]:
    """Token counts, each an integer or with a K suffix (4K = 4096)."""
    import argparse

    try:
        values = [int(v.lower().replace("k", "")) * (1024 if "k" in v.lower() else 1)
                  for v in text.split(",") if v.strip()]  # fmt: skip
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected lengths like 1024,4K, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive lengths, got {text!r}")
    return values


def _cache_list(text: str) -> list[str]:
    import argparse

    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in CACHES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"caches are among {','.join(CACHES)}, got {text!r}")
    return names


def _check_args(args) -> None:
    if args.decode_tokens < 1 or args.repeats < 1 or args.prefill_step_size < 1:
        raise CommandError("--decode-tokens, --repeats and --prefill-step-size must be >= 1")
    if args.random_weights and not args.model:
        raise CommandError("--random-weights needs --model DIR (config.json and tokenizer)")


def run(args) -> int:
    from .atomic_write import write_text_atomic

    if args.from_json:
        result = read_results(args.from_json.split(","))
    else:
        _check_args(args)
        result = benchmark(args)
    print(render(result), file=sys.stderr if args.json else sys.stdout)
    text = json.dumps(result, indent=2)
    if args.json:
        print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    if args.plot:
        plot(result, args.plot)
        print(f"tq bench generate: plot written to {args.plot}", file=sys.stderr)
    return 0
