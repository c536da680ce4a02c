"""Convert a Hugging Face / mlx-lm model directory into a TurboQuant checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _download, dequantize_model, load_config, load_model

from ..checkpoint import quantization_block
from ..checkpoint_writer import CheckpointWriter
from ..quantize_model import plan_layers, quantize_layer, undividable_layers
from ..recipe import QuantRecipe

#: HF quantization methods whose tensors mlx-lm reads and that are dequantized on the fly.
DEQUANTIZED_SOURCES = ("mxfp4",)


def _resolve(src: str | os.PathLike) -> Path:
    path = Path(src)
    if path.exists():
        return path
    try:
        return _download(str(src))
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"model {src!r} is neither a local directory nor reachable on the Hugging Face hub "
            f"({type(e).__name__}: {first_line})"
        ) from None


def load_source(src: str | os.PathLike) -> tuple[nn.Module, dict, Path]:
    """Load a float (float16/bfloat16/float32) source model lazily with mlx-lm.

    mlx-lm affine-quantized models are refused (re-quantizing a quantized grid compounds
    the error: convert the float original instead). GPT-OSS style MXFP4 experts are
    dequantized to float on load.
    """
    path = _resolve(src)
    if not (path / "config.json").exists():
        raise ValueError(f"{path}: no config.json; expected a Hugging Face model directory")
    config = load_config(path)
    if "quantization" in config:
        quant = config["quantization"]
        method = quant.get("method") if isinstance(quant, dict) else None
        what = "a TurboQuant checkpoint" if method == "turboquant" else "quantized by mlx-lm"
        raise ValueError(
            f"{path} is already {what}; TurboQuant converts float checkpoints: use the "
            "unquantized original"
        )
    hf_quant = config.get("quantization_config") or {}
    method = hf_quant.get("quant_method")
    if method is not None and method not in DEQUANTIZED_SOURCES:
        raise ValueError(
            f"{path}: source quantization {method!r} is not supported; give a float16/bfloat16 "
            f"checkpoint (supported quantized sources: {', '.join(DEQUANTIZED_SOURCES)})"
        )
    try:
        model, config = load_model(path, lazy=True)
    except ValueError as e:
        raise ValueError(f"{path}: mlx-lm cannot build this model: {e}") from None
    if method is not None:
        dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    return model, config, path


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    recipe: QuantRecipe,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Quantize ``src`` with ``recipe`` and write a TurboQuant checkpoint to ``out``.

    Streams: source weights are loaded lazily, one layer is read, quantized, queued for the
    output shard (written as soon as it is full) and dropped before the next, so peak
    memory stays near one output shard plus one layer. The output is written to a
    temporary directory and renamed at the end; a failure leaves nothing at ``out``.
    """
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    model, config, path = load_source(src)
    plan = plan_layers(model, recipe)
    if not plan:
        raise ValueError(f"{path}: the recipe quantizes no layer of this model")
    skipped = undividable_layers(model, recipe)
    if skipped and progress:
        import sys

        sizes = ", ".join(str(d) for d in sorted(set(skipped.values())))
        print(
            f"note: {len(skipped)} layers stay in full precision: group size "
            f"{recipe.group_size} does not divide their input size ({sizes}); a smaller "
            "--group-size quantizes them",
            file=sys.stderr,
        )
    config = dict(config)
    config["quantization"] = quantization_block(plan, recipe.to_dict())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc="quantizing", unit="layer")
    leaves = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    try:
        with CheckpointWriter(out, overwrite, max_shard_bytes) as writer:
            for name, spec in plan.items():
                layer = quantize_layer(leaves.pop(name), spec, recipe.scale_method)
                writer.add({f"{name}.{k}": v for k, v in tree_flatten(layer.parameters())})
                # An empty placeholder drops both the float weights and the written codes.
                model.update_modules(tree_unflatten([(name, nn.Module())]))
                del layer
                if bar is not None:
                    bar.set_postfix_str(name[-40:], refresh=False)
                    bar.update(1)
            writer.add(dict(tree_flatten(model.parameters())))
            return writer.finish(config, tokenizer_dir=path)
    finally:
        if bar is not None:
            bar.close()
