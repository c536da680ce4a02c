"""The table `tq bench stream` prints: one row per run, the sequential read and RSS target below."""

from __future__ import annotations

from .table import format_table


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.3f}"


def render(result: dict) -> str:
    m, s = result["model"], result["sizes"]
    rows = []
    for r in result["rows"]:
        streamed = r["run"] != "resident"
        rows.append(
            [
                r["run"],
                f"{r['tok_per_s']:.2f}",
                f"{r['ratio_to_resident']:.2f}",
                f"{100 * r['hit_rate']:.1f}%" if streamed else "-",
                _gb(r.get("bytes_read")),
                f"{r['read_gb_per_s']:.2f}" if streamed else "-",
                f"{r['stall_ms_per_token']:.1f}" if streamed else "-",
                _gb(r["peak_rss_bytes"]),
                _gb(r["peak_rss_above_baseline_bytes"]),
                _gb(r["decode_peak_rss_above_baseline_bytes"]),
                _gb(r.get("rss_target_bytes")),
                ("yes" if r["rss_target_met"] else "NO") if streamed else "-",
                "yes" if r["tokens_equal"] and r["logits_equal"] else "NO",
            ]
        )
    title = (
        f"{m['model_type']}: {m['num_hidden_layers']} layers x {m['num_experts']} experts "
        f"(top-{m['num_experts_per_tok']}), hidden {m['hidden_size']}, TQ{m['bits']}; "
        f"{_gb(s['file_bytes'])} GB on disk, experts {_gb(s['expert_bytes'])} GB; budget "
        f"{100 * result['budget_fraction']:g}% = {_gb(result['budget_bytes'])} GB"
    )
    headers = ["run", "tok/s", "x resident", "hit rate", "read GB", "read GB/s",
               "stall ms/tok", "peak RSS GB", "- baseline", "decode only", "target GB", "met",
               "bit-equal"]  # fmt: skip
    seq, target = result["sequential_read"], result["rss_target"]
    base = result["baseline_process"]["peak_rss_bytes"]
    foot = [
        f"sequential read of the same files: {seq['gb_per_s']:.2f} GB/s "
        f"({_gb(seq['bytes'])} GB, {seq['chunk_bytes'] >> 20} MiB reads, page cache dropped)",
        f"baseline process (imports only): {_gb(base)} GB RSS; target = (budget + non-expert "
        f"{_gb(target['non_expert_bytes_in_memory'])} GB) x {1 + target['slack']:g}, "
        "compared with peak RSS - baseline (whole process; 'decode only': the peak of "
        "the timed decode steps - baseline)",
    ]
    return "\n".join([format_table(headers, rows, title=title), *foot])
