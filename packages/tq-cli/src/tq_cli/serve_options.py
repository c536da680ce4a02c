"""`tq serve`'s flags: parsing, checking, and the settings namespace mlx_lm.server reads."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .main import CommandError
from .model_options import add_model_arguments

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?))?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512MB"``, ``"2GiB"``, ``"1.5G"``, ``"1000000"`` -> bytes (k/M/G/T powers of 1000,
    Ki/Mi/Gi/Ti powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 512MB or 2GiB, got {text!r}")
    number, letter, binary = m.groups()
    power = " kmgt".index(letter.lower()) if letter else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .kv_options import add_kv_arguments

    add_model_arguments(
        parser,
        "TurboQuant checkpoint, or a float model (converted once with --preset, cached); "
        "default: SmolLM2-135M-Instruct",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: loopback only)"
    )
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--prompt-cache-bytes",
        type=parse_size,
        metavar="N",
        help="cap on the bytes the prompt cache keeps between requests (e.g. 512MB, 2GiB)",
    )
    parser.add_argument(
        "--prompt-cache-size", type=int, default=10, help="cap on cached prompts (default 10)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=512, help="tokens generated when a request gives none"
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=32768,
        help="largest max_tokens a request may ask for (larger ones get a 400)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=parse_size,
        default=4 << 20,
        metavar="N",
        help="largest request body accepted (larger ones get a 413; default 4MiB)",
    )
    parser.add_argument("--temp", type=float, default=0.0, help="default temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="default top-p")
    parser.add_argument("--top-k", type=int, default=0, help="default top-k (0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="default min-p (0: off)")
    parser.add_argument(
        "--decode-concurrency",
        type=int,
        default=32,
        help="requests decoded together in a batch (fp16 KV cache only)",
    )
    parser.add_argument(
        "--prompt-concurrency",
        type=int,
        default=8,
        help="prompts prefilled together in a batch (fp16 KV cache only)",
    )
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument(
        "--allowed-origins",
        type=lambda text: [o for o in text.split(",") if o],
        default=[],
        help="comma-separated browser origins allowed by CORS ('*' for any; default none)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="server log level (default INFO)",
    )
    add_kv_arguments(parser)


def check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be between 0 and 65535, got {args.port}")
    if args.prompt_cache_bytes is not None and args.prompt_cache_bytes < 0:
        raise CommandError("--prompt-cache-bytes must be >= 0")
    if args.prompt_cache_size < 0:
        raise CommandError("--prompt-cache-size must be >= 0")
    if args.max_tokens_limit < 1:
        raise CommandError("--max-tokens-limit must be at least 1")
    if not 1 <= args.max_tokens <= args.max_tokens_limit:
        raise CommandError(f"--max-tokens must be between 1 and {args.max_tokens_limit}")
    if args.max_body_bytes < 1024:
        raise CommandError("--max-body-bytes must be at least 1KB")
    for flag in ("decode_concurrency", "prompt_concurrency", "prefill_step_size"):
        if getattr(args, flag) < 1:
            raise CommandError(f"--{flag.replace('_', '-')} must be at least 1")


def mlx_server_args(args, model_path: Path) -> argparse.Namespace:
    """The namespace mlx_lm.server's ModelProvider and ResponseGenerator read their settings
    from. ``kv_bits`` stays None: it is mlx-lm's own quantized cache; TurboQuant caches come
    from the model's ``make_cache`` (see serve_model.use_turboquant_caches)."""
    return argparse.Namespace(
        model=str(model_path),
        adapter_path=None,
        draft_model=None,
        num_draft_tokens=3,
        trust_remote_code=False,
        chat_template="",
        use_default_chat_template=False,
        chat_template_args={},
        pipeline=False,
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        decode_concurrency=args.decode_concurrency,
        prompt_concurrency=args.prompt_concurrency,
        prefill_step_size=args.prefill_step_size,
        prompt_cache_size=args.prompt_cache_size,
        prompt_cache_bytes=args.prompt_cache_bytes,
        kv_bits=None,
        kv_group_size=64,
        quantized_kv_start=0,
        allowed_origins=args.allowed_origins,
        log_level=args.log_level,
    )
