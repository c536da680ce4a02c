"""The result of `tq bench stream`: per-run rows and the JSON document around them."""

from __future__ import annotations

from .bench_stream_checkpoint import BITS, EMBED_SCALE, GROUP, PROMPT_LEN, SCALE

RSS_SLACK = 0.10


def _row(name: str, r: dict, resident: dict, base_rss: int, target) -> dict:
    row = {
        "run": name,
        "tok_per_s": r["tok_per_s"],
        "tok_per_s_each": r["tok_per_s_each"],
        "ratio_to_resident": r["tok_per_s"] / resident["tok_per_s"],
        "decode_seconds": r["decode_seconds"],
        "tokens_equal": r["tokens"] == resident["tokens"],
        "logits_equal": r["logits_sha256"] == resident["logits_sha256"],
        "finite": r["finite"],
        "peak_rss_bytes": r["peak_rss_bytes"],
        "peak_rss_above_baseline_bytes": r["peak_rss_bytes"] - base_rss,
        "rss_after_load_bytes": r["rss_after_load_bytes"],
        "model_bytes_in_memory": r["model_bytes_in_memory"],
        "mlx_peak_memory_bytes": r["mlx_peak_memory_bytes"],
        "decode_peak_rss_bytes": r["decode_peak_rss_bytes"],
        "decode_peak_rss_above_baseline_bytes": (
            None if r["decode_peak_rss_bytes"] is None else r["decode_peak_rss_bytes"] - base_rss
        ),
        "decode_mlx_peak_memory_bytes": r["decode_mlx_peak_memory_bytes"],
        "load_seconds": r["load_seconds"],
    }
    if name == "resident":
        return row
    c = r["decode_counters"]
    above = row["peak_rss_above_baseline_bytes"]
    row.update(
        prefetch_ahead=name.endswith("prefetch"),
        hit_rate=c["hit_rate"],
        hits=c["hits"],
        misses=c["misses"],
        evictions=c["evictions"],
        bytes_read=c["bytes_read"],
        reads=c["reads"],
        read_gb_per_s=c["read_gb_per_s"],
        stall_gb_per_s=c["bytes_read"] / c["stall_seconds"] / 1e9 if c["stall_seconds"] else 0.0,
        stall_ms_per_token=c["stall_ms_per_token"],
        prefetched=c["prefetched"],
        prefetch_used=c["prefetch_used"],
        prefetch_enabled_at_end=r["prefetch_enabled_at_end"],
        cache_bytes_at_end=r["session_report"]["cache_bytes"],
        whole_process_report=r["session_report"],
        rss_target_bytes=target,
        rss_target_met=above <= target,
        rss_target_met_raw=r["peak_rss_bytes"] <= target,
        rss_target_met_decode=(
            None
            if row["decode_peak_rss_above_baseline_bytes"] is None
            else row["decode_peak_rss_above_baseline_bytes"] <= target
        ),
        cache_bytes_held=r["cache_bytes_held"],
        cache_bytes_consistent=r["cache_bytes_consistent"],
        page_cache_fraction_before=r["cached_fraction_before"],
    )
    return row


def assemble(args, config, sizes, budget, per_expert, built, runs: dict, seq: dict) -> dict:
    baseline, resident = runs["baseline"], runs["resident"]
    streamed = {k: v for k, v in runs.items() if k.startswith("streamed")}
    base_rss = baseline["peak_rss_bytes"]
    non_expert_mem = next(iter(streamed.values()))["model_bytes_in_memory"]
    target = int((budget + non_expert_mem) * (1 + RSS_SLACK))
    rows = [
        _row(name, r, resident, base_rss, target)
        for name, r in [("resident", resident), *streamed.items()]
    ]
    streamed_rows = [r for r in rows if r["run"] != "resident"]
    greedy = resident["tokens"]
    command = "tq bench stream"
    for flag, value, default in (("--gb", args.gb, 4.0), ("--budget", args.budget, 0.25),
                                 ("--tokens", args.tokens, 32)):  # fmt: skip
        if value != default:
            command += f" {flag} {value:g}"
    return {
        "benchmark": "stream",
        "command": command,
        "device": resident["device"],
        "cpu_blas": resident["cpu_blas"],
        "checkpoint_built_now": built,
        "model": {
            **{
                k: config[k]
                for k in (
                    "model_type",
                    "hidden_size",
                    "num_hidden_layers",
                    "moe_intermediate_size",
                    "num_experts",
                    "num_experts_per_tok",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "head_dim",
                    "vocab_size",
                )
            },
            "bits": BITS,
            "group_size": GROUP,
            "expert_bytes_each": per_expert,
            "weights": f"random codes; random fp16 scales of {SCALE} x U(0.5, 1.5), "
            f"{EMBED_SCALE} x U(0.5, 1.5) for the embedding",
        },  # fmt: skip
        "sizes": sizes,
        "budget_fraction": args.budget,
        "budget_bytes": budget,
        "decode": {
            "prompt_tokens": PROMPT_LEN,
            "decode_tokens": args.tokens,
            "repeats": resident["repeats"],
            "warmup": "one prompt, min(4, tokens) greedy steps, before the timed runs",
            "tok_per_s": "greedy decode steps / their wall time (prefill excluded), median "
            "of the repeats, each with its own random prompt, the same in every run",
            "counters": "hit rate, bytes, read GB/s and stall are of the timed decode "
            "steps only; read GB/s is bytes / the summed duration of the reads (with "
            "parallel reads that is the rate of one read stream, not the aggregate); "
            "stall GB/s is bytes / the time the forward pass waited for them (reads and "
            "conversion to arrays; all reads are stalls when prefetch is off)",
            "resident_greedy_tokens": greedy,
            "distinct_greedy_tokens": len({t for run in greedy for t in run}),
        },
        "sequential_read": seq,
        "baseline_process": {
            "what": "a process that imports mlx, mlx_lm, tq_core and tq_stream and loads "
            "no weights",
            "peak_rss_bytes": base_rss,
        },
        "rss_measure": "VmHWM of each worker process (its own address space's peak; "
        "reset with /proc/self/clear_refs for the decode-only peak); "
        "ru_maxrss is also recorded per process but on Linux it inherits the parent's "
        "peak across fork+exec",
        "rss_target": {
            "budget_bytes": budget,
            "non_expert_bytes_in_memory": non_expert_mem,
            "non_expert_bytes_on_disk": sizes["non_expert_bytes"],
            "slack": RSS_SLACK,
            "target_bytes": target,
            "comparison": "rss_target_met: peak RSS of the streamed process minus the "
            "baseline process's peak RSS <= (budget + non-expert weight bytes as held in "
            "memory, float32 on the CPU) x 1.1, the peak taken over the whole process "
            "(load, warmup, prefill, decode); rss_target_met_raw compares the peak RSS "
            "itself, the Python + MLX floor included; rss_target_met_decode the peak of "
            "the timed decode steps alone (the kernel's mark reset after the prefill)",
            "met": all(r["rss_target_met"] for r in streamed_rows),
            "met_raw": all(r["rss_target_met_raw"] for r in streamed_rows),
        },
        "tokens_equal": all(r["tokens_equal"] for r in streamed_rows),
        "logits_equal": all(r["logits_equal"] for r in streamed_rows),
        "processes": {
            "baseline": baseline,
            **{
                name: {k: v for k, v in r.items() if k not in ("tokens", "logits_sha256")}
                for name, r in [("resident", resident), *streamed.items()]
            },
        },
        "rows": rows,
    }
