"""Load a TurboQuant checkpoint as an mlx-lm model and tokenizer."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.utils import _get_classes, load_tokenizer

from ..checkpoint import CheckpointError, load_weights, read_quantization
from ..decode_block import compile_decode_blocks
from ..decode_mlp import compile_decode_mlps
from ..decode_moe import compile_decode_moe
from ..quantize_model import apply_plan
from ..siblings import group_siblings


def build_model(config: dict) -> nn.Module:
    """The mlx-lm model for ``config`` (without weights); clear error if unsupported."""
    try:
        model_class, args_class = _get_classes(config)
    except (ValueError, KeyError) as e:
        raise ValueError(f"unsupported architecture {config.get('model_type')!r}: {e}") from None
    return model_class(args_class.from_dict(config))


def cast_dtype(model: nn.Module, dtype) -> None:
    """Cast floating parameters to ``dtype`` the way mlx-lm's convert does: parameters the
    model's ``cast_predicate`` protects (e.g. ``e_score_correction_bias``) keep their dtype;
    TurboQuant codes are uint32 and never cast."""
    keep = getattr(model, "cast_predicate", lambda _: True)

    def cast(path, value):
        if keep(path) and mx.issubdtype(value.dtype, mx.floating):
            return value.astype(dtype)
        return value

    model.update(tree_map_with_path(cast, model.parameters()))


def load(
    path: str | os.PathLike,
    dtype=None,
    tokenizer: bool = True,
    shard: Callable[[nn.Module], object] | None = None,
):
    """``(model, tokenizer)`` from a TurboQuant checkpoint directory.

    ``dtype`` casts the float parameters (norms, unquantized layers); the default is float32
    on the CPU, whose float16 matmuls are slow, and the stored dtype elsewhere. ``shard``
    (see :func:`tq_core.lm.sharded_load`) is called on the model while its weights are
    still unread, so only what it keeps is ever read from disk.
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
    del weights
    if shard is not None:
        shard(model)
    if dtype is None and mx.default_device() == mx.cpu:
        dtype = mx.float32
    if dtype is not None:
        cast_dtype(model, dtype)
    mx.eval(model.parameters())
    model.eval()
    group_siblings(model)
    compile_decode_mlps(model)
    compile_decode_blocks(model)
    compile_decode_moe(model)
    if not tokenizer:
        return model, None
    tok = load_tokenizer(path, eos_token_ids=model_config.get("eos_token_id"))
    return model, tok
