"""One measurement of `tq bench stream` in a process of its own (so its peak RSS is its own).

``python -m tq_cli.bench_stream_worker SPEC.json RESULT.json``: SPEC names the mode
(``baseline``: import the libraries and load nothing; ``resident``: the whole checkpoint in
memory; ``streamed``: experts through tq-stream's byte-budgeted cache) and the decode
settings; RESULT gets tok/s, the generated token ids, a digest of every step's logits, the
streaming counters of the decode steps, and the process's RSS figures.

Peak RSS is the kernel's high-water mark of this process's address space (``VmHWM``): on
Linux ``ru_maxrss`` survives fork and exec, so a child reports at least its parent's peak.
"""

from __future__ import annotations

import hashlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path


def _status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc (bytes), None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _ru_maxrss() -> int:
    """``ru_maxrss`` in bytes (KiB on Linux); inherited from the parent across fork+exec."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


_peak_seen = [0]  # the highest VmHWM read before a reset
_mlx_peak_seen = [0]  # the highest mx.get_peak_memory() before a reset


def _peak_rss() -> int:
    """Peak resident set size of this process's own address space so far, bytes (resets
    of the kernel's mark by _reset_peak included)."""
    hwm = _status_bytes("VmHWM")
    if hwm is None:
        return _ru_maxrss()
    _peak_seen[0] = max(_peak_seen[0], hwm)
    return _peak_seen[0]


def _reset_peak() -> bool:
    """Set the kernel's VmHWM back to the current RSS (Linux ``clear_refs`` 5), so the
    peak of the next phase can be read on its own; False where that is not possible."""
    _peak_rss()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _import_libraries():
    import mlx.core as mx
    import mlx.nn  # noqa: F401
    import mlx_lm  # noqa: F401
    import tq_core.lm.load  # noqa: F401
    import tq_stream  # noqa: F401
    from mlx_lm.models.cache import make_prompt_cache  # noqa: F401

    mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))  # load the CPU backend and its BLAS
    return mx


_COUNTERS = ("hits", "misses", "evictions", "stall_seconds", "prefetched", "prefetch_used")


def _counters(session) -> dict:
    """Cumulative streaming counters (waits for a prefetch in flight)."""
    if session.prefetcher is not None:
        session.prefetcher.wait()
    stats = session.cache.stats
    rs = session.reader.stats
    out = {k: getattr(stats, k) for k in _COUNTERS}
    out.update(bytes_read=rs.bytes, reads=rs.reads, read_seconds=rs.seconds)
    return out


def _greedy(model, prompt: list[int], steps: int, session=None) -> dict:
    """Prefill ``prompt``, then ``steps`` greedy decode steps; the decode steps are timed
    and, when streaming, their counters taken apart from the prefill's."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    tok = mx.argmax(logits, axis=-1)
    tokens = [tok.item()]
    prefill_s = time.perf_counter() - t0
    digest.update(np.array(logits).tobytes())
    before = _counters(session) if session is not None else None
    reset = _reset_peak()
    _mlx_peak_seen[0] = max(_mlx_peak_seen[0], mx.get_peak_memory())
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model(tok[None], cache=cache)[:, -1]
        tok = mx.argmax(logits, axis=-1)
        tokens.append(tok.item())
        digest.update(np.array(logits).tobytes())
    decode_s = time.perf_counter() - t0
    out = {
        "decode_peak_rss_bytes": _status_bytes("VmHWM") if reset else None,
        "decode_mlx_peak_memory_bytes": mx.get_peak_memory(),
        "tokens": tokens,
        "logits_sha256": digest.hexdigest(),
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "tok_per_s": steps / decode_s if decode_s else 0.0,
        "finite": bool(np.isfinite(np.array(logits)).all()),
    }
    if session is not None:
        after = _counters(session)
        out["counters"] = {k: after[k] - before[k] for k in after}
    return out


def _sum_counters(runs: list[dict], tokens: int) -> dict:
    total = {k: sum(r["counters"][k] for r in runs) for k in runs[0]["counters"]}
    lookups = total["hits"] + total["misses"]
    total["hit_rate"] = total["hits"] / lookups if lookups else 0.0
    total["read_gb_per_s"] = (
        total["bytes_read"] / total["read_seconds"] / 1e9 if total["read_seconds"] else 0.0
    )
    total["stall_ms_per_token"] = 1e3 * total["stall_seconds"] / tokens if tokens else 0.0
    return total


def _summary(runs: list[dict], steps: int, session) -> dict:
    each = [r["tok_per_s"] for r in runs]
    out = {
        "tok_per_s": statistics.median(each),
        "tok_per_s_each": each,
        "tokens": [r["tokens"] for r in runs],
        "logits_sha256": [r["logits_sha256"] for r in runs],
        "prefill_seconds": [r["prefill_seconds"] for r in runs],
        "decode_seconds": [r["decode_seconds"] for r in runs],
        "finite": all(r["finite"] for r in runs),
        "decode_mlx_peak_memory_bytes": max(r["decode_mlx_peak_memory_bytes"] for r in runs),
    }
    peaks = [r["decode_peak_rss_bytes"] for r in runs]
    out["decode_peak_rss_bytes"] = None if None in peaks else max(peaks)
    if session is not None:
        out["decode_counters"] = _sum_counters(runs, steps * len(runs))
    return out


def _model_bytes(model) -> int:
    """Bytes of the parameters a model holds, the templates of streamed expert blocks
    (their shared rotation signs) included; the streamed experts themselves are not."""
    from mlx.utils import tree_flatten
    from tq_stream import StreamedExperts

    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    for _, m in model.named_modules():
        if isinstance(m, StreamedExperts):
            total += sum(v.nbytes for _, v in tree_flatten(m._template.parameters()))
    return total


def measure(spec: dict) -> dict:
    mx = _import_libraries()
    from tq_cli.blas_check import blas_in_use

    result = {"mode": spec["mode"], "cpu_blas": blas_in_use(), "device": str(mx.default_device())}
    if spec["mode"] == "baseline":
        result["peak_rss_bytes"] = _peak_rss()
        result["ru_maxrss_bytes"] = _ru_maxrss()
        result["rss_bytes"] = _status_bytes("VmRSS")
        return result
    session = None
    t0 = time.perf_counter()
    if spec["mode"] == "resident":
        from tq_core.lm.load import load

        model, _ = load(spec["path"], tokenizer=False)
    else:
        from tq_stream import load_streaming

        model, _, session = load_streaming(
            spec["path"],
            spec["budget_bytes"],
            workers=spec["workers"],
            prefetch_ahead=spec["prefetch_ahead"],
            tokenizer=False,
        )
    result["load_seconds"] = time.perf_counter() - t0
    result["model_bytes_in_memory"] = _model_bytes(model)
    result["rss_after_load_bytes"] = _status_bytes("VmRSS")
    result["peak_rss_after_load_bytes"] = _peak_rss()

    steps = spec["tokens"]
    _greedy(model, spec["warmup_prompt"], min(4, steps), session)  # warmup
    runs, started = [], time.perf_counter()
    for i, prompt in enumerate(spec["prompts"]):
        runs.append(_greedy(model, prompt, steps, session))
        cap = spec.get("time_cap_seconds")
        if cap is not None and i + 1 < len(spec["prompts"]) and time.perf_counter() - started > cap:
            break  # the streamed runs repeat what the resident run managed
    result["repeats"] = len(runs)
    result.update(_summary(runs, steps, session))
    if session is not None:
        result["session_report"] = session.report(tokens=steps * len(runs))
        result["prefetch_enabled_at_end"] = result["session_report"]["prefetch_enabled"]
        # The cache's byte count against the sizes of the entries it holds.
        held = sum(size for _, size in session.cache._entries.values())
        result["cache_bytes_held"] = held
        result["cache_bytes_consistent"] = held == session.cache.nbytes
        session.close()
    result["mlx_peak_memory_bytes"] = max(_mlx_peak_seen[0], mx.get_peak_memory())
    result["rss_bytes"] = _status_bytes("VmRSS")
    result["peak_rss_bytes"] = _peak_rss()
    result["ru_maxrss_bytes"] = _ru_maxrss()
    return result


def main(argv: list[str] | None = None) -> int:
    spec_file, result_file = argv if argv is not None else sys.argv[1:3]
    spec = json.loads(Path(spec_file).read_text())
    result = measure(spec)
    Path(result_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
