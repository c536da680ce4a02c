"""`tq bench generate`: fp16, mlx-lm 4-bit and TurboQuant KV caches over context lengths.

One run, one model, three caches side by side at each context length: prefill tok/s, decode
tok/s, peak memory (``mx.get_peak_memory`` after ``mx.reset_peak_memory``) and the cache's
bytes; a warmup, then the median of ``--repeats`` runs. The prompt is ``context`` random
token ids and EOS is ignored, so every run decodes the same number of tokens.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

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


def add_arguments(parser) -> None:
    from .kv_options import add_kv_arguments

    parser.add_argument(
        "--model",
        metavar="PATH|HF-ID",
        help="TurboQuant checkpoint or float model (default: SmolLM2-135M-Instruct); with "
        "--random-weights a directory holding config.json and the tokenizer is enough",
    )
    parser.add_argument("--preset", help="recipe for converting a float --model (default tq4)")
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
        type=_int_list,
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


def _int_list(text: str) -> list[int]:
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


def turboquant_knobs(args) -> dict:
    """The TurboQuant cache from the --kv-* flags; 4-bit keys and values when none are given
    (the same bits as mlx-lm's cache beside it)."""
    from .kv_options import kv_knobs

    if args.kv_bits is None and args.kv_k_bits is None and args.kv_v_bits is None:
        args.kv_bits = 4
    return kv_knobs(args)


def random_model(model_dir: Path, weights: str):
    """(model, tokenizer, config) of ``model_dir``'s architecture with random weights:
    float16 on a GPU, float32 on the CPU (its float16 matmuls are slow), TurboQuant-quantized
    for tq4/tq3."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load_config, load_tokenizer
    from tq_core import QuantRecipe, quantize_model
    from tq_core.lm.load import build_model

    try:
        config = load_config(model_dir)
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as e:
        raise CommandError(f"{model_dir}: needs config.json and the tokenizer ({e})") from None
    config.pop("quantization", None)
    try:
        model = build_model(config)
    except ValueError as e:
        raise CommandError(str(e)) from None
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.float16
    mx.random.seed(0)
    model.update(
        tree_map(lambda p: (0.02 * mx.random.normal(p.shape)).astype(dtype), model.parameters())
    )
    mx.eval(model.parameters())
    if weights.startswith("tq"):
        quantize_model(model, QuantRecipe(bits=int(weights[2:]), group_size=64))
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    model.eval()
    return model, tokenizer, config


def load(args):
    """(model, tokenizer, config, description)."""
    from .generate_cmd import load_tq, resolve_tq_model
    from .status_line import StatusLine

    if args.random_weights:
        path = Path(args.model).expanduser()
        with StatusLine(f"building {path.name} with random {args.weights} weights"):
            model, tokenizer, config = random_model(path, args.weights)
        return model, tokenizer, config, f"{path.name} (random {args.weights} weights)"
    path = resolve_tq_model(args.model, args.preset)
    with StatusLine(f"loading {path}"):
        model, tokenizer = load_tq(path)
    config = json.loads((path / "config.json").read_text())
    return model, tokenizer, config, f"{path} (TurboQuant checkpoint)"


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


def render(result: dict) -> str:
    from .table import format_table

    rows = []
    for r in result["rows"]:
        if "error" in r:
            rows.append([r["context"], r["cache"], "-", "-", "-", "-", r["error"][:40]])
            continue
        rows.append([
            r["context"], r["cache"], f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.2f}",
            f"{r['peak_memory_bytes'] / 2**20:.1f}", f"{r['cache_bytes'] / 2**20:.2f}", "",
        ])  # fmt: skip
    title = f"{result['model']} on {result['device']}: {result['decode_tokens']} decoded tokens"
    table = format_table(
        ["context", "cache", "prefill tok/s", "decode tok/s", "peak MiB", "cache MiB", "error"],
        rows,
        title=title,
    )
    extra = [f"skipped (past max_position_embeddings): {result['skipped_contexts']}"]
    return "\n".join([table, *(extra if result["skipped_contexts"] else []), *result["notes"]])


def plot(result: dict, path: str) -> None:
    """Decode tok/s, prefill tok/s, peak memory and cache bytes against context, a line per
    cache, in one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CommandError(
            "--plot needs matplotlib: pip install 'tq-cli[plot]' (or matplotlib); the JSON "
            "can be plotted later with --from-json FILE --plot FILE.png"
        ) from None
    panels = [
        ("decode_tps", "decode tok/s", 1),
        ("prefill_tps", "prefill tok/s", 1),
        ("peak_memory_bytes", "peak memory (GiB)", 2**30),
        ("cache_bytes", "KV cache (MiB)", 2**20),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for ax, (key, label, scale) in zip(axes.flat, panels):
        for kind in result["caches"]:
            rows = [r for r in result["rows"] if r["cache"] == kind and key in r]
            if rows:
                xs = [r["context"] for r in rows]
                ax.plot(xs, [r[key] / scale for r in rows], marker="o", label=kind)
        ax.set_xscale("log", base=2)
        contexts = sorted({r["context"] for r in result["rows"]})
        ax.set_xticks(contexts, [_short(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['model']} on {result['device']}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_results(paths: list[str]) -> dict:
    """One result from one or more result JSONs (runs split over several commands): the
    first file's settings, every file's rows."""
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CommandError(f"{path}: cannot read the result JSON ({e})") from None
        if not isinstance(result, dict) or result.get("benchmark") != "generate":
            raise CommandError(f"{path}: not a tq bench generate result")
        results.append(result)
    merged = dict(results[0])
    merged["rows"] = [row for r in results for row in r.get("rows", [])]
    merged["contexts"] = sorted({row["context"] for row in merged["rows"]})
    merged["skipped_contexts"] = sorted(
        {c for r in results for c in r.get("skipped_contexts", [])} - set(merged["contexts"])
    )
    merged["caches"] = {k: v for r in results for k, v in r.get("caches", {}).items()}
    if len(results) > 1:
        merged["merged_from"] = paths
    return merged


def _short(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


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
