"""Load a MoE checkpoint with its experts left on disk: ``load_streaming`` builds the model,
loads every other tensor, and puts a StreamedExperts in place of each SwitchGLU/SwitchMLP."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .expert_cache import ExpertCache
from .expert_store import ExpertLayout, ExpertLoader
from .reader import RangeReader
from .safetensors_index import StreamError, index_checkpoint
from .streamed_moe import NON_EXPERT_PARAMS, Prefetcher, StreamedExperts

__all__ = ["StreamingSession", "load_streaming", "expert_modules", "read_pin_file"]


@dataclass
class StreamingSession:
    """What a streamed model runs on; ``report`` gives hit rate, bytes and stall time."""

    cache: ExpertCache
    reader: RangeReader
    loader: ExpertLoader
    layouts: list[ExpertLayout]
    prefetcher: Prefetcher | None = None
    expert_bytes: int = 0
    extra: dict = field(default_factory=dict)

    def report(self, tokens: int | None = None) -> dict:
        if self.prefetcher is not None:
            self.prefetcher.wait()
        rs = self.reader.stats
        out = {
            **self.cache.stats.as_dict(),
            "bytes_read": rs.bytes,
            "reads": rs.reads,
            "read_seconds": rs.seconds,
            "read_gb_per_s": rs.bytes / rs.seconds / 1e9 if rs.seconds else 0.0,
            "cache_bytes": self.cache.nbytes,
            "budget_bytes": self.cache.budget,
            "expert_bytes_total": self.expert_bytes,
            "prefetch_enabled": bool(self.prefetcher and self.prefetcher.enabled),
        }
        if tokens:
            out["stall_ms_per_token"] = 1e3 * self.cache.stats.stall_seconds / tokens
        return out

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.loader.close()
        self.reader.close()


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every SwitchGLU / SwitchMLP (mlx-lm's expert blocks)."""
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    return [(p, m) for p, m in model.named_modules() if isinstance(m, (SwitchGLU, SwitchMLP))]


def _expert_params(block: nn.Module, num_experts: int) -> list[str]:
    names = []
    for name, value in tree_flatten(block.parameters()):
        if name.rsplit(".", 1)[-1] in NON_EXPERT_PARAMS:
            continue
        if value.ndim == 0 or value.shape[0] != num_experts:
            raise StreamError(f"{name}: a parameter not stacked by expert ({value.shape})")
        names.append(name)
    return names


def read_pin_file(path: str | os.PathLike) -> set[tuple[str, int]]:
    """pin.json: ``{"layers": {"model.layers.3.mlp.switch_mlp": [expert, ...], ...}}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        pins = {(layer, int(e)) for layer, es in data["layers"].items() for e in es}
    except FileNotFoundError:
        raise StreamError(f"--pin-file {path}: missing") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise StreamError(f"--pin-file {path}: malformed ({e})") from None
    return pins


def _build(path: Path):
    """``(model, config, weights, quantized)``: a TurboQuant checkpoint through tq-core, a
    float mlx-lm-layout checkpoint through mlx-lm's own classes; weights are lazy."""
    from tq_core.checkpoint import CheckpointError, load_weights, read_quantization
    from tq_core.lm.load import build_model
    from tq_core.quantize_model import apply_plan

    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise StreamError(f"{config_file}: missing; not a model directory") from None
    except json.JSONDecodeError as e:
        raise StreamError(f"{config_file}: not valid JSON ({e})") from None
    if "quantization" in config:
        try:
            config, quant = read_quantization(path)
        except CheckpointError as e:
            raise StreamError(str(e)) from None
        model = build_model({k: v for k, v in config.items() if k != "quantization"})
        apply_plan(model, quant["layers"], scale_method=None)
        try:
            weights = load_weights(path)
        except CheckpointError as e:
            raise StreamError(str(e)) from None
        return model, config, weights
    model = build_model(config)
    weights = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            weights.update(mx.load(str(file)))
        except Exception as e:  # MLX raises RuntimeError/ValueError for bad files
            raise StreamError(f"{file}: unreadable or truncated ({e})") from None
    return model, config, weights


def load_streaming(
    path: str | os.PathLike,
    expert_cache_bytes: int,
    workers: int = 8,
    prefetch_ahead: bool = False,
    pin_file: str | os.PathLike | None = None,
    dtype=None,
    tokenizer: bool = True,
):
    """``(model, tokenizer, session)`` with every expert block streamed from ``path``.

    ``expert_cache_bytes`` bounds the experts held in memory (pinned ones included);
    ``dtype`` casts float parameters as :func:`tq_core.lm.load.load` does (float32 on the
    CPU by default), streamed experts included, so outputs match the resident model's.
    """
    from tq_core.lm.load import cast_dtype

    path = Path(path)
    model, config, weights = _build(path)
    blocks = expert_modules(model)
    if not blocks:
        raise StreamError(f"{path}: {config.get('model_type')} has no expert layers to stream")
    slots = index_checkpoint(path)
    top_k = int(config.get("num_experts_per_tok") or config.get("moe_topk") or 1)
    if dtype is None and mx.default_device() == mx.cpu:
        dtype = mx.float32
    reader = RangeReader()
    loader = ExpertLoader(reader, workers)
    pins = read_pin_file(pin_file) if pin_file else set()
    cache = ExpertCache(loader, expert_cache_bytes, pins)
    prefetcher = Prefetcher(cache) if prefetch_ahead else None
    layouts, replacements, total = [], [], 0
    for block_path, block in blocks:
        first = next(iter(tree_flatten(block.parameters())))[1]
        num_experts = first.shape[0]
        params = {}
        for name in _expert_params(block, num_experts):
            key = f"{block_path}.{name}"
            if key not in slots:
                raise StreamError(
                    f"{path}: tensor {key} not found; experts must be stacked per layer "
                    "(a TurboQuant or mlx-lm checkpoint: convert Hugging Face layouts first)"
                )
            params[name] = slots[key]
            weights.pop(key, None)
            block.update(tree_unflatten([(name, mx.zeros((0,)))]))  # drop the placeholder
        layout = ExpertLayout(block_path, num_experts, params)
        cache.check_fits(layout, top_k)
        layouts.append(layout)
        total += layout.expert_nbytes * num_experts
        replacements.append((block_path, block, layout))
    for block_path, block, layout in replacements:
        prefix = block_path + "."
        shared = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        for k in shared:
            weights.pop(prefix + k)
        if shared:
            block.update(tree_unflatten(list(shared.items())))
        if dtype is not None:  # as tq_core.lm.load.cast_dtype does for the resident model
            keep = getattr(model, "cast_predicate", lambda _: True)
            cast = [
                (k, v.astype(dtype))
                for k, v in tree_flatten(block.parameters())
                if v.size and mx.issubdtype(v.dtype, mx.floating) and keep(prefix + k)
            ]
            if cast:
                block.update(tree_unflatten(cast))
        mx.eval(block.parameters())
        streamed = StreamedExperts(block, layout, cache, dtype, prefetcher)
        model.update_modules(tree_unflatten([(block_path, streamed)]))
    if prefetcher is not None:
        for a, b in zip(layouts, layouts[1:]):
            prefetcher.next_layer[a.layer] = b
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise StreamError(f"{path}: weights do not match the model: {e}") from None
    if dtype is not None:
        cast_dtype(model, dtype)
    mx.eval(model.parameters())
    model.eval()
    cache.load_pinned(layouts)
    session = StreamingSession(cache, reader, loader, layouts, prefetcher, total)
    tok = None
    if tokenizer:
        from mlx_lm.utils import load_tokenizer

        tok = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, tok, session
