"""Convert a Hugging Face / mlx-lm model directory into a TurboQuant checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _download, dequantize_model, load_config, load_model

from ..checkpoint import quantization_block, save_checkpoint
from ..quantize_model import apply_plan, plan_layers
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
) -> Path:
    """Quantize ``src`` with ``recipe`` and write a TurboQuant checkpoint to ``out``.

    Layers are quantized one at a time from lazily loaded source weights; the output is
    written to a temporary directory and renamed at the end.
    """
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    model, config, path = load_source(src)
    plan = plan_layers(model, recipe)
    if not plan:
        raise ValueError(f"{path}: the recipe quantizes no layer of this model")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc="quantizing", unit="layer")

    def on_layer(name, layer):
        if bar is not None:
            bar.set_postfix_str(name[-40:], refresh=False)
            bar.update(1)

    apply_plan(model, plan, recipe.scale_method, on_layer)
    if bar is not None:
        bar.close()
    mx.eval(model.parameters())
    config = dict(config)
    config["quantization"] = quantization_block(plan, recipe.to_dict())
    return save_checkpoint(model, config, out, tokenizer_dir=path, overwrite=overwrite)
