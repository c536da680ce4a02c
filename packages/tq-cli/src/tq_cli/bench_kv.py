"""`tq bench kv`: decode attention over a TurboQuant cache against fp16 and mlx-lm's 4-bit cache.

Two parts, each side by side in one run:

- ``attention``: one decode step of one attention layer (default 32 query heads over 8 KV
  heads of 128, batch 1) at each context length: ``mx.fast.scaled_dot_product_attention``
  over fp16 keys/values, mlx-lm's ``quantized_scaled_dot_product_attention`` over its 4-bit
  cache (group 64), and TurboQuant caches (fused kernels; ``-ref``: the reference path).
  One eval has a fixed cost (~110 us on the H100), so each timing chains ``calls`` steps over
  enough cache copies that they do not sit in L2, and divides; after a warmup, the median of
  ``repeats`` evals. Cache bytes are what each cache holds for the context.
- ``model`` (with ``--model DIR``): a whole model's decode with each cache
  (:mod:`tq_cli.bench_kv_model`).
"""

from __future__ import annotations

import mlx.core as mx

from .bench_kernels import time_per_call
from .bench_kv_model import render_model
from .table import format_table

DEFAULT_CONTEXTS = (8192, 32768, 131072)
DEFAULT_SETTINGS = ("K4V3", "K3V2")
_MIN_BYTES_IN_FLIGHT = 256 * 2**20


def parse_settings(text: str, sink: int = 128, buffer: int = 128) -> list[dict]:
    """``K4V3,K3.5V3.5,K3V2-prod,K4V3-ref`` -> cache knobs; ``-ref`` runs the reference
    attention instead of the fused kernels. Bad syntax -> CommandError."""
    from .kv_settings import parse_settings as parse_eval_settings

    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        ref = item.lower().endswith("-ref")
        (setting,) = parse_eval_settings(item[:-4] if ref else item)
        out.append({"name": item, "knobs": setting.knobs(sink, buffer), "reference": ref})
    return out


def _copies(nbytes: int, calls: int) -> int:
    return max(1, min(calls, -(-_MIN_BYTES_IN_FLIGHT // max(nbytes, 1))))


def _tq_cache(keys, values, knobs):
    from tq_kvcache import TurboQuantKVCache

    cache = TurboQuantKVCache(**knobs)
    cache.update_and_fetch(keys, values)
    cache.compress()
    mx.eval(cache.state)
    return cache


def _per_step(step, copies: list, calls: int, repeats: int) -> float:
    """Seconds per ``step(copy)``, cycling over ``copies`` (so they do not sit in L2)."""
    return time_per_call(
        lambda c: [step(copies[i % len(copies)]) for i in range(c)], calls, repeats
    )


def _context_rows(T, settings, heads, kv_heads, head_dim, calls, repeats) -> list[dict]:
    from mlx_lm.models.base import quantized_scaled_dot_product_attention
    from tq_kernels import kernel_backend
    from tq_kvcache.attention import cache_attention, reference_cache_attention
    from tq_kvcache.fused_attention import attend_path, fused_attention_enabled

    scale = head_dim**-0.5
    mx.random.seed(T)
    q = mx.random.normal((1, heads, 1, head_dim)).astype(mx.float16)
    k = mx.random.normal((1, kv_heads, T, head_dim)).astype(mx.float16)
    v = mx.random.normal((1, kv_heads, T, head_dim)).astype(mx.float16)
    mx.eval(q, k, v)
    rows = []

    dense = k.nbytes + v.nbytes
    kv = [(k, v)] + [(k + 0, v + 0) for _ in range(_copies(dense, calls) - 1)]
    # Only the new copies: on MLX-CUDA 0.32.4 a second mx.eval of the evaluated k and v made
    # SDPA over them read 3.3x slower at 128K (650 against 200 us; docs/kvcache.md).
    mx.eval(kv[1:])
    sec = _per_step(
        lambda c: mx.fast.scaled_dot_product_attention(q, *c, scale=scale), kv, calls, repeats
    )
    rows.append(("fp16", sec, dense, None))
    del kv

    qk, qv = mx.quantize(k, group_size=64, bits=4), mx.quantize(v, group_size=64, bits=4)
    qbytes = sum(a.nbytes for a in (*qk, *qv))
    qs = [(qk, qv)] + [
        (tuple(a + 0 for a in qk), tuple(a + 0 for a in qv))
        for _ in range(_copies(qbytes, calls) - 1)
    ]
    mx.eval(qs)
    sec = _per_step(
        lambda c: quantized_scaled_dot_product_attention(
            q, *c, scale=scale, mask=None, group_size=64, bits=4
        ),
        qs,
        calls,
        repeats,
    )
    rows.append(("mlx-lm-4bit", sec, qbytes, None))
    del qs

    for s in settings:
        first = _tq_cache(k, v, s["knobs"])
        caches = [first] + [
            _tq_cache(k, v, s["knobs"]) for _ in range(_copies(first.nbytes, calls) - 1)
        ]
        attend = reference_cache_attention if s["reference"] else cache_attention
        n = max(2, calls // 4) if s["reference"] else calls
        sec = _per_step(lambda c, f=attend: f(q, c, scale), caches, n, repeats)
        name = s["name"]
        if not s["reference"] and not fused_attention_enabled():
            if kernel_backend() is not None and mx.default_device() == mx.gpu:
                raise RuntimeError("the fused KV attention kernels did not run (see the warning)")
            name += " (reference: no GPU)"
        path = "reference" if s["reference"] else attend_path(q, first)
        rows.append((name, sec, first.nbytes, path))
        del caches
    fp16, mlx4 = rows[0][1], rows[1][1]
    out = []
    for kind, sec, nbytes, path in rows:
        row = {
            "context": T,
            "kind": kind,
            "us_per_call": sec * 1e6,
            "cache_bytes": nbytes,
            "speedup_vs_fp16": fp16 / sec,
            "speedup_vs_mlx4": mlx4 / sec,
            "compression_vs_fp16": dense / nbytes,
        }
        if path is not None:
            # TurboQuant rows: "tensor cores" or "simt" (the fused kernels' packed splits),
            # or "reference" (mlx.core ops).
            row["attend_path"] = path
        out.append(row)
    return out


def attention_rows(contexts, settings, heads=32, kv_heads=8, head_dim=128, calls=20, repeats=3):
    """Per context: fp16, mlx-lm 4-bit and each TurboQuant setting, one decode step."""
    rows = []
    for T in contexts:
        rows += _context_rows(T, settings, heads, kv_heads, head_dim, calls, repeats)
    return rows


def render(result: dict) -> str:
    out = []
    if result.get("attention"):
        table = [
            [
                r["context"],
                r["kind"],
                f"{r['us_per_call']:.1f}",
                f"{r['speedup_vs_fp16']:.2f}x",
                f"{r['speedup_vs_mlx4']:.2f}x",
                f"{r['cache_bytes'] / 2**20:.1f}",
                f"{r['compression_vs_fp16']:.2f}x",
                r.get("attend_path", ""),
            ]
            for r in result["attention"]
        ]
        head = ["context", "cache", "us/step", "vs fp16", "vs mlx 4-bit", "MiB", "compression"]
        out.append(format_table([*head, "path"], table))
    if result.get("model"):
        out.append(render_model(result["model"]))
    return "\n\n".join(out)
