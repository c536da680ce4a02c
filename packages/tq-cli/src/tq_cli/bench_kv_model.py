"""`tq bench kv --model`: a whole model's decode with the fp16, mlx-lm 4-bit and TurboQuant
caches, side by side in one run.

The model is a config's architecture with random fp16 weights (:func:`random_model`),
filled to each context with each cache by mlx-lm's own ``generate_step`` (:func:`prefill`;
``fill="random"``: random keys and values, :func:`random_fill`): peak memory during prefill
(``mx.get_peak_memory``), cache bytes, and decode tokens/s twice: a loop that evaluates
each token before it builds the next step (host and GPU time add up), and mlx-lm's own
pipelined ``generate_step`` (:func:`generate_rate`), what ``mlx_lm.generate`` users get.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import mlx.core as mx

from .table import format_table

#: Prefill chunk, as mlx-lm's ``prefill_step_size``.
PREFILL_STEP = 2048


def random_model(model_dir: str):
    """``model_dir``'s architecture with random float weights (fp16 on a GPU): speed and
    memory do not depend on their values."""
    from .bench_generate_model import random_model as build

    return build(Path(model_dir).expanduser(), "fp16")[0]


def make_cache(model, kind: str, setting: dict | None):
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    layers = len(model.layers)
    if kind == "fp16":
        return [KVCache() for _ in range(layers)]
    if kind == "mlx-lm-4bit":
        return [QuantizedKVCache(group_size=64, bits=4) for _ in range(layers)]
    from tq_kvcache import install_attention_hook, make_turboquant_cache

    install_attention_hook(model)
    return make_turboquant_cache(model, **setting["knobs"])


def _cache_bytes(cache) -> int:
    return sum(c.nbytes for c in cache)


def prefill(model, prompt: mx.array, cache: list) -> mx.array:
    """Prefill ``prompt`` into ``cache`` with mlx-lm's own ``generate_step`` (all but the last
    token in chunks of 2048 with only the caches evaluated, then the last token), generating
    nothing. Returns the token a decode step starts from (1,): the prompt's last (the
    weights are random, so which token it is does not matter)."""
    from mlx_lm.generate import generate_step

    steps = generate_step(
        prompt, model, max_tokens=0, prompt_cache=cache, prefill_step_size=PREFILL_STEP
    )
    for _ in steps:  # max_tokens=0: prefills, evaluates the first token, yields nothing
        pass
    return prompt[-1:]


#: ``--model-fill``: how the bench fills the caches before decoding.
FILLS = ("prefill", "random")
_FILL_CHUNK = 4096


def random_fill(model, cache: list, tokens: int) -> mx.array:
    """Every layer's cache holding ``tokens`` random fp16 keys and values, written in chunks
    of 4096 through ``update_and_fetch`` (a TurboQuant cache compresses them as a prefill
    would); returns the token a decode step starts from. Decode speed does not depend on
    what the caches hold, and a 128K prefill of a 3B model takes minutes; prefill speed and
    peak memory are then not measured."""
    args = getattr(model, "args", None)
    kv_heads = getattr(args, "num_key_value_heads", None)
    heads = getattr(args, "num_attention_heads", None)
    if not kv_heads or not heads or len(cache) != len(model.layers):
        raise ValueError(
            "--model-fill random needs an attention model with one KV cache a layer "
            "(num_attention_heads, num_key_value_heads); use --model-fill prefill"
        )
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    for layer in cache:
        for start in range(0, tokens, _FILL_CHUNK):
            n = min(_FILL_CHUNK, tokens - start)
            k, v = (mx.random.normal((1, kv_heads, n, head_dim)).astype(mx.float16) for _ in "kv")
            mx.eval(layer.update_and_fetch(k, v))
    return mx.array([0])


def _warm_up(model, kind: str, setting, prompt: mx.array) -> None:
    """A short prefill (two chunks, so a TurboQuant cache attends over packed tokens) and
    two decode steps."""
    cache = make_cache(model, kind, setting)
    tok = prefill(model, prompt[: 2 * PREFILL_STEP + 1], cache)
    for _ in range(2):
        tok = mx.argmax(model(tok[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(tok)


def generate_rate(model, tok: mx.array, cache: list, tokens: int) -> tuple[float, mx.array]:
    """(tokens/s, last token) of ``tokens`` greedy steps of mlx-lm's own ``generate_step``
    from ``tok`` over the filled ``cache``: the loop ``mlx_lm.generate`` runs, which builds
    step n + 1's graph while the GPU runs step n (``mx.async_eval``). The clock starts
    after its second token: the first is the one-token prompt's step, and right after it
    ``generate_step`` empties MLX's buffer cache (``mx.clear_cache()`` every 256 tokens from
    the first), which a long generation pays once in 256 tokens and a short timing would
    pay in full."""
    from mlx_lm.generate import generate_step

    steps = generate_step(tok, model, max_tokens=tokens + 2, prompt_cache=cache)
    next(steps)
    last, _ = next(steps)
    t0 = time.perf_counter()
    n = 0
    for last, _ in steps:
        n += 1
    return n / (time.perf_counter() - t0), mx.array([last])


def decode_rate(model, tok: mx.array, cache: list, tokens: int) -> tuple[float, mx.array]:
    """(tokens/s, last token) of ``tokens`` greedy steps that each evaluate their token
    before the next step's graph is built: host and GPU time add up."""
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = mx.argmax(model(tok[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(tok)
    return tokens / (time.perf_counter() - t0), tok


def model_rows(
    model, contexts, settings, decode_tokens=32, repeats=3, progress=None, fill="prefill"
):
    """Prefill each context with each cache, then decode: peak memory, bytes, tokens/s
    (``decode``: a loop that evaluates each token before building the next step, so host
    and GPU time add up; ``generate``: mlx-lm's pipelined ``generate_step``). Every cache of
    a context is kept filled, and the decode rounds visit them in turn (one round of each
    cache, then the next round), so a drift of the host's speed reaches every cache alike;
    the first round is a warmup, the rest give the median. ``fill="random"`` fills the
    caches with :func:`random_fill` instead of a prefill (its rows have no prefill speed
    or peak)."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    rows = []
    kinds = [("fp16", None), ("mlx-lm-4bit", None)] + [(s["name"], s) for s in settings]
    vocab = model.args.vocab_size if hasattr(model, "args") else 32000
    warm = set()
    for T in contexts:
        prompt = mx.random.randint(0, vocab, (T,), key=mx.random.key(T))
        live = {}  # kind -> [row, cache, last token, decode rates, generate rates]
        for kind, setting in kinds:
            if kind not in warm:  # compile each cache's kernels outside the timings
                warm.add(kind)
                try:
                    _warm_up(model, kind, setting, prompt)
                except Exception:  # reported by the measured run below
                    pass
            if progress:
                progress(f"{kind} @ {T} tokens: prefill")
            try:
                cache = make_cache(model, kind, setting)
                mx.synchronize()
                mx.clear_cache()
                mx.reset_peak_memory()
                base = mx.get_active_memory()
                t0 = time.perf_counter()
                if fill == "random":
                    tok = random_fill(model, cache, T)
                else:
                    tok = prefill(model, prompt, cache)
                prefill_s = time.perf_counter() - t0
                prefilled = fill == "prefill"
                row = {
                    "context": T,
                    "kind": kind,
                    "fill": fill,
                    "prefill_tok_per_s": T / prefill_s if prefilled else None,
                    "prefill_peak_bytes": mx.get_peak_memory() - base if prefilled else None,
                    "cache_bytes": _cache_bytes(cache),
                }
                rows.append(row)
                live[kind] = [row, cache, tok, [], []]
            except Exception as exc:  # e.g. MLX has no kernel for this cache on this GPU
                rows.append({"context": T, "kind": kind, "error": f"{type(exc).__name__}: {exc}"})
        for r in range(repeats + 1):
            if progress:
                progress(f"{T} tokens: decode round {r + 1} of {repeats + 1}")
            for kind, entry in list(live.items()):
                try:
                    rate, entry[2] = decode_rate(model, entry[2], entry[1], decode_tokens)
                    entry[3].append(rate)
                    rate, entry[2] = generate_rate(model, entry[2], entry[1], decode_tokens)
                    entry[4].append(rate)
                except Exception as exc:
                    entry[0]["error"] = f"{type(exc).__name__}: {exc}"
                    del live[kind]
        for row, _, _, decode, generate in live.values():
            row["decode_tok_per_s"] = statistics.median(decode[1:])
            row["generate_tok_per_s"] = statistics.median(generate[1:])
        live.clear()
        mx.clear_cache()
        fp16 = {r["kind"]: r for r in rows if r["context"] == T}["fp16"]
        for r in rows:
            if r["context"] == T and "error" not in r and "error" not in fp16:
                r["decode_vs_fp16"] = r["decode_tok_per_s"] / fp16["decode_tok_per_s"]
                r["generate_vs_fp16"] = r["generate_tok_per_s"] / fp16["generate_tok_per_s"]
                if fill == "prefill":
                    peak = r["prefill_peak_bytes"] / max(fp16["prefill_peak_bytes"], 1)
                    r["peak_vs_fp16"] = peak
    return rows


def _prefill_cells(row: dict) -> list[str]:
    """Prefill tok/s, peak MiB and peak vs fp16, or dashes where the caches were filled
    with random keys and values (nothing prefilled)."""
    if row.get("prefill_tok_per_s") is None:
        return ["-", "-", "-"]
    return [
        f"{row['prefill_tok_per_s']:.0f}",
        f"{row['prefill_peak_bytes'] / 2**20:.0f}",
        f"{row['peak_vs_fp16']:.2f}x",
    ]


def render_model(rows: list[dict]) -> str:
    """The whole-model rows as a table (errors in their own cell)."""
    table = [
        [r["context"], r["kind"], "error: " + r["error"][:60], *[""] * 7]
        if "error" in r
        else [
            r["context"],
            r["kind"],
            f"{r['decode_tok_per_s']:.1f}",
            f"{r['decode_vs_fp16']:.2f}x",
            f"{r['generate_tok_per_s']:.1f}",
            f"{r['generate_vs_fp16']:.2f}x",
            *_prefill_cells(r),
            f"{r['cache_bytes'] / 2**20:.1f}",
        ]
        for r in rows
    ]
    head = ["context", "cache", "decode tok/s", "vs fp16", "generate tok/s", "vs fp16"]
    head += ["prefill tok/s", "prefill peak MiB", "peak vs fp16", "cache MiB"]
    return format_table(head, table)
