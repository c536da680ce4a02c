"""Load a TurboQuant checkpoint as an mlx-lm model and tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _get_classes, load_tokenizer

from ..checkpoint import CheckpointError, load_weights, read_quantization
from ..quantize_model import apply_plan


def build_model(config: dict) -> nn.Module:
    """The mlx-lm model for ``config`` (without weights); clear error if unsupported."""
    try:
        model_class, args_class = _get_classes(config)
    except (ValueError, KeyError) as e:
        raise ValueError(f"unsupported architecture {config.get('model_type')!r}: {e}") from None
    return model_class(args_class.from_dict(config))


def load(path: str | os.PathLike, dtype=None, tokenizer: bool = True):
    """``(model, tokenizer)`` from a TurboQuant checkpoint directory.

    ``dtype`` casts the float parameters (norms, unquantized layers); the default is float32
    on the CPU, whose float16 matmuls are slow, and the stored dtype elsewhere.
    """
    path = Path(path)
    config, quant = read_quantization(path)
    model_config = {k: v for k, v in config.items() if k != "quantization"}
    model = build_model(model_config)
    try:
        apply_plan(model, quant["layers"], scale_method=None)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: quantization.layers: {e}") from None
    weights = load_weights(path)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: weights do not match the model: {e}") from None
    if dtype is None and mx.default_device() == mx.cpu:
        dtype = mx.float32
    if dtype is not None:
        model.set_dtype(dtype)  # floating parameters only; codes stay uint32
    mx.eval(model.parameters())
    model.eval()
    if not tokenizer:
        return model, None
    tok = load_tokenizer(path, eos_token_ids=model_config.get("eos_token_id"))
    return model, tok
