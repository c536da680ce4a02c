"""Measuring `tq bench generate`: tok/s, peak memory and cache bytes per context and cache."""

from __future__ import annotations

import json
import statistics
import time

from .bench_generate_model import load
from .main import CommandError

CACHES = ("fp16", "mlx-q4", "turboquant")
LABELS = {"fp16": "fp16 KVCache", "mlx-q4": "mlx-lm QuantizedKVCache 4-bit gs64"}
MLX_KV_BITS, MLX_KV_GROUP = 4, 64
DEFAULT_CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
MEMORY_NOTE = (
    "peak memory is MLX's allocator peak since mx.reset_peak_memory() before each run: it "
    "includes the resident weights"
)
CPU_MEMORY_NOTE = (
    "on the CPU it counts the arrays MLX allocated, not the process RSS, and the model and "
    "its 'fp16' cache compute in float32 (the CPU's float16 matmuls are slow)"
)


def turboquant_knobs(args) -> dict:
    """The TurboQuant cache from the --kv-* flags; 4-bit keys and values when none are given
    (the same bits as mlx-lm's cache beside it)."""
    from .kv_options import kv_knobs

    if args.kv_bits is None and args.kv_k_bits is None and args.kv_v_bits is None:
        args.kv_bits = 4
    return kv_knobs(args)


def _register_kernels() -> str | None:
    """Fused kernels, registered directly: with PYTHONPATH runs (no installed entry points)
    nothing else would register them."""
    try:
        from tq_kernels import kernel_backend, register_all
    except ImportError:
        return None
    register_all()
    return kernel_backend()


def make_cache(kind: str, model, knobs: dict) -> list:
    from mlx_lm.models.cache import make_prompt_cache
    from tq_kvcache import make_turboquant_cache

    if kind == "turboquant":
        return make_turboquant_cache(model, **knobs)
    return make_prompt_cache(model)  # mlx-q4: generate_step quantizes it (quantized_kv_start=0)


def one_run(model, tokenizer, prompt, kind: str, knobs: dict, decode_tokens: int, step: int):
    """One prefill + decode: tok/s both ways, peak memory and the cache's bytes."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from .kv_options import cache_bytes

    mx.clear_cache()
    mx.reset_peak_memory()
    cache = make_cache(kind, model, knobs)
    quantize = {"kv_bits": MLX_KV_BITS, "kv_group_size": MLX_KV_GROUP} if kind == "mlx-q4" else {}
    last = None
    for last in stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=decode_tokens,
        sampler=make_sampler(temp=0.0),
        prompt_cache=cache,
        prefill_step_size=step,
        quantized_kv_start=0,
        **quantize,
    ):
        pass
    held, dense = cache_bytes(cache)
    return {
        "prefill_tps": last.prompt_tps,
        "decode_tps": last.generation_tps,
        "generated": last.generation_tokens,
        "peak_memory_bytes": mx.get_peak_memory(),
        "cache_bytes": held,
        "cache_dense_bytes": dense,
    }


def run_cell(model, tokenizer, context: int, kind: str, knobs: dict, args) -> dict:
    import mlx.core as mx

    mx.random.seed(args.seed + context)
    vocab = min(getattr(tokenizer, "vocab_size", 0) or 0, 32000) or 1000
    prompt = mx.random.randint(0, vocab, (context,))
    step = args.prefill_step_size
    row = {"context": context, "cache": kind}
    try:
        one_run(model, tokenizer, prompt, kind, knobs, 2, step)  # warmup: compiles, allocations
        runs = [
            one_run(model, tokenizer, prompt, kind, knobs, args.decode_tokens, step)
            for _ in range(args.repeats)
        ]
    except (RuntimeError, MemoryError, ValueError) as e:  # out of memory at long contexts
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    row.update(
        prefill_tps=statistics.median(r["prefill_tps"] for r in runs),
        decode_tps=statistics.median(r["decode_tps"] for r in runs),
        peak_memory_bytes=max(r["peak_memory_bytes"] for r in runs),
        cache_bytes=runs[-1]["cache_bytes"],
        cache_dense_bytes=runs[-1]["cache_dense_bytes"],
        runs=runs,
    )
    return row


def max_context(config: dict) -> int | None:
    value = config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings"
    )
    return value if isinstance(value, int) and value > 0 else None


def benchmark(args) -> dict:
    """One run, one model, the caches side by side at each context length: prefill tok/s,
    decode tok/s, peak memory (``mx.get_peak_memory`` after ``mx.reset_peak_memory``) and
    the cache's bytes; a warmup, then the median of ``--repeats`` runs. The prompt is
    ``context`` random token ids and EOS is ignored, so every run decodes the same number of
    tokens."""
    import platform

    import mlx.core as mx

    from .atomic_write import write_text_atomic
    from .status_line import StatusLine

    knobs = turboquant_knobs(args)
    backend = _register_kernels()
    model, tokenizer, config, description = load(args)
    tokenizer._eos_token_ids = set()  # never stop early: every run decodes the same count
    limit = max_context(config)
    contexts = sorted(set(args.contexts))
    skipped = []
    if limit and not args.beyond_max_context:
        skipped = [c for c in contexts if c + args.decode_tokens > limit]
        contexts = [c for c in contexts if c + args.decode_tokens <= limit]
    if not contexts:
        raise CommandError(
            f"every context is past the model's max_position_embeddings ({limit}) minus "
            f"--decode-tokens; give shorter --contexts or --beyond-max-context"
        )
    device = str(mx.default_device())
    result = {
        "benchmark": "generate",
        "model": description,
        "device": device,
        "device_info": {k: str(v) for k, v in mx.device_info().items()},
        "platform": platform.platform(),
        "mlx": mx.__version__,
        "kernel_backend": backend,
        "caches": {k: LABELS.get(k) or f"TurboQuantKVCache {knobs}" for k in args.caches},
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "prefill_step_size": args.prefill_step_size,
        "max_position_embeddings": limit,
        "contexts": contexts,
        "skipped_contexts": skipped,
        "notes": [MEMORY_NOTE, *([CPU_MEMORY_NOTE] if device.startswith("Device(cpu") else [])],
        "rows": [],
    }
    start = time.perf_counter()
    for context in contexts:
        for kind in args.caches:
            with StatusLine(f"context {context}, {kind} cache"):
                row = run_cell(model, tokenizer, context, kind, knobs, args)
            result["rows"].append(row)
            if args.out:  # a long run keeps what it measured if it is stopped
                write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result
