"""TurboQuant checkpoints: a Hugging Face-style directory written atomically and read back
with clear errors (config.json with a ``quantization`` block, safetensors shards, index)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

METHOD = "turboquant"
FORMAT_VERSION = 1
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.json",
    "chat_template.jinja", "added_tokens.json",
)  # fmt: skip


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


def _shards(params: list[tuple[str, mx.array]], max_bytes: int) -> list[dict[str, mx.array]]:
    shards, current, size = [], {}, 0
    for name, array in params:
        if current and size + array.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    if current:
        shards.append(current)
    return shards


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temporary directory onto ``out`` (replacing it if allowed)."""
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists (pass overwrite=True / --force)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


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
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        params = tree_flatten(model.parameters())
        shards = _shards(params, max_shard_bytes)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
            for key, array in shard.items():
                weight_map[key] = name
                total += array.nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.exists():
                    shutil.copy2(src, tmp / fname)
        # mkdtemp makes the directory private (0700); a checkpoint is an ordinary folder.
        os.chmod(tmp, 0o755)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
