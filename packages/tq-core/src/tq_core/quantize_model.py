"""Quantize the leaf modules of an MLX model tree with TurboQuant, following a recipe."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .decode_block import compile_decode_blocks
from .decode_mlp import compile_decode_mlps
from .decode_moe import compile_decode_moe
from .embedding import TurboQuantEmbedding
from .linear import TurboQuantLinear
from .recipe import QuantRecipe, is_kept, layer_kind
from .siblings import group_siblings
from .switch_linear import TurboQuantSwitchLinear


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.weight.shape)


def undividable_layers(model: nn.Module, recipe: QuantRecipe) -> dict[str, int]:
    """``{path: input size}`` of the leaves the recipe would quantize but cannot: the group
    size (or rotation span) does not divide their input size. They stay in full precision."""
    out = {}
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        kind = layer_kind(path, module)
        if kind is None or is_kept(path, recipe) or recipe.bits_for(kind, path) == 0:
            continue
        in_dims = _weight_shape(module)[-1]
        if in_dims % recipe.group_size or in_dims % (recipe.span or recipe.group_size):
            out[path] = in_dims
    return out


def plan_layers(model: nn.Module, recipe: QuantRecipe) -> dict[str, dict]:
    """``{path: spec}`` for every leaf the recipe quantizes; spec holds kind, bits,
    group_size, span, seed and (with QJL) ``qjl: true``. Leaves whose input size the group
    size does not divide are left out (kept in full precision)."""
    plan = {}
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        kind = layer_kind(path, module)
        if kind is None or is_kept(path, recipe):
            continue
        bits = recipe.bits_for(kind, path)
        if bits == 0:
            continue
        in_dims = _weight_shape(module)[-1]
        span = recipe.span or recipe.group_size
        if in_dims % recipe.group_size or in_dims % span:
            continue
        plan[path] = {
            "kind": kind,
            "bits": bits,
            "group_size": recipe.group_size,
            "span": span,
            "seed": recipe.seed,
        }
        if recipe.use_qjl:
            plan[path]["qjl"] = True
    return plan


def _empty_layer(module: nn.Module, spec: dict) -> nn.Module:
    shape = _weight_shape(module)
    args = dict(bits=spec["bits"], group_size=spec["group_size"], seed=spec["seed"],
                span=spec["span"], use_qjl=bool(spec.get("qjl", False)))  # fmt: skip
    if spec["kind"] == "embed":
        return TurboQuantEmbedding(shape[0], shape[1], **args)
    if spec["kind"] == "expert":
        return TurboQuantSwitchLinear(shape[2], shape[1], shape[0], "bias" in module, **args)
    return TurboQuantLinear(shape[1], shape[0], "bias" in module, **args)


def quantize_layer(module: nn.Module, spec: dict, scale_method: str = "lsq") -> nn.Module:
    """The TurboQuant layer for ``module`` under one plan ``spec`` (weights evaluated)."""
    layer = _empty_layer(module, spec)
    layer.set_weight(module.weight, scale_method)
    if "bias" in module:
        layer.bias = module.bias
    layer.freeze()
    mx.eval(layer.parameters())
    return layer


def apply_plan(
    model: nn.Module,
    plan: dict[str, dict],
    scale_method: str | None = "lsq",
    on_layer: Callable[[str, nn.Module], None] | None = None,
) -> nn.Module:
    """Replace the planned leaves in place. With ``scale_method`` the current weights are
    quantized (and each new layer evaluated, so lazy source weights are read one layer at a
    time); with ``None`` empty layers of the right shapes are made, to load a checkpoint into.
    """
    leaves = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    missing = sorted(set(plan) - set(leaves))
    if missing:
        raise ValueError(f"the quantization plan names modules this model lacks: {missing[:5]}")
    for path, spec in plan.items():
        # Pop the leaf and swap the layer in at once, so the float weights it replaces can
        # be freed before the next layer is quantized.
        module = leaves.pop(path)
        if scale_method is None:
            layer = _empty_layer(module, spec)
        else:
            layer = quantize_layer(module, spec, scale_method)
        del module
        model.update_modules(tree_unflatten([(path, layer)]))
        if on_layer is not None:
            on_layer(path, layer)
    return model


def quantize_model(model: nn.Module, recipe: QuantRecipe, on_layer=None) -> dict[str, dict]:
    """Quantize ``model`` in place with ``recipe``; returns the per-layer plan. Sibling
    projections are grouped to share decode launches (siblings.py), dense MLPs replay
    their decode calls from a trace (decode_mlp.py), and so do llama-style decoder blocks
    around their KV cache (decode_block.py) and MoE blocks on a GPU (decode_moe.py)."""
    plan = plan_layers(model, recipe)
    apply_plan(model, plan, recipe.scale_method, on_layer)
    group_siblings(model)
    compile_decode_mlps(model)
    compile_decode_blocks(model)
    compile_decode_moe(model)
    return plan
