"""The measurements of `tq bench stream`: each run in a `bench_stream_worker` process of its own.

Every measurement runs in a subprocess of its own (`tq_cli.bench_stream_worker`), so each
peak RSS is its own: a process that only imports the libraries (the RSS floor of Python +
MLX), the resident model, and the streamed model with ``--budget`` x the expert bytes,
look-ahead prefetch off and on. The streamed runs must produce the resident run's token ids
and logits bit for bit. The page cache of the checkpoint is dropped before each streamed run
and before a plain sequential read of the same files, the disk's own speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_stream_checkpoint import PROMPT_LEN, VOCAB, checkpoint_sizes, shards
from .bench_stream_disk import cached_fraction, drop_page_cache, sequential_read
from .bench_stream_result import assemble
from .main import CommandError

REPEATS = 3
WORKERS = 8  # load_streaming's default parallel reads
RESIDENT_TIME_CAP_S = 240.0  # stop repeating after this much decoding (all runs follow)


def run_worker(spec: dict, scratch: Path) -> dict:
    """Run one measurement in a fresh interpreter with this process's environment
    (LD_PRELOAD included) and return its result."""
    spec_file = scratch / f"spec-{spec['name']}.json"
    result_file = scratch / f"result-{spec['name']}.json"
    spec_file.write_text(json.dumps(spec))
    result_file.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "tq_cli.bench_stream_worker", str(spec_file), str(result_file)],
        env=dict(os.environ),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not result_file.exists():
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise CommandError(f"the {spec['name']} run failed: {last}")
    return json.loads(result_file.read_text())


def random_prompts(seed: int, n: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(2, VOCAB, size=PROMPT_LEN).tolist() for _ in range(n)]


def say(message: str) -> None:
    print(f"tq bench stream: {message}", file=sys.stderr, flush=True)


def measure(args, path: Path, config: dict, built: bool) -> dict:
    sizes = checkpoint_sizes(path)
    files = shards(path)
    top_k, experts = config["num_experts_per_tok"], config["num_experts"]
    layers = config["num_hidden_layers"]
    per_expert = sizes["expert_bytes"] // (experts * layers)
    budget = int(args.budget * sizes["expert_bytes"])
    if budget < top_k * per_expert:
        raise CommandError(
            f"--budget {args.budget} gives {budget} bytes, less than one layer's top-{top_k} "
            f"experts ({top_k * per_expert} bytes)"
        )
    scratch = Path(tempfile.mkdtemp(prefix="tq-bench-stream-run-"))
    load_start, t_start = _loadavg(), time.perf_counter()
    try:
        common = {
            "path": str(path),
            "tokens": args.tokens,
            "warmup_prompt": random_prompts(1234, 1)[0],
        }
        say("baseline process (imports only)")
        baseline = run_worker({"name": "baseline", "mode": "baseline"}, scratch)
        say("resident run")
        resident = run_worker(
            {
                **common,
                "name": "resident",
                "mode": "resident",
                "prompts": random_prompts(0, REPEATS),
                "time_cap_seconds": RESIDENT_TIME_CAP_S,
            },
            scratch,
        )
        prompts = random_prompts(0, REPEATS)[: resident["repeats"]]
        say("sequential read of the checkpoint files")
        seq = sequential_read(files)
        streamed = {}
        for name, ahead in (("streamed", False), ("streamed+prefetch", True)):
            drop_page_cache(files)
            cached = cached_fraction(files)
            say(f"{name} run (budget {budget / 1e9:.3f} GB)")
            r = run_worker(
                {
                    **common,
                    "name": name.replace("+", "-"),
                    "mode": "streamed",
                    "prompts": prompts,
                    "budget_bytes": budget,
                    "workers": WORKERS,
                    "prefetch_ahead": ahead,
                },
                scratch,
            )
            r["cached_fraction_before"] = cached
            streamed[name] = r
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    runs = {"baseline": baseline, "resident": resident, **streamed}
    result = assemble(args, config, sizes, budget, per_expert, built, runs, seq)
    result["machine"] = {
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "measure_seconds": time.perf_counter() - t_start,
        "note": "load averages include other processes on the machine: tok/s are "
        "wall-clock rates under that load",
    }
    return result


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
