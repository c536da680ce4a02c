"""The `tq` command line: argument parsing and dispatch to the subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from .bench_cli import add_bench_commands


class CommandError(Exception):
    """A user-facing error: main() prints ``tq <command>: <message>`` and returns 2."""


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

    bench_sub = add_bench_commands(sub)
    _add_convert(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_experts(sub)
    _add_serve_and_chat(sub, bench_sub)
    return parser


def _add_experts(sub) -> None:
    cal = sub.add_parser(
        "calibrate-experts",
        help="count expert use on a text: write pin.json (hot experts) and perm.json (order)",
    )
    cal.add_argument("--model", required=True, help="TurboQuant (or float) MoE checkpoint")
    cal.add_argument("--data", required=True, help="text file to run through the model")
    cal.add_argument("--tokens", type=int, default=2048, help="tokens of --data to use")
    cal.add_argument("--seq-len", type=int, default=256, help="tokens per forward pass")
    cal.add_argument("--pin-gb", type=float, default=1.0, help="bytes of experts to pin")
    cal.add_argument("--expert-cache-gb", type=float, help="stream with this budget")
    cal.add_argument("--out", help="folder for pin.json and perm.json (default: --model)")
    cal.set_defaults(func=_calibrate, cmd_name="tq calibrate-experts")
    rep = sub.add_parser(
        "repack-experts", help="rewrite a checkpoint with experts in perm.json's order"
    )
    rep.add_argument("--model", required=True)
    rep.add_argument("--perm", required=True, help="perm.json from calibrate-experts")
    rep.add_argument("--out", required=True, help="new checkpoint directory")
    rep.add_argument("--force", action="store_true", help="replace --out if it exists")
    rep.set_defaults(func=_repack, cmd_name="tq repack-experts")


def _add_serve_and_chat(sub, bench_sub) -> None:
    from . import serve_cmd

    serve = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (mlx_lm.server) on TurboQuant weights and caches",
        description="Serve /v1/chat/completions, /v1/completions (streaming or not), "
        "/v1/models and /health with mlx-lm's server on a TurboQuant model; --kv-* flags "
        "make every KV cache a TurboQuant cache. Listens on loopback unless --host says "
        "otherwise.",
    )
    serve_cmd.add_arguments(serve)
    serve.set_defaults(func=_serve, cmd_name="tq serve")

    from . import chat_cmd

    chat = sub.add_parser(
        "chat",
        help="interactive chat: streamed replies, tok/s and KV cache size after each",
        description="Chat with a TurboQuant model; the KV cache (TurboQuant K4V3 unless "
        "--kv-* flags say otherwise) is kept across turns. /help, /reset, /quit.",
    )
    chat_cmd.add_arguments(chat)
    chat.set_defaults(func=_chat, cmd_name="tq chat")

    from . import bench_generate

    gen = bench_sub.add_parser(
        "generate",
        help="fp16 vs mlx-lm 4-bit vs TurboQuant KV cache over context lengths (--plot)",
        description="Prefill and decode tok/s, peak memory and cache bytes of three KV "
        "caches side by side at each context length; warmup, then the median of --repeats.",
    )
    bench_generate.add_arguments(gen)
    gen.set_defaults(func=_bench_generate, cmd_name="tq bench generate")


def _bench_generate(args: argparse.Namespace) -> int:
    from . import bench_generate

    return bench_generate.run(args)


def _chat(args: argparse.Namespace) -> int:
    from . import chat_cmd

    return chat_cmd.run(args)


def _serve(args: argparse.Namespace) -> int:
    from . import serve_cmd

    return serve_cmd.run(args)


def _calibrate(args: argparse.Namespace) -> int:
    from . import calibrate_cmd

    return calibrate_cmd.run(args)


def _repack(args: argparse.Namespace) -> int:
    from . import repack_cmd

    return repack_cmd.run(args)


def _convert(args: argparse.Namespace) -> int:
    from . import convert_cmd

    return convert_cmd.run(args)


def _generate(args: argparse.Namespace) -> int:
    from . import generate_cmd

    return generate_cmd.run(args)


def _eval_ppl(args: argparse.Namespace) -> int:
    from . import eval_cmd

    return eval_cmd.run(args)


def _add_convert(sub) -> None:
    from .convert_cmd import add_recipe_arguments

    conv = sub.add_parser(
        "convert",
        help="quantize a float Hugging Face / mlx-lm model into a TurboQuant checkpoint",
        description="Quantize a float model (local directory or Hugging Face id) with "
        "TurboQuant and write a checkpoint that `tq generate` and `tq eval` load.",
    )
    conv.add_argument(
        "--model",
        required=True,
        metavar="SRC",
        help="float model: a local Hugging Face-style directory or a hub id",
    )
    conv.add_argument("--out", required=True, metavar="DST", help="output directory")
    add_recipe_arguments(conv)
    conv.add_argument("--force", action="store_true", help="replace an existing DST")
    conv.set_defaults(func=_convert, cmd_name="tq convert")


def _add_generate(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="generate text with a TurboQuant model (streams tokens, then speed stats)",
        description="Generate text with a TurboQuant checkpoint. A float model directory is "
        "converted once (cached in ~/.cache/tq-models/tq/); without --model the default "
        "SmolLM2-135M-Instruct is used.",
    )
    gen.add_argument(
        "--model",
        metavar="PATH",
        help="TurboQuant checkpoint or float model (default: SmolLM2-135M-Instruct)",
    )
    gen.add_argument("--preset", help="recipe for converting a float model (default tq4)")
    gen.add_argument("--prompt", "-p", help="the prompt ('-' reads stdin; default 'hello')")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="read messages from stdin, one a line, until EOF or /quit",
    )
    gen.add_argument("--system-prompt", help="system message for the chat template")
    gen.add_argument(
        "--no-chat-template",
        "--ignore-chat-template",
        "--raw",
        dest="no_chat_template",
        action="store_true",
        help="use the prompt as is (default: the tokenizer's chat template)",
    )
    gen.add_argument("--max-tokens", "-m", type=int, default=100)
    gen.add_argument("--temp", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, help="sampling seed")
    gen.add_argument("--rep-penalty", type=float, help="repetition penalty (e.g. 1.1)")
    gen.add_argument(
        "--rep-ctx",
        type=int,
        default=20,
        help="tokens the repetition penalty looks back on (default 20)",
    )
    gen.add_argument(
        "--min-tokens",
        type=int,
        default=0,
        help="forbid end-of-sequence for the first N generated tokens",
    )
    gen.add_argument("--verbose", action="store_true", help="speed stats after each chat reply")
    from .distributed_options import add_distributed_arguments
    from .kv_options import add_kv_arguments
    from .stream_options import add_stream_arguments

    add_kv_arguments(gen)
    add_stream_arguments(gen)
    add_distributed_arguments(gen)
    gen.set_defaults(func=_generate, cmd_name="tq generate")


def _eval_kv(args: argparse.Namespace) -> int:
    from . import eval_kv

    return eval_kv.run(args)


def _eval_niah(args: argparse.Namespace) -> int:
    from . import eval_niah

    return eval_niah.run(args)


def _eval_jsonl(args: argparse.Namespace) -> int:
    from . import eval_jsonl

    return eval_jsonl.run(args)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="evaluations (perplexity, KV cache fidelity, tasks)")
    ev_sub = ev.add_subparsers(dest="evaluation", required=True)
    ppl = ev_sub.add_parser(
        "ppl",
        help="perplexity on non-overlapping token windows of a text file",
        description="Perplexity of a TurboQuant checkpoint, a float model (baseline) or its "
        "mlx-lm affine quantization, on the first --num-seqs windows of --seq-len tokens.",
    )
    ppl.add_argument(
        "--model",
        metavar="PATH",
        help="TurboQuant checkpoint or float model "
        "(default: SmolLM2-135M-Instruct converted with --preset)",
    )
    ppl.add_argument(
        "--preset",
        help="convert a float --model with this TurboQuant preset (cached) and evaluate that",
    )
    ppl.add_argument(
        "--data", metavar="FILE", help="text file (default: ../shared/data/wikitext-2-test.txt)"
    )
    ppl.add_argument("--seq-len", type=int, default=512)
    ppl.add_argument("--num-seqs", type=int, default=16)
    ppl.add_argument("--batch-size", type=int, default=4)
    ppl.add_argument(
        "--affine-bits", type=int, help="evaluate mlx-lm's affine quantization of the float --model"
    )
    ppl.add_argument(
        "--affine-group-size", type=int, help="group size for --affine-bits (default 64)"
    )
    ppl.add_argument("--json", action="store_true", help="print JSON (table goes to stderr)")
    ppl.set_defaults(func=_eval_ppl, cmd_name="tq eval ppl")

    from .eval_jsonl import add_arguments as add_jsonl_arguments
    from .eval_kv import add_arguments as add_kv_arguments
    from .eval_niah import add_arguments as add_niah_arguments

    kv = ev_sub.add_parser(
        "kv",
        help="TurboQuant KV cache vs the fp16 cache: cosines, perplexity, top-1 agreement",
        description="Compare TurboQuant KV cache settings with mlx-lm's dense cache on the "
        "same text windows: per-layer K/V reconstruction cosine against the codebook's "
        "expectation, attention-output cosine, perplexity and top-1 agreement with the "
        "context held compressed (docs/kvcache.md).",
    )
    add_kv_arguments(kv)
    kv.set_defaults(func=_eval_kv, cmd_name="tq eval kv")
    niah = ev_sub.add_parser(
        "niah",
        help="needle in a haystack with the needle inside the compressed part of the cache",
        description="Hide a secret code in filler text at several depths of the compressed "
        "region (after the sinks, before the recent buffer), ask for it after the context is "
        "compressed, and compare pass rates with the fp16 cache.",
    )
    add_niah_arguments(niah)
    niah.set_defaults(func=_eval_niah, cmd_name="tq eval niah")
    jsonl = ev_sub.add_parser(
        "jsonl",
        help="score a JSONL task file with the fp16 cache and each TurboQuant setting",
        description='One JSON object per line: {"prompt", "answer", "match": '
        '"exact"|"substring"} and optionally "context" (held in the compressed cache '
        "before the prompt is read). Without FILE the shipped kv_tasks.jsonl is used.",
    )
    add_jsonl_arguments(jsonl)
    jsonl.set_defaults(func=_eval_jsonl, cmd_name="tq eval jsonl")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .blas_check import warn_if_reference_blas

    warn_if_reference_blas()
    try:
        return args.func(args)
    except CommandError as e:
        sys.stdout.flush()
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"{getattr(args, 'cmd_name', 'tq')}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(file=sys.stderr)
        return 130


def cli() -> None:
    """Console entry point: fast BLAS on Linux CPUs, then run the command."""
    from .blas_check import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    sys.exit(main())


if __name__ == "__main__":
    cli()
