"""Rows of a device probe: each printed as a JSON line when measured (a probe cut off by the
device's time limit still shows what it had) and saved together at the end, atomically."""

from __future__ import annotations

import json

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
