"""`tq generate`: stream text from a TurboQuant model (mlx-lm's generate, on a TQ checkpoint).

A float model directory (no ``quantization.method == "turboquant"`` in its config.json) is
converted first, once, into ``~/.cache/tq-models/tq/<name>-<preset>``. Without --model the
default model (SmolLM2-135M-Instruct, see default_model.py) is used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .console_input import read_message
from .distributed_options import (
    check_distributed_arguments,
    finish_together,
    load_distributed,
    stats_path,
)
from .kv_options import cache_report, make_kv_cache
from .main import CommandError
from .stream_options import check_stream_arguments, load_streamed, print_report, write_stats

DEFAULT_PROMPT = "hello"  # mlx_lm.generate's default
DEFAULT_MAX_TOKENS = 100


def _log(message: str) -> None:
    print(f"tq: {message}", file=sys.stderr, flush=True)


def resolve_tq_model(model: str | None, preset_name: str | None) -> Path:
    """A TurboQuant checkpoint directory for ``--model`` (converting float models once)."""
    from .convert_cmd import is_local_path
    from .default_model import (
        MODEL_NAME,
        cached_tq_conversion,
        default_model_dir,
        is_tq_checkpoint,
    )

    try:
        if model is None:
            src = default_model_dir(_log)
            return cached_tq_conversion(src, preset_name or "tq4", name=MODEL_NAME, log=_log)
        path = Path(model).expanduser()
        if path.exists():
            if is_tq_checkpoint(path):
                if preset_name:
                    _log(f"--preset {preset_name} ignored: {model} is a TurboQuant checkpoint")
                return path
            if not (path / "config.json").is_file():
                raise CommandError(f"{model}: no config.json; not a model directory")
            return cached_tq_conversion(path, preset_name or "tq4", log=_log)
        if is_local_path(model):
            raise CommandError(f"{model}: no such model directory")
        return cached_tq_conversion(model, preset_name or "tq4", log=_log)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        raise CommandError(str(e)) from None


def load_tq(path: Path):
    """``(model, tokenizer)`` of a TurboQuant checkpoint; bad checkpoints -> CommandError."""
    from tq_core.lm import load

    try:
        return load(path)
    except ValueError as e:  # CheckpointError and unsupported architectures
        raise CommandError(str(e)) from None
    except OSError as e:
        raise CommandError(f"{path}: cannot load the tokenizer or weights ({e})") from None


def suppress_eos(eos_ids, prompt_len: int, min_tokens: int):
    """A logits processor: EOS gets -inf logits until ``min_tokens`` tokens are generated.

    mlx-lm calls processors with every token so far (prompt included) and the logits of the
    next one, so ``len(tokens) - prompt_len`` tokens have been generated."""
    import mlx.core as mx

    eos = sorted(int(i) for i in eos_ids)
    mask = None

    def processor(tokens, logits):
        nonlocal mask
        if tokens.size - prompt_len >= min_tokens or not eos:
            return logits
        if mask is None or mask.shape[-1] != logits.shape[-1]:
            ids = [i for i in eos if i < logits.shape[-1]]
            mask = mx.zeros((logits.shape[-1],), dtype=mx.bool_)
            if ids:
                mask[mx.array(ids)] = True
        return mx.where(mask, mx.array(-mx.inf, logits.dtype), logits)

    return processor


def encode_prompt(tokenizer, messages: list[dict], use_chat_template: bool) -> list[int]:
    """Token ids the way mlx_lm.generate makes them: the chat template with the generation
    prompt (no extra special tokens), or the raw text of the last message (with them)."""
    if use_chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = messages[-1]["content"]
    return tokenizer.encode(text, add_special_tokens=not use_chat_template)


def stream_reply(model, tokenizer, ids: list[int], args, sampler, out=None, prompt_cache=None):
    """Generate from ``ids``, writing text to ``out`` as it arrives; ``(text, last response)``."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_logits_processors

    out = out or sys.stdout
    processors = make_logits_processors(
        repetition_penalty=args.rep_penalty, repetition_context_size=args.rep_ctx
    )
    if args.min_tokens:
        processors.append(suppress_eos(tokenizer.eos_token_ids, len(ids), args.min_tokens))
    text, last = [], None
    for response in stream_generate(
        model,
        tokenizer,
        mx.array(ids),
        max_tokens=args.max_tokens,
        sampler=sampler,
        logits_processors=processors or None,
        prompt_cache=prompt_cache,
    ):
        out.write(response.text)
        out.flush()
        text.append(response.text)
        last = response
    return "".join(text), last


def print_stats(response, err=None) -> None:
    err = err or sys.stderr
    print(
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
        file=err,
    )
    print(
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec",
        file=err,
    )
    print(f"Peak memory: {response.peak_memory:.3f} GB", file=err)


def _check_args(args) -> None:
    if args.max_tokens == 0 or args.max_tokens < -1:
        raise CommandError("--max-tokens must be positive (or -1 for no limit)")
    if args.temp < 0:
        raise CommandError("--temp must be >= 0")
    if not 0 < args.top_p <= 1:
        raise CommandError("--top-p must be in (0, 1]")
    if not 0 <= args.min_p < 1:
        raise CommandError("--min-p must be in [0, 1)")
    if args.top_k < 0:
        raise CommandError("--top-k must be >= 0")
    if args.rep_penalty is not None and args.rep_penalty <= 0:
        raise CommandError("--rep-penalty must be positive (1 = no penalty)")
    if args.rep_ctx < 1:
        raise CommandError("--rep-ctx must be at least 1")
    if args.min_tokens < 0:
        raise CommandError("--min-tokens must be >= 0")
    if args.chat and args.prompt is not None:
        raise CommandError("give --prompt or --chat, not both")


def run(args) -> int:
    import mlx.core as mx

    _check_args(args)
    check_stream_arguments(args)
    check_distributed_arguments(args)
    if args.distributed:
        _check_distributed_model(args.model)
    path = resolve_tq_model(args.model, args.preset)
    mx.reset_peak_memory()  # a conversion just made does not count; loading does, as in mlx-lm
    session = dist = None
    if args.distributed:
        model, tokenizer, *dist = load_distributed(path, args)
    elif args.stream_experts:
        model, tokenizer, session = load_streamed(path, args)
    else:
        model, tokenizer = load_tq(path)
    try:
        return _run_loaded(args, model, tokenizer, session, dist)
    finally:
        if session is not None:
            session.close()


def _check_distributed_model(model: str | None) -> None:
    """Every rank would convert a float model at once into one cache folder: refuse."""
    from .default_model import is_tq_checkpoint

    if model is None or not Path(model).expanduser().is_dir():
        raise CommandError("--distributed needs --model DIR, a TurboQuant checkpoint on every host")
    if not is_tq_checkpoint(Path(model).expanduser()):
        raise CommandError(
            f"{model} is not a TurboQuant checkpoint; convert it once with `tq convert` "
            "before running it over several ranks"
        )


def _run_loaded(args, model, tokenizer, session, dist=None) -> int:
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    if args.seed is not None:
        mx.random.seed(args.seed)
    sampler = make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
    group, watchdog = dist if dist else (None, None)
    rank = group.rank() if group is not None else 0
    if watchdog is not None:
        sampler = _kicking(sampler, watchdog)
    use_template = not args.no_chat_template and tokenizer.has_chat_template
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    if args.chat:
        return chat(model, tokenizer, args, sampler, use_template, system)

    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    prompt = sys.stdin.read() if prompt == "-" else prompt.replace("\\n", "\n").replace("\\t", "\t")
    ids = encode_prompt(tokenizer, [*system, {"role": "user", "content": prompt}], use_template)
    if not ids:
        raise CommandError("the prompt is empty")
    kv_cache = make_kv_cache(model, args)
    # Every rank computes the same tokens; rank 0 alone prints them.
    out = open(os.devnull, "w") if rank else None  # noqa: SIM115 (closed at exit)
    if watchdog is not None:
        watchdog.kick("generating (waiting on the other ranks' share of a token)")
    text, last = stream_reply(model, tokenizer, ids, args, sampler, out, prompt_cache=kv_cache)
    if group is not None:
        finish_together(group, watchdog)
    if not rank:
        print(flush=True)
    if group is not None:
        print(f"tq: rank {rank} of {group.size()}:", file=sys.stderr)
    if not text:
        print(
            "(no text generated: the model ended at once; --min-tokens N forbids that)",
            file=sys.stderr,
        )
    print_stats(last)
    if kv_cache is not None:
        print(cache_report(kv_cache), file=sys.stderr)
    stats = {
        "prompt_tokens": last.prompt_tokens,
        "prompt_tps": last.prompt_tps,
        "generation_tokens": last.generation_tokens,
        "generation_tps": last.generation_tps,
        "peak_memory_gb": last.peak_memory,
    }
    if kv_cache is not None:
        stats["kv_cache"] = cache_report(kv_cache)
    if session is not None:
        stats["experts"] = print_report(session, last.prompt_tokens + last.generation_tokens)
    stats_file = args.stats_json
    if group is not None:
        stats["distributed"] = {"mode": args.distributed, "rank": rank, "size": group.size()}
        stats_file = stats_path(args.stats_json, rank, group.size())
    if stats_file:
        write_stats(stats_file, stats)
    return 0


def _kicking(sampler, watchdog):
    """``sampler`` that restarts the watchdog's clock: mlx-lm samples once per token."""

    def sample(logprobs):
        watchdog.kick()
        return sampler(logprobs)

    return sample


def chat(model, tokenizer, args, sampler, use_template: bool, system: list[dict]) -> int:
    """Read messages from stdin, one a line, until EOF or /quit; the history is kept when
    the tokenizer has a chat template (/reset clears it)."""
    interactive = sys.stdin.isatty()
    print(
        "tq chat: one message a line; /reset clears the history, /quit or EOF ends", file=sys.stderr
    )
    messages = list(system)
    while (line := read_message(interactive)) is not None:
        if line == "/reset":
            messages = list(system)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = encode_prompt(tokenizer, messages, use_template)
        kv_cache = make_kv_cache(model, args)  # the whole history is re-encoded each turn
        text, last = stream_reply(model, tokenizer, ids, args, sampler, prompt_cache=kv_cache)
        print(flush=True)
        if args.verbose:
            print_stats(last)
            if kv_cache is not None:
                print(cache_report(kv_cache), file=sys.stderr)
        if use_template:
            messages.append({"role": "assistant", "content": text})
        else:
            messages = list(system)
    if interactive:
        print()
    return 0
