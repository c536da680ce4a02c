"""`tq bench stream`: a synthetic MoE checkpoint decoded resident and with experts streamed.

Building the checkpoint is `bench_stream_checkpoint`, the runs `bench_stream_measure` (each
in a `bench_stream_worker` process), the JSON `bench_stream_result`, the table
`bench_stream_table`; this module checks the arguments and reuses, builds and removes the
checkpoint around the runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .bench_stream_checkpoint import (
    BITS,
    EMBED_SCALE,
    GROUP,
    SCALE,
    build_checkpoint,
    synthetic_config,
)
from .bench_stream_measure import measure, say
from .bench_stream_table import render
from .main import CommandError

__all__ = ["render", "run"]

SPEC_FILE = "tq-bench-stream.json"  # next to config.json: what was built, for --keep reuse


def _check(args) -> None:
    if not args.gb > 0:
        raise CommandError(f"--gb must be positive, got {args.gb}")
    if not 0 < args.budget <= 1:
        raise CommandError(
            f"--budget must be in (0, 1] (a fraction of the expert bytes), got {args.budget}"
        )
    if args.tokens < 1:
        raise CommandError(f"--tokens must be at least 1, got {args.tokens}")


def _checkpoint(args, config: dict, estimate: int, root: Path) -> tuple[Path, bool]:
    """The checkpoint under ``root``: reused when a kept one of this very spec is there,
    built otherwise. ``(path, built)``."""
    path = root / "checkpoint"
    spec = {"config": config, "bits": BITS, "group_size": GROUP, "scale": SCALE,
            "embed_scale": EMBED_SCALE, "seed": 0}  # fmt: skip
    marker = path / SPEC_FILE
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == spec:
                say(f"reusing the checkpoint at {path}")
                return path, False
        except (OSError, json.JSONDecodeError):
            pass
    if path.exists():
        raise CommandError(
            f"{path} exists and is not this benchmark's checkpoint: remove it or use another --dir"
        )
    free = shutil.disk_usage(root).free
    need = int(estimate * 1.05) + (256 << 20)
    if free < need:
        raise CommandError(
            f"not enough disk space at {root}: the checkpoint needs {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free (use --dir elsewhere or a smaller --gb)"
        )
    say(f"building a {estimate / 1e9:.2f} GB checkpoint at {path}")
    build_checkpoint(path, config, seed=0, progress=True)
    marker.write_text(json.dumps(spec))
    return path, True


def run(args) -> dict:
    _check(args)
    config, estimate = synthetic_config(args.gb * 1e9)
    made_root = args.dir is None
    root = Path(tempfile.mkdtemp(prefix="tq-bench-stream-")) if made_root else Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    path = None
    try:
        path, built = _checkpoint(args, config, estimate, root)
        return measure(args, path, config, built)
    finally:
        if not args.keep:
            if made_root:
                shutil.rmtree(root, ignore_errors=True)
            elif path is not None:
                shutil.rmtree(path, ignore_errors=True)
        elif path is not None:
            say(f"kept the checkpoint at {path}")
