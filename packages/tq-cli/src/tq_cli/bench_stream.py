"""`tq bench stream`: MoE experts streamed from disk against the resident model, on a
synthetic TurboQuant checkpoint built for the occasion.

The checkpoint is a qwen3_moe model with a small hidden size, many experts and a tiny
vocabulary, as many layers as it takes to reach ``--gb`` on disk. Its codes are random
(uint32 words: every bit pattern is a valid code) and its scales random positive fp16 of
about 0.02 (1.0 for the embedding, see EMBED_SCALE), so activations stay finite without
quantizing anything: building it costs the time to write the bytes. No tokenizer: the
model is driven with token ids.

Every measurement runs in a subprocess of its own (`tq_cli.bench_stream_worker`), so each
peak RSS is its own: a process that only imports the libraries (the RSS floor of Python +
MLX), the resident model, and the streamed model with ``--budget`` x the expert bytes,
look-ahead prefetch off and on. The streamed runs must produce the resident run's token ids
and logits bit for bit. The page cache of the checkpoint is dropped before each streamed run
and before a plain sequential read of the same files, the disk's own speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .main import CommandError
from .table import format_table

#: (hidden, moe_intermediate, experts, top_k, heads, kv_heads), largest first: the largest
#: shape that reaches the size with at least MIN_LAYERS layers is used.
SHAPES = (
    (1024, 512, 128, 8, 16, 4),
    (512, 256, 64, 8, 8, 2),
    (256, 128, 32, 4, 4, 2),
    (128, 64, 16, 2, 2, 1),
)
MIN_LAYERS = 4
HEAD_DIM = 64
VOCAB = 1024
BITS = 4
GROUP = 64
SCALE = 0.02  # typical fp16 group scale: weights of RMS ~ 0.02
#: Embedding scales: at 0.02 the token's own signal drowns in the residual stream of a
#: random model, greedy decoding loops on a few ids and every token routes alike (a cache
#: hit rate of ~95% that measures nothing). At 1.0 the token carries through the layers:
#: greedy output does not repeat and routing is close to uniform, the hardest case for an
#: LRU (hit rate ~ the budget fraction); trained models route with more skew.
EMBED_SCALE = 1.0
PROMPT_LEN = 8
REPEATS = 3
WORKERS = 8  # load_streaming's default parallel reads
RESIDENT_TIME_CAP_S = 240.0  # stop repeating after this much decoding (all runs follow)
CHUNK = 16 << 20  # sequential read chunk
SHARD_BYTES = 1 << 30
RSS_SLACK = 0.10
SPEC_FILE = "tq-bench-stream.json"  # next to config.json: what was built, for --keep reuse


# ----------------------------------------------------------------------- synthetic model


def model_config(shape: tuple, layers: int) -> dict:
    hidden, inter, experts, top_k, heads, kv_heads = shape
    return {
        "model_type": "qwen3_moe",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": HEAD_DIM,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": inter,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


def _recipe():
    from tq_core import QuantRecipe

    return QuantRecipe(bits=BITS, group_size=GROUP)


def _quantized_model(config: dict):
    """The model with its TurboQuant layers in place (empty codes): ``(model, plan)``.
    Nothing is evaluated, so the float weights mlx-lm initialises never take memory."""
    from tq_core.lm.load import build_model
    from tq_core.quantize_model import apply_plan, plan_layers

    model = build_model(dict(config))
    plan = plan_layers(model, _recipe())
    apply_plan(model, plan, scale_method=None)
    return model, plan


def _stored_nbytes(value) -> int:
    """Bytes of a tensor as written: float parameters are stored as fp16."""
    import mlx.core as mx

    if mx.issubdtype(value.dtype, mx.floating):
        return value.size * 2
    return value.nbytes


def layer_bytes(shape: tuple) -> tuple[int, int, int]:
    """``(per layer, fixed, per expert)`` bytes on disk for a model of ``shape``."""
    from mlx.utils import tree_flatten

    model, _ = _quantized_model(model_config(shape, 1))
    per_layer = fixed = expert = 0
    for name, value in tree_flatten(model.parameters()):
        n = _stored_nbytes(value)
        if name.startswith("model.layers.0."):
            per_layer += n
            if ".switch_mlp." in name and not name.endswith(".signs"):
                expert += n
        else:
            fixed += n
    return per_layer, fixed, expert // shape[2]


def synthetic_config(target_bytes: float) -> tuple[dict, int]:
    """``(config, estimated bytes)`` of the model to build: the largest shape reaching
    ``target_bytes`` with at least MIN_LAYERS layers (the smallest shape otherwise)."""
    for shape in SHAPES:
        per_layer, fixed, _ = layer_bytes(shape)
        layers = max(2, math.ceil((target_bytes - fixed) / per_layer))
        if layers >= MIN_LAYERS or shape is SHAPES[-1]:
            return model_config(shape, layers), fixed + layers * per_layer
    raise AssertionError("unreachable")


def _fill(name: str, value, rng):
    """Random codes / scales for a TurboQuant tensor; fp16 for the other float tensors
    (routers, norms, rotation signs keep their values)."""
    import mlx.core as mx
    import numpy as np

    if value.dtype == mx.uint32:
        return mx.array(rng.integers(0, 2**32, size=value.shape, dtype=np.uint32))
    if name.endswith("scales"):
        scale = EMBED_SCALE if "embed_tokens" in name else SCALE
        s = scale * rng.uniform(0.5, 1.5, size=value.shape).astype(np.float32)
        return mx.array(s.astype(np.float16))
    return value.astype(mx.float16)


def build_checkpoint(out: Path, config: dict, seed: int = 0, progress: bool = True) -> Path:
    """Write the synthetic TurboQuant checkpoint to ``out`` layer by layer (memory stays
    near one shard)."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten
    from tq_core.checkpoint import quantization_block
    from tq_core.checkpoint_writer import CheckpointWriter

    mx.random.seed(seed)  # the routers keep mlx-lm's random initialisation
    rng = np.random.default_rng(seed)
    model, plan = _quantized_model(config)
    config = dict(config)
    config["quantization"] = quantization_block(plan, _recipe().to_dict())
    layers = model.model.layers
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(layers) + 1, desc="building checkpoint", unit="layer")
    try:
        with CheckpointWriter(out, max_shard_bytes=SHARD_BYTES) as writer:
            for i in range(len(layers)):
                tensors = {
                    f"model.layers.{i}.{k}": _fill(k, v, rng)
                    for k, v in tree_flatten(layers[i].parameters())
                }
                mx.eval(list(tensors.values()))
                writer.add(tensors)
                layers[i] = nn.Module()  # drop the layer: the writer holds what it needs
                del tensors
                if bar is not None:
                    bar.update(1)
            rest = {k: _fill(k, v, rng) for k, v in tree_flatten(model.parameters())}
            mx.eval(list(rest.values()))
            writer.add(rest)
            path = writer.finish(config)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    for f in _shards(path):  # on disk before anything is timed (dirty pages cannot drop)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def _shards(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def checkpoint_sizes(path: Path) -> dict:
    """Bytes on disk: files, tensors, expert tensors (streamed) and the rest."""
    from tq_stream import index_checkpoint

    slots = index_checkpoint(path)
    expert = sum(
        s.nbytes
        for name, s in slots.items()
        if ".switch_mlp." in name and not name.endswith((".signs", ".qjl_flips"))
    )
    tensors = sum(s.nbytes for s in slots.values())
    return {
        "file_bytes": sum(f.stat().st_size for f in _shards(path)),
        "tensor_bytes": tensors,
        "expert_bytes": expert,
        "non_expert_bytes": tensors - expert,
        "shards": len(_shards(path)),
    }


# ---------------------------------------------------------------------- disk and cache


def drop_page_cache(files: list[Path]) -> None:
    """Ask the kernel to drop the cached pages of ``files`` (clean pages only: the files
    were synced when built)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), None where unsupported."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    cached = total = 0
    for f in files:
        size = f.stat().st_size
        if not size:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            rc = libc.mincore(addr, size, vec)
            libc.munmap(addr, size)
            if rc != 0:
                return None
            cached += sum(b & 1 for b in vec)
            total += pages
        finally:
            os.close(fd)
    return cached / total if total else 0.0


def sequential_read(files: list[Path]) -> dict:
    """Read every file start to end in CHUNK-sized os.read calls, page cache dropped first."""
    drop_page_cache(files)
    cached = cached_fraction(files)
    total, seconds = 0, 0.0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            while True:
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                total += len(chunk)
            seconds += time.perf_counter() - t0
        finally:
            os.close(fd)
    drop_page_cache(files)
    return {
        "bytes": total,
        "seconds": seconds,
        "gb_per_s": total / seconds / 1e9 if seconds else 0.0,
        "chunk_bytes": CHUNK,
        "cached_fraction_before": cached,
    }


# --------------------------------------------------------------------------- workers


def _worker(spec: dict, scratch: Path) -> dict:
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


def _prompts(seed: int, n: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(2, VOCAB, size=PROMPT_LEN).tolist() for _ in range(n)]


def _say(message: str) -> None:
    print(f"tq bench stream: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ run


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
                _say(f"reusing the checkpoint at {path}")
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
    _say(f"building a {estimate / 1e9:.2f} GB checkpoint at {path}")
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
        return _measure(args, path, config, built)
    finally:
        if not args.keep:
            if made_root:
                shutil.rmtree(root, ignore_errors=True)
            elif path is not None:
                shutil.rmtree(path, ignore_errors=True)
        elif path is not None:
            _say(f"kept the checkpoint at {path}")


def _measure(args, path: Path, config: dict, built: bool) -> dict:
    sizes = checkpoint_sizes(path)
    files = _shards(path)
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
            "warmup_prompt": _prompts(1234, 1)[0],
        }
        _say("baseline process (imports only)")
        baseline = _worker({"name": "baseline", "mode": "baseline"}, scratch)
        _say("resident run")
        resident = _worker(
            {
                **common,
                "name": "resident",
                "mode": "resident",
                "prompts": _prompts(0, REPEATS),
                "time_cap_seconds": RESIDENT_TIME_CAP_S,
            },
            scratch,
        )
        prompts = _prompts(0, REPEATS)[: resident["repeats"]]
        _say("sequential read of the checkpoint files")
        seq = sequential_read(files)
        streamed = {}
        for name, ahead in (("streamed", False), ("streamed+prefetch", True)):
            drop_page_cache(files)
            cached = cached_fraction(files)
            _say(f"{name} run (budget {budget / 1e9:.3f} GB)")
            r = _worker(
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
    result = _assemble(args, config, sizes, budget, per_expert, built, runs, seq)
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


def _assemble(args, config, sizes, budget, per_expert, built, runs: dict, seq: dict) -> dict:
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


# ---------------------------------------------------------------------------- render


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
