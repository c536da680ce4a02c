"""`tq chat`: an interactive chat that keeps its KV cache across turns (TurboQuant by default)."""

from __future__ import annotations

import sys
from pathlib import Path

from .console_input import read_message
from .main import CommandError
from .model_options import add_model_arguments

HELP = """commands:
  /help   this help
  /reset  forget the conversation (and empty the KV cache)
  /quit   leave (also /exit, /q or end of input)
anything else is a message to the model; after each reply: decode tok/s, prompt tok/s and
the KV cache size"""
#: Prompts at least this long get a live prefill status line.
LONG_PREFILL_TOKENS = 1024
#: tq chat's TurboQuant cache when no --kv-* flag is given (K4V3: +0.9% perplexity on
#: SmolLM2, docs/kvcache.md).
DEFAULT_K_BITS, DEFAULT_V_BITS = 4, 3


def add_arguments(parser) -> None:
    from .kv_options import add_kv_arguments

    add_model_arguments(
        parser, "TurboQuant checkpoint or float model (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--system-prompt", help="system message for the chat template")
    parser.add_argument("--max-tokens", "-m", type=int, default=256, help="per reply")
    parser.add_argument("--temp", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument(
        "--no-turboquant",
        action="store_true",
        help="compare: mlx-lm's fp16 KV cache, and a float --model loaded as is (not converted)",
    )
    add_kv_arguments(parser)


def _log(message: str) -> None:
    print(f"tq chat: {message}", file=sys.stderr, flush=True)


def _check_args(args) -> None:
    if args.max_tokens < 1:
        raise CommandError("--max-tokens must be at least 1")
    if args.temp < 0:
        raise CommandError("--temp must be >= 0")
    if not 0 < args.top_p <= 1:
        raise CommandError("--top-p must be in (0, 1]")
    kv_given = any(getattr(args, f) is not None for f in ("kv_bits", "kv_k_bits", "kv_v_bits"))
    if args.no_turboquant and kv_given:
        raise CommandError("--no-turboquant uses the fp16 KV cache: drop the --kv-* bits")


def cache_knobs(args) -> dict | None:
    """TurboQuantKVCache arguments (K4V3 unless --kv-* flags say otherwise), or None for
    mlx-lm's fp16 cache (--no-turboquant)."""
    from .kv_options import kv_knobs

    if args.no_turboquant:
        return None
    if args.kv_bits is None and args.kv_k_bits is None and args.kv_v_bits is None:
        args.kv_k_bits, args.kv_v_bits = DEFAULT_K_BITS, DEFAULT_V_BITS
    return kv_knobs(args)


def load_model(args):
    """``(model, tokenizer, description)``: TurboQuant weights, or with --no-turboquant a
    float model as it is (a TurboQuant checkpoint keeps its TurboQuant weights)."""
    from .default_model import default_model_dir, is_tq_checkpoint
    from .generate_cmd import load_tq, resolve_tq_model
    from .status_line import StatusLine

    if args.no_turboquant:
        path = Path(args.model).expanduser() if args.model else default_model_dir(_log)
        if path.is_dir() and not is_tq_checkpoint(path):
            with StatusLine(f"loading {path} (float)", prefix="tq chat"):
                return (*_load_float(path), "float weights")
        if path.is_dir():
            _log(f"{path} is a TurboQuant checkpoint: its weights stay TurboQuant")
    path = resolve_tq_model(args.model, args.preset)
    with StatusLine(f"loading {path}", prefix="tq chat"):
        model, tokenizer = load_tq(path)
    return model, tokenizer, "TurboQuant weights"


def _load_float(path: Path):
    import mlx.core as mx
    from mlx_lm.utils import load
    from tq_core.lm.load import cast_dtype

    try:
        model, tokenizer = load(str(path))
    except (ValueError, OSError) as e:
        raise CommandError(f"{path}: cannot load the float model ({e})") from None
    if mx.default_device() == mx.cpu:
        cast_dtype(model, mx.float32)  # the CPU's float16 matmuls are 60-90x slower
    return model, tokenizer


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation and the KV cache of the tokens it has already run through the model.

    Each turn renders the whole conversation with the chat template, keeps the cached prefix
    that still matches (trimming the cache where the new rendering differs, e.g. the
    template's end-of-turn tokens after a reply) and runs only the rest through the model.
    """

    def __init__(self, model, tokenizer, knobs: dict | None, system: str | None, args):
        self.model = model
        self.tokenizer = tokenizer
        self.knobs = knobs
        self.args = args
        self.system = [{"role": "system", "content": system}] if system else []
        self.use_template = tokenizer.has_chat_template
        self.reset()

    def reset(self) -> None:
        self.messages = list(self.system)
        self.cache = self._new_cache()
        self.cached_tokens: list[int] = []

    def _new_cache(self) -> list:
        from mlx_lm.models.cache import make_prompt_cache
        from tq_kvcache import make_turboquant_cache

        if self.knobs is None:
            return make_prompt_cache(self.model)
        return make_turboquant_cache(self.model, **self.knobs)

    def _reusable(self, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` the cache already holds (it is trimmed to that)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        keep = min(common_prefix(self.cached_tokens, ids), len(ids) - 1)  # feed >= 1 token
        extra = len(self.cached_tokens) - keep
        if extra and not can_trim_prompt_cache(self.cache):
            self.cache, self.cached_tokens = self._new_cache(), []
            return 0
        if extra:
            trim_prompt_cache(self.cache, extra)
        self.cached_tokens = self.cached_tokens[:keep]
        return keep

    def reply(self, text: str, out) -> dict:
        """Stream the model's answer to ``text`` into ``out``; the turn's statistics."""
        import mlx.core as mx
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        from .generate_cmd import encode_prompt
        from .status_line import StatusLine, prefill_progress

        if not self.use_template:
            self.messages = list(self.system)  # no template: each message stands alone
        self.messages.append({"role": "user", "content": text})
        ids = encode_prompt(self.tokenizer, self.messages, self.use_template)
        reused = self._reusable(ids)
        new = ids[reused:]
        sampler = make_sampler(self.args.temp, self.args.top_p)
        status = (
            StatusLine("prefill", prefix="tq chat") if len(new) >= LONG_PREFILL_TOKENS else None
        )
        generated, pieces, last = [], [], None
        stream = stream_generate(
            self.model,
            self.tokenizer,
            mx.array(new),
            max_tokens=self.args.max_tokens,
            sampler=sampler,
            prompt_cache=self.cache,
            prompt_progress_callback=prefill_progress(status) if status else None,
        )
        if status is not None:
            status.__enter__()
        try:
            for response in stream:
                if status is not None:  # the first token ends the prefill
                    status.__exit__(None, None, None)
                    status = None
                out.write(response.text)
                out.flush()
                pieces.append(response.text)
                generated.append(response.token)
                last = response
        finally:
            if status is not None:
                status.__exit__(*sys.exc_info())
        out.write("\n")
        out.flush()
        reply_text = "".join(pieces)
        if self.use_template:
            self.messages.append({"role": "assistant", "content": reply_text})
        # mlx-lm runs one step ahead: the last token may or may not be in the cache yet
        held = _cache_offset(self.cache)
        self.cached_tokens = (ids + generated)[:held] if held is not None else []
        return _stats(last, len(ids), len(new), self.cache)


def _cache_offset(cache: list) -> int | None:
    for c in cache:
        offset = getattr(c, "offset", None)
        if isinstance(offset, int):
            return offset
    return None


def _stats(last, prompt_tokens: int, new_tokens: int, cache: list) -> dict:
    from .kv_options import cache_bytes

    held, dense = cache_bytes(cache)
    return {
        "generation_tokens": last.generation_tokens if last else 0,
        "generation_tps": last.generation_tps if last else 0.0,
        "prompt_tokens": prompt_tokens,
        "prompt_new_tokens": new_tokens,
        "prompt_tps": last.prompt_tps if last else 0.0,
        "cache_bytes": held,
        "cache_dense_bytes": dense,
        "peak_memory_gb": last.peak_memory if last else 0.0,
    }


def render_stats(stats: dict) -> str:
    ratio = stats["cache_dense_bytes"] / stats["cache_bytes"] if stats["cache_bytes"] else 0
    return (
        f"[{stats['generation_tokens']} tokens at {stats['generation_tps']:.1f} tok/s; "
        f"prompt {stats['prompt_tokens']} tokens ({stats['prompt_new_tokens']} new) at "
        f"{stats['prompt_tps']:.1f} tok/s; KV cache {stats['cache_bytes'] / 2**20:.3f} MiB "
        f"(unquantized {stats['cache_dense_bytes'] / 2**20:.3f} MiB, {ratio:.2f}x)]"
    )


def run(args) -> int:
    import mlx.core as mx

    _check_args(args)
    knobs = cache_knobs(args)
    model, tokenizer, description = load_model(args)
    if args.seed is not None:
        mx.random.seed(args.seed)
    session = ChatSession(model, tokenizer, knobs, args.system_prompt, args)
    kv = (
        "fp16 KV cache"
        if knobs is None
        else "TurboQuant KV cache " + ", ".join(f"{k}={v}" for k, v in knobs.items())
    )
    _log(f"{description} ({kv}); /help for commands")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    while (line := read_message(interactive)) is not None:
        if not line:
            continue
        if line == "/help":
            print(HELP, file=sys.stderr, flush=True)
            continue
        if line == "/reset":
            session.reset()
            _log("conversation and KV cache reset")
            continue
        if line.startswith("/") and " " not in line:
            _log(f"unknown command {line}; /help lists them")
            continue
        stats = session.reply(line, sys.stdout)
        print(render_stats(stats), file=sys.stderr, flush=True)
    if interactive:
        print()
    return 0
