"""Tensor-parallel TurboQuant layers on ``mx.distributed``: column and row splits of the codes.

A TurboQuant weight is ``W^ = (s ⊙ C[idx]) R`` with ``R = H_blocks · diag(signs)`` a
blockwise randomized Hadamard rotation along the input dimension (rotation.py).

* Column-parallel ("all-to-sharded", mlx's ``AllToShardedLinear``): each rank keeps a slice of
  the output rows (indices, scales, QJL signs/scales, bias). The rotation acts on the input,
  which every rank holds whole, so it is unchanged.
* Row-parallel ("sharded-to-all", mlx's ``ShardedToAllLinear``): each rank keeps a slice of
  the input columns. ``R`` is block diagonal, so when the slice is a union of whole rotation
  blocks, ``(R x)[slice] = R_slice x[slice]`` with ``R_slice`` built from the same blocks and
  the slice of the signs: each rank rotates only its own input and the partial products sum
  to ``W^ x`` exactly (``mx.distributed.all_sum``). Whole quantization groups keep one scale
  per group; 32-value boundaries keep the packed words whole (pack.py: 32 values fill ``bits``
  words). A slice that breaks any of these is refused.

:func:`shard_linear` and :func:`shard_inplace` take the same arguments as
``mlx.nn.layers.distributed``'s functions of those names, handle TurboQuant layers, and hand
every other module to mlx's, so a model's own ``shard`` method can use them unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers import distributed as mlx_distributed

from .linear import TurboQuantLinear
from .weight_layer import TurboQuantWeights, compute_dtype

__all__ = [
    "SHARDINGS",
    "TurboQuantAllToShardedLinear",
    "TurboQuantShardedToAllLinear",
    "shard_inplace",
    "shard_linear",
    "sharded_arrays",
]

SHARDINGS = ("all-to-sharded", "sharded-to-all")
#: Values per packed block: 32 b-bit values fill exactly b uint32 words (pack.py).
PACK_BLOCK = 32
#: mlx's own functions, kept before anything can swap the module's names for these.
_MLX_SHARD_LINEAR = mlx_distributed.shard_linear
_MLX_SHARD_INPLACE = mlx_distributed.shard_inplace
#: Arrays split along the output rows by a column-parallel shard.
_ROW_ARRAYS = ("indices", "scales", "qjl_signs", "qjl_scales")


def _segment_bounds(size: int, segments) -> list[tuple[int, int]]:
    """The ``[start, end)`` of each fused segment, read the way mlx's ``_split`` reads
    ``segments``: a count of equal parts, a list of split indices, or a list of fractions."""
    if isinstance(segments, int):
        if segments < 1 or size % segments:
            raise ValueError(f"segments={segments} must divide the sharded dimension {size}")
        step = size // segments
        return [(i * step, (i + 1) * step) for i in range(segments)]
    points = [int(s) if isinstance(segments[0], int) else int(s * size) for s in segments]
    bounds = [0, *points, size]
    return list(zip(bounds[:-1], bounds[1:]))


def _rank_ranges(size, segments, n, rank, unit, describe) -> list[tuple[int, int]]:
    """The ranges of one dimension rank ``rank`` of ``n`` keeps: its ``1/n`` of every
    segment, each a whole number of ``unit``; otherwise ``ValueError(describe(piece))``."""
    ranges = []
    for start, end in _segment_bounds(size, segments):
        length = end - start
        if length % n or (length // n) % unit:
            raise ValueError(describe(length, n))
        piece = length // n
        ranges.append((start + rank * piece, start + (rank + 1) * piece))
    return ranges


def _take(a: mx.array, ranges, axis: int, per: float = 1.0) -> mx.array:
    """The ``ranges`` (in values; ``per`` array entries per value) of ``a`` along ``axis``."""
    axis = axis % a.ndim
    lead = (slice(None),) * axis
    parts = [a[(*lead, slice(int(s * per), int(e * per)))] for s, e in ranges]
    return mx.contiguous(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis))


def _check_sharding(sharding) -> None:
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")


def _group(group):
    return group if group is not None else mx.distributed.init()


def sharded_arrays(
    layer: TurboQuantWeights,
    sharding: str,
    *,
    segments=1,
    group=None,
    name: str | None = None,
) -> tuple[dict[str, mx.array], tuple[tuple[int, int], ...] | None]:
    """``(arrays, input_slice)``: the parameters rank ``group.rank()`` of ``group.size()``
    keeps of ``layer``, and for a row-parallel split the input ranges it keeps (else None).

    ``group`` only needs ``size()`` and ``rank()``, so a test can ask for every rank's shard
    in one process. Raises ValueError, naming ``name`` and the sizes, when the output rows do
    not split evenly or an input slice would cut a quantization group, a rotation block or a
    packed 32-value block."""
    _check_sharding(sharding)
    if not isinstance(layer, TurboQuantWeights):
        raise TypeError(f"expected a TurboQuant layer, got {type(layer).__name__}")
    group = _group(group)
    n, rank = group.size(), group.rank()
    what = name or type(layer).__name__
    out_axis = layer.indices.ndim - 2
    params = {k: v for k, v in layer.items() if isinstance(v, mx.array)}
    if sharding == "all-to-sharded":
        out_dims = layer.indices.shape[out_axis]

        def describe(length, n):
            return (
                f"{what}: cannot split {length} output rows over {n} ranks evenly "
                f"(output dims {out_dims}, segments {segments!r})"
            )

        rows = _rank_ranges(out_dims, segments, n, rank, 1, describe)
        arrays = {k: _take(params[k], rows, out_axis) for k in _ROW_ARRAYS if k in params}
        if "bias" in params:
            arrays["bias"] = _take(params["bias"], rows, -1)
        return arrays, None

    in_dims, gs, span, bits = layer.input_dims, layer.group_size, layer.span, layer.bits
    unit = math.lcm(gs, span, PACK_BLOCK)

    def describe(length, n):
        return (
            f"{what}: cannot split the input dimension {in_dims}"
            f"{'' if length == in_dims else f' (a segment of {length})'} over {n} ranks: "
            f"each rank's slice must be whole quantization groups ({gs}) and rotation blocks "
            f"(span {span}), i.e. a multiple of {unit}; use fewer ranks, or convert with a "
            f"group size and span that divide {length // n if length % n == 0 else length}"
        )

    cols = _rank_ranges(in_dims, segments, n, rank, unit, describe)
    arrays = {
        "indices": _take(params["indices"], cols, -1, bits / PACK_BLOCK),
        "scales": _take(params["scales"], cols, -1, 1 / gs),
        "signs": _take(params["signs"], cols, -1),
    }
    if layer.use_qjl:
        arrays["qjl_signs"] = _take(params["qjl_signs"], cols, -1, 1 / PACK_BLOCK)
        arrays["qjl_scales"] = _take(params["qjl_scales"], cols, -1, 1 / gs)
        arrays["qjl_flips"] = _take(params["qjl_flips"], cols, -1)
    # The bias is not split: a row-parallel sum adds it once, after the all-sum.
    return arrays, tuple(cols)


def _set_input_slice(layer: TurboQuantWeights, input_slice) -> None:
    # A plain attribute (not a Module child): it joins the rotation memo's key.
    object.__setattr__(layer, "input_slice", input_slice)


def _sharded_copy(cls, layer: TurboQuantLinear, arrays, input_slice, group):
    """A ``cls`` holding ``layer``'s settings and parameters with ``arrays`` replaced."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.bits, new.group_size, new.seed = layer.bits, layer.group_size, layer.seed
    new.span, new.use_qjl = layer.span, layer.use_qjl
    for key, value in layer.items():
        if isinstance(value, mx.array):
            new[key] = arrays.get(key, value)
    new.group = group
    _set_input_slice(new, input_slice)
    new.freeze()
    return new


class TurboQuantAllToShardedLinear(TurboQuantLinear):
    """Column-parallel :class:`TurboQuantLinear`: this rank's output rows of ``W^ x``, from
    the full input (mlx's ``AllToShardedLinear``; gradients are summed across ranks)."""

    group: mx.distributed.Group

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(mlx_distributed.sum_gradients(self.group)(x))

    @classmethod
    def from_turboquant_linear(cls, layer, *, segments=1, group=None, name=None):
        group = _group(group)
        arrays, _ = sharded_arrays(
            layer, "all-to-sharded", segments=segments, group=group, name=name
        )
        return _sharded_copy(cls, layer, arrays, None, group)

    def _extra_repr(self) -> str:
        return f"{super()._extra_repr()}, all-to-sharded over {self.group.size()}"


class TurboQuantShardedToAllLinear(TurboQuantLinear):
    """Row-parallel :class:`TurboQuantLinear`: this rank's input slice times its columns of
    ``W^`` (rotated with its own blocks' signs), summed over ranks, then the bias (mlx's
    ``ShardedToAllLinear``). Every rank ends with the full output."""

    group: mx.distributed.Group

    def __call__(self, x: mx.array) -> mx.array:
        dtype = compute_dtype(x)
        y = mx.distributed.all_sum(self.product(x, dtype), group=self.group)
        if "bias" in self:
            y = y + self.bias.astype(dtype)
        return y.astype(x.dtype)

    @classmethod
    def from_turboquant_linear(cls, layer, *, segments=1, group=None, name=None):
        group = _group(group)
        arrays, cols = sharded_arrays(
            layer, "sharded-to-all", segments=segments, group=group, name=name
        )
        return _sharded_copy(cls, layer, arrays, cols, group)

    def _extra_repr(self) -> str:
        return f"{super()._extra_repr()}, sharded-to-all over {self.group.size()}"


def shard_linear(module: nn.Module, sharding: str, *, segments=1, group=None, name=None):
    """mlx's ``shard_linear`` that also shards :class:`TurboQuantLinear` (a new layer is
    returned; the original is unchanged). Other modules go to mlx's function."""
    if isinstance(module, TurboQuantLinear):
        _check_sharding(sharding)
        cls = (
            TurboQuantAllToShardedLinear
            if sharding == "all-to-sharded"
            else TurboQuantShardedToAllLinear
        )
        return cls.from_turboquant_linear(module, segments=segments, group=group, name=name)
    if isinstance(module, TurboQuantWeights):
        raise TypeError(
            f"{name or type(module).__name__}: shard_linear takes linear layers; "
            f"{type(module).__name__} is sharded with shard_inplace"
        )
    return _MLX_SHARD_LINEAR(module, sharding, segments=segments, group=group)


def _turboquant_children(module: nn.Module) -> list[str]:
    return [
        path
        for path, child in module.named_modules()
        if child is not module and isinstance(child, TurboQuantWeights)
    ]


def shard_inplace(
    module: nn.Module,
    sharding: str | Callable,
    *,
    segments=1,
    group=None,
    name=None,
) -> None:
    """mlx's ``shard_inplace`` that also shards TurboQuant layers (experts of a
    :class:`~tq_core.TurboQuantSwitchLinear`, or a :class:`TurboQuantLinear` whose model
    sums the result itself). The layer keeps its class: the model that asked for an in-place
    shard does the all-sum. Other modules go to mlx's function."""
    if isinstance(module, TurboQuantWeights):
        if callable(sharding):
            raise TypeError(
                f"{name or type(module).__name__}: a custom sharding predicate cannot be "
                "applied to packed TurboQuant codes; use 'all-to-sharded' or 'sharded-to-all'"
            )
        arrays, cols = sharded_arrays(
            module, sharding, segments=segments, group=_group(group), name=name
        )
        module.update(arrays)
        _set_input_slice(module, cols)
        return
    inner = _turboquant_children(module)
    if inner:
        raise TypeError(
            f"{name or type(module).__name__}: shard_inplace on a module holding TurboQuant "
            f"layers ({', '.join(inner[:3])}) is not supported; shard each layer"
        )
    _MLX_SHARD_INPLACE(module, sharding, segments=segments, group=group)
