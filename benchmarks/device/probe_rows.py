"""Rows of a device probe: each printed as a JSON line when measured (a probe cut off by the
device's time limit still shows what it had) and saved together at the end, atomically; the
``--context`` / ``--json`` arguments the one-context probes share; and the host-cost timing
the call-cost probes share."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
from tq_cli.atomic_write import write_text_atomic


class ProbeRows:
    """``emit(**row)`` prints and keeps a row; ``save()`` writes ``{"benchmark": name,
    "rows": [...]}`` to ``path`` (nothing without a path)."""

    def __init__(self, name: str, path: str | None):
        self.name, self.path, self.rows = name, path, []

    def emit(self, **row) -> dict:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def save(self) -> None:
        if self.path:
            doc = {"benchmark": self.name, "rows": self.rows}
            write_text_atomic(self.path, json.dumps(doc) + "\n")


def context_probe(name: str, default: int = 131072) -> tuple[int, ProbeRows]:
    """(context, rows) from ``--context T --json F`` on the command line."""
    ap = argparse.ArgumentParser(description=name)
    ap.add_argument("--context", type=int, default=default)
    ap.add_argument("--json")
    a = ap.parse_args()
    return a.context, ProbeRows(name, a.json)


def host_cost_us(make, calls: int) -> tuple[float, float]:
    """(build, eval) us per call of ``make()``: ``calls`` calls recorded (build), then
    evaluated in one ``mx.eval`` (eval: MLX's ``eval_gpu`` of each node and a GPU time that
    is tiny for these calls); medians of 5 rounds after a warmup round."""
    builds, evals = [], []
    for _ in range(6):
        mx.synchronize()
        t0 = time.perf_counter()
        outs = [make() for _ in range(calls)]
        t1 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        t2 = time.perf_counter()
        builds.append((t1 - t0) / calls * 1e6)
        evals.append((t2 - t1) / calls * 1e6)
    return statistics.median(builds[1:]), statistics.median(evals[1:])
