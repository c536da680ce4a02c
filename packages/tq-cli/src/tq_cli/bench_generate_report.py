"""`tq bench generate` results: the table, the plot, and merging result JSONs."""

from __future__ import annotations

import json
from pathlib import Path

from .main import CommandError


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
