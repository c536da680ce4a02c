"""Run mlx-lm's own tensor- and pipeline-parallel code on TurboQuant models (mx.distributed).

mlx-lm models shard themselves in ``Model.shard(group)`` by calling
``mlx.nn.layers.distributed.shard_linear`` / ``shard_inplace`` on each projection. Those
functions only know ``nn.Linear`` and mlx's affine ``QuantizedLinear``. :func:`shard_model`
runs the model's ``shard`` unchanged while those two names resolve to tq-core's versions
(sharded_linear.py), which shard TurboQuant layers and hand every other module back to mlx.
Pipeline parallelism (``model.model.pipeline(group)``) only drops layers and needs no help.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers import distributed as mlx_distributed

from .. import sharded_linear
from .load import load

__all__ = ["pipeline_model", "shard_model", "sharded_load", "turboquant_sharding"]

_NAMES = ("shard_linear", "shard_inplace")
_ORIGINALS = {
    "shard_linear": sharded_linear._MLX_SHARD_LINEAR,
    "shard_inplace": sharded_linear._MLX_SHARD_INPLACE,
}


@contextmanager
def turboquant_sharding(model: nn.Module) -> Iterator[None]:
    """Within the block, ``shard_linear`` and ``shard_inplace`` in ``mlx.nn.layers.distributed``
    and in every loaded ``mlx_lm`` module that imported them handle TurboQuant layers; errors
    name the layer by its path in ``model``. Not thread-safe: shard models one at a time."""
    paths = {id(m): p for p, m in model.named_modules()}

    def shard_linear(module, sharding, *, segments=1, group=None):
        return sharded_linear.shard_linear(
            module, sharding, segments=segments, group=group, name=paths.get(id(module))
        )

    def shard_inplace(module, sharding, *, segments=1, group=None):
        return sharded_linear.shard_inplace(
            module, sharding, segments=segments, group=group, name=paths.get(id(module))
        )

    replacements = {"shard_linear": shard_linear, "shard_inplace": shard_inplace}
    modules = [mlx_distributed] + [
        m for n, m in list(sys.modules.items()) if n.startswith("mlx_lm") and m is not None
    ]
    patched = []
    try:
        for module in modules:
            for name in _NAMES:
                if getattr(module, name, None) is _ORIGINALS[name]:
                    setattr(module, name, replacements[name])
                    patched.append((module, name))
        yield
    finally:
        for module, name in patched:
            setattr(module, name, _ORIGINALS[name])


def _check_heads(model: nn.Module, n: int) -> None:
    """mlx-lm's ``shard`` divides the head counts by ``n`` without checking; a remainder
    would leave ranks with a wrong (or zero) number of heads."""
    args = getattr(model, "args", None)
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(args, field, None)
        if isinstance(heads, int) and heads % n:
            raise ValueError(
                f"{getattr(model, 'model_type', type(model).__name__)}: {field}={heads} is not "
                f"divisible by {n} ranks; tensor parallelism gives each rank whole heads"
            )


def shard_model(model: nn.Module, group: mx.distributed.Group | None = None) -> nn.Module:
    """Tensor-parallel ``model`` over ``group`` (default: ``mx.distributed.init()``) with its
    own mlx-lm ``shard`` method; TurboQuant layers are split on group and rotation-block
    boundaries. Returns the model, sharded in place."""
    group = group if group is not None else mx.distributed.init()
    if not hasattr(model, "shard"):
        raise ValueError(
            f"{getattr(model, 'model_type', type(model).__name__)}: mlx-lm has no tensor-parallel "
            "sharding for this architecture (no Model.shard); try pipeline parallelism"
        )
    _check_heads(model, group.size())
    with turboquant_sharding(model):
        model.shard(group)
    return model


def pipeline_model(model: nn.Module, group: mx.distributed.Group | None = None) -> nn.Module:
    """Pipeline-parallel ``model`` over ``group`` with mlx-lm's ``pipeline`` (rank r keeps a
    contiguous run of layers; activations travel with send/recv). Returns the model."""
    group = group if group is not None else mx.distributed.init()
    inner = getattr(model, "model", None)
    if not hasattr(inner, "pipeline"):
        raise ValueError(
            f"{getattr(model, 'model_type', type(model).__name__)}: mlx-lm has no pipeline "
            "parallelism for this architecture (no PipelineMixin); use tensor parallelism"
        )
    if group.size() > len(inner.layers):
        raise ValueError(f"{group.size()} pipeline ranks for {len(inner.layers)} layers")
    inner.pipeline(group)
    return model


def sharded_load(
    path: str | os.PathLike,
    tensor_group: mx.distributed.Group | None = None,
    pipeline_group: mx.distributed.Group | None = None,
    dtype=None,
    tokenizer: bool = True,
):
    """``(model, tokenizer)`` of a TurboQuant checkpoint, sharded before its weights are
    read (they load lazily), so each rank materializes only its own slices (tensor) or
    layers (pipeline). With neither group: tensor parallelism over ``mx.distributed.init()``
    where the architecture supports it, else pipeline parallelism. Like mlx-lm's
    ``sharded_load``, ends with an all-sum so every rank leaves together."""
    if tensor_group is None and pipeline_group is None:
        tensor_group = mx.distributed.init()

    def shard(model):
        if tensor_group is not None:
            if hasattr(model, "shard") or pipeline_group is not None:
                shard_model(model, tensor_group)
            else:
                pipeline_model(model, tensor_group)
        if pipeline_group is not None:
            pipeline_model(model, pipeline_group)

    model, tok = load(path, dtype=dtype, tokenizer=tokenizer, shard=shard)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))
    return model, tok
