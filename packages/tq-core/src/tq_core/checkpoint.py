"""TurboQuant checkpoints: a Hugging Face-style directory written atomically and read back
with clear errors (config.json with a ``quantization`` block, safetensors shards, index)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint_writer import INDEX_FILE, CheckpointWriter

METHOD = "turboquant"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: names the file and what is wrong with it."""


def quantization_block(layers: dict[str, dict], recipe: dict) -> dict:
    return {
        "method": METHOD,
        "format_version": FORMAT_VERSION,
        "bits": recipe.get("bits"),
        "group_size": recipe.get("group_size"),
        "seed": recipe.get("seed"),
        "recipe": recipe,
        "layers": layers,
    }


def read_quantization(path: Path) -> tuple[dict, dict]:
    """``(config, quantization)`` of a TurboQuant checkpoint, validated."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{config_file}: missing; not a model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    quant = config.get("quantization")
    if not isinstance(quant, dict) or quant.get("method") != METHOD:
        method = quant.get("method", "affine (mlx-lm)") if isinstance(quant, dict) else None
        raise CheckpointError(
            f"{config_file}: not a TurboQuant checkpoint (quantization method: {method}); "
            "convert it with `tq convert`"
        )
    version = quant.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_file}: TurboQuant format version {version!r} is not supported "
            f"(this tq-core reads version {FORMAT_VERSION})"
        )
    if not isinstance(quant.get("layers"), dict):
        raise CheckpointError(f"{config_file}: quantization.layers is missing or malformed")
    return config, quant


def save_checkpoint(
    model: nn.Module,
    config: dict,
    out: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 2 << 30,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s parameters and ``config`` (which must carry the ``quantization``
    block) to ``out``. Everything is written into a temporary sibling directory that is
    renamed at the end, so a failure leaves no half-written checkpoint."""
    with CheckpointWriter(out, overwrite, max_shard_bytes) as writer:
        writer.add(dict(tree_flatten(model.parameters())))
        return writer.finish(config, tokenizer_dir)


def load_weights(path: str | os.PathLike) -> dict[str, mx.array]:
    """All tensors of a checkpoint, each shard checked against the index."""
    path = Path(path)
    index_file = path / INDEX_FILE
    try:
        index = json.loads(index_file.read_text())
        weight_map = index["weight_map"]
    except FileNotFoundError:
        raise CheckpointError(f"{index_file}: missing") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file}: malformed ({e})") from None
    weights = {}
    for shard in sorted(set(weight_map.values())):
        shard_file = path / shard
        if not shard_file.exists():
            raise CheckpointError(f"{shard_file}: missing (listed in {INDEX_FILE})")
        try:
            tensors = mx.load(str(shard_file))
        except Exception as e:  # MLX raises RuntimeError/ValueError for bad files
            raise CheckpointError(f"{shard_file}: unreadable or truncated ({e})") from None
        expected = {k for k, v in weight_map.items() if v == shard}
        absent = sorted(expected - set(tensors))
        if absent:
            raise CheckpointError(f"{shard_file}: missing tensors {absent[:5]}")
        weights.update(tensors)
    return weights
