"""Summarize weight_quality.py rows (JSONL) as a markdown table: mean and spread over seeds.

usage: python benchmarks/quality_table.py results.jsonl
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[re.sub(r"-s\d+", "", r["name"])].append(r)  # seeds of one config together
    print(
        "| config | bits/weight (quantized layers) | bits/weight (all matrices) | seeds | "
        "PPL mean | PPL min-max |"
    )
    print("|---|---|---|---|---|---|")
    for name, rs in groups.items():
        ppl = [r["ppl"] for r in rs]
        seeds = sorted({r.get("seed", 0) for r in rs}) if rs[0]["kind"] == "tq" else ["-"]
        spread = f"{min(ppl):.2f}-{max(ppl):.2f}" if len(ppl) > 1 else "-"
        r0 = rs[0]
        # Rows written before model_bits_per_weight existed: SmolLM2-135M has 134,479,872
        # Linear/Embedding weights (counted by weight_quality.py since).
        total = r0.get("matrix_weights", 134_479_872)
        model_bpw = r0.get("model_bits_per_weight") or (
            (
                r0["bits_per_weight"] * r0["quantized_weights"]
                + (total - r0["quantized_weights"]) * 16
            )
            / total
        )
        print(
            f"| {name} | {r0['bits_per_weight']:.3f} | {model_bpw:.3f} | "
            f"{','.join(map(str, seeds))} | {statistics.mean(ppl):.2f} | {spread} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
