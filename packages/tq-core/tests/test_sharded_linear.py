"""Sharded TurboQuant layers against the unsharded layer, every rank computed in one process.

A stand-in group (only ``size()`` and ``rank()``) gives each rank's shard; column-parallel
outputs are concatenated and row-parallel partial products summed here, which is what
``mx.distributed.all_sum`` does across processes (tests/test_distributed.py runs that).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.nn.layers.distributed import AllToShardedLinear
from tq_core import (
    TurboQuantAllToShardedLinear,
    TurboQuantLinear,
    TurboQuantShardedToAllLinear,
    TurboQuantSwitchLinear,
    shard_inplace,
    shard_linear,
)

TOL = 1e-5


class StandIn:
    """The part of ``mx.distributed.Group`` that sharding reads."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _layer(in_dims=256, out_dims=96, bias=True, bits=3, group_size=32, span=64, qjl=False):
    mx.random.seed(1)
    linear = nn.Linear(in_dims, out_dims, bias=bias)
    if bias:
        linear.bias = mx.random.normal((out_dims,))
    return TurboQuantLinear.from_linear(linear, bits, group_size, 5, span, use_qjl=qjl)


def _close(a, b):
    return mx.abs(a - b).max().item() <= TOL * max(1.0, mx.abs(b).max().item())


@pytest.mark.parametrize("qjl", [False, True])
@pytest.mark.parametrize("n", [2, 4])
def test_column_parallel_concatenates_to_the_full_output(n, qjl):
    layer = _layer(qjl=qjl)
    x = mx.random.normal((3, 7, 256))
    shards = [shard_linear(layer, "all-to-sharded", group=StandIn(n, r)) for r in range(n)]
    assert all(type(s) is TurboQuantAllToShardedLinear for s in shards)
    assert all(s.output_dims == 96 // n and s.input_dims == 256 for s in shards)
    # The rotation acts on the input, which every rank holds whole: unchanged.
    assert all(mx.array_equal(s.signs, layer.signs).item() for s in shards)
    assert _close(mx.concatenate([s(x) for s in shards], axis=-1), layer(x))


@pytest.mark.parametrize("qjl", [False, True])
@pytest.mark.parametrize("n", [2, 4])
def test_row_parallel_partial_products_sum_to_the_full_output(n, qjl):
    layer = _layer(qjl=qjl)
    x = mx.random.normal((3, 7, 256))
    step = 256 // n
    total = 0
    for r in range(n):
        s = shard_linear(layer, "sharded-to-all", group=StandIn(n, r))
        assert type(s) is TurboQuantShardedToAllLinear
        assert s.input_dims == step and s.output_dims == 96
        # Each rank rotates its own slice with the signs of its own rotation blocks.
        assert mx.array_equal(s.signs, layer.signs[r * step : (r + 1) * step]).item()
        total = total + s.product(x[..., r * step : (r + 1) * step], mx.float32)
    assert _close(total + layer.bias, layer(x))


def test_row_parallel_on_one_rank_is_the_layer():
    layer = _layer()
    x = mx.random.normal((2, 256))
    single = shard_linear(layer, "sharded-to-all", group=mx.distributed.init())
    assert _close(single(x), layer(x))


def test_fused_segments_keep_each_rank_a_slice_of_every_segment():
    # A fused q/k/v projection: 3 segments of 32 outputs, each split over 2 ranks.
    layer = _layer(out_dims=96, bias=False)
    x = mx.random.normal((4, 256))
    full = layer(x)
    for r in range(2):
        s = shard_linear(layer, "all-to-sharded", segments=3, group=StandIn(2, r))
        want = mx.concatenate(
            [full[:, i * 32 + r * 16 : i * 32 + (r + 1) * 16] for i in range(3)], -1
        )
        assert _close(s(x), want)


def test_row_split_that_cuts_a_rotation_block_is_refused_with_names_and_sizes():
    layer = _layer(in_dims=256, span=128)  # 4 ranks -> 64 inputs each, half a block
    with pytest.raises(ValueError, match=r"layers\.0\.o_proj.*256.*4 ranks.*span 128"):
        shard_linear(layer, "sharded-to-all", group=StandIn(4, 0), name="layers.0.o_proj")
    layer = _layer(in_dims=192, span=None, group_size=64)  # 2 ranks -> 96: 1.5 groups
    with pytest.raises(ValueError, match=r"192 over 2 ranks.*groups \(64\)"):
        shard_linear(layer, "sharded-to-all", group=StandIn(2, 1))


def test_uneven_output_split_is_refused():
    with pytest.raises(ValueError, match=r"q_proj: cannot split 96 output rows over 5 ranks"):
        shard_linear(_layer(), "all-to-sharded", group=StandIn(5, 0), name="q_proj")
    with pytest.raises(ValueError, match="sharding must be one of"):
        shard_linear(_layer(), "rows", group=StandIn(2, 0))


def test_other_modules_go_to_mlx():
    linear = nn.Linear(64, 32)
    assert type(shard_linear(linear, "all-to-sharded", group=mx.distributed.init())) is (
        AllToShardedLinear
    )


def _experts(bias: bool, qjl: bool = False):
    mx.random.seed(2)
    from mlx_lm.models.switch_layers import SwitchLinear

    layer = SwitchLinear(256, 64, 4, bias=bias)
    if bias:
        layer.bias = mx.random.normal((4, 64))
    return TurboQuantSwitchLinear.from_switch_linear(layer, 3, 32, 5, 64, use_qjl=qjl)


def _copy(layer):
    new = _experts(bias="bias" in layer, qjl=layer.use_qjl)
    new.update(layer.parameters())
    return new


@pytest.mark.parametrize("qjl", [False, True])
def test_experts_shard_in_place_both_ways(qjl):
    pytest.importorskip("mlx_lm")
    x = mx.random.normal((5, 1, 1, 256))
    idx = mx.array([[0, 2], [1, 3], [3, 0], [2, 2], [1, 0]])
    layer = _experts(bias=True, qjl=qjl)
    full = layer(x, idx)
    cols = []
    for r in range(2):
        s = _copy(layer)
        shard_inplace(s, "all-to-sharded", group=StandIn(2, r))
        assert type(s) is TurboQuantSwitchLinear and s.output_dims == 32
        cols.append(s(x, idx))
    assert _close(mx.concatenate(cols, axis=-1), full)

    layer = _experts(bias=False, qjl=qjl)
    full = layer(x, idx)
    total = 0
    for r in range(4):
        s = _copy(layer)
        shard_inplace(s, "sharded-to-all", group=StandIn(4, r))
        assert s.input_dims == 64 and s.input_slice == ((r * 64, (r + 1) * 64),)
        total = total + s(x[..., r * 64 : (r + 1) * 64], idx)
    assert _close(total, full)


def test_custom_predicates_are_refused_on_packed_codes():
    with pytest.raises(TypeError, match="custom sharding predicate"):
        shard_inplace(_layer(), lambda path, w: 0, group=StandIn(2, 0))
    holder = nn.Module()
    holder.proj = _layer()
    with pytest.raises(TypeError, match="holding TurboQuant layers"):
        shard_inplace(holder, "all-to-sharded", group=StandIn(2, 0))


def test_row_shard_never_reuses_another_rotations_activation():
    # A rank-1 row shard of a 256-input layer and a 128-input layer with the same seed and
    # span have equal (size, span, seed) but different signs: reading the same x must not
    # share R x between them.
    wide = _layer(in_dims=256, out_dims=32, bias=False)
    narrow = _layer(in_dims=128, out_dims=32, bias=False)
    shard = shard_linear(wide, "sharded-to-all", group=StandIn(2, 1))
    x = mx.random.normal((2, 128))
    narrow(x)  # memoizes R x for (128, span 64, seed 5)
    shared = shard.product(x, mx.float32)
    fresh = shard_linear(wide, "sharded-to-all", group=StandIn(2, 1)).product(x + 0, mx.float32)
    assert _close(shared, fresh)
