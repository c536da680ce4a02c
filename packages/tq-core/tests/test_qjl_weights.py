"""Tests for the 1-bit QJL residual of TurboQuant weights."""

import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from tq_core import (
    QuantRecipe,
    TurboQuantEmbedding,
    TurboQuantLinear,
    TurboQuantSwitchLinear,
    apply_plan,
    dequantize_weight,
    quantize_model,
    quantize_weight,
    weight_rotation,
)
from tq_core.rotation import rotate, unrotate
from tq_core.weights import (
    dequantize_qjl_rotated,
    dequantize_weight_rotated,
    qjl_sketch,
    quantize_qjl_residual,
)


def _relative_error(w, w_hat):
    return (mx.sum((w - w_hat) ** 2) / mx.sum(w * w)).item()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_residual_removes_the_expected_share_of_error(bits, group_size):
    # Least-squares scale on sign(S r): E||r - r^||^2 = (1 - 2/pi) ||r||^2 for Gaussian-like
    # coordinates of S r, so the sketch must remove ~64% of the error left by the codes.
    w = mx.random.normal((64, 4 * group_size), key=mx.random.key(bits))
    rot = weight_rotation(w.shape[-1], group_size, seed=3)
    q = quantize_weight(w, bits, group_size, rot)
    sketch = qjl_sketch(w.shape[-1], group_size, seed=3)
    res = quantize_qjl_residual(w, q, rot, sketch)
    codes_only = unrotate(dequantize_weight_rotated(q), rot)
    with_qjl = unrotate(dequantize_weight_rotated(q) + dequantize_qjl_rotated(res, sketch), rot)
    ratio = _relative_error(w, with_qjl) / _relative_error(w, codes_only)
    assert abs(ratio - (1 - 2 / math.pi)) < 0.04, ratio
    assert res.signs.dtype == mx.uint32 and res.signs.shape == (64, 4 * group_size // 32)
    assert res.scales.dtype == mx.float16 and res.bits_per_weight == 1 + 16 / group_size


def test_sketch_is_independent_of_the_rotation():
    rot = weight_rotation(256, 64, seed=1)
    sketch = qjl_sketch(256, 64, seed=1)
    assert not mx.array_equal(rot.signs, sketch.signs).item()
    x = mx.random.normal((3, 256))
    # An orthonormal sketch: S^T S x = x.
    assert mx.allclose(unrotate(rotate(x, sketch), sketch), x, atol=1e-5).item()


def test_zero_weight_gives_zero_residual():
    w = mx.zeros((4, 64))
    rot = weight_rotation(64, 64, seed=0)
    q = quantize_weight(w, 3, 64, rot)
    res = quantize_qjl_residual(w, q, rot, qjl_sketch(64, 64, 0))
    assert mx.all(res.scales == 0).item()


@pytest.mark.parametrize("bias", [False, True])
def test_linear_with_qjl_equals_its_dequantized_weight(bias, assert_close):
    lin = nn.Linear(576, 40, bias=bias)
    plain = TurboQuantLinear.from_linear(lin, bits=3, group_size=64)
    q = TurboQuantLinear.from_linear(lin, bits=3, group_size=64, use_qjl=True)
    rot, sketch = q.rotation(), q.sketch()
    w_hat = unrotate(
        dequantize_weight_rotated(q.codes()) + dequantize_qjl_rotated(q.qjl(), sketch), rot
    )
    x = mx.random.normal((2, 3, 576))
    ref = x @ w_hat.T + (lin.bias if bias else 0)
    assert_close(q(x), ref)
    # The residual helps: closer to the float layer than the codes alone.
    err_plain = _relative_error(lin.weight, dequantize_weight(plain.codes(), rot))
    assert _relative_error(lin.weight, w_hat) < 0.5 * err_plain
    assert q.bits_per_weight == pytest.approx(3 + 16 / 64 + 1 + 16 / 64)


def test_switch_linear_with_qjl_both_paths(assert_close):
    from mlx_lm.models.switch_layers import SwitchLinear

    sw = SwitchLinear(64, 32, 8, bias=False)
    q = TurboQuantSwitchLinear.from_switch_linear(sw, bits=2, group_size=32, use_qjl=True)
    full = unrotate(
        dequantize_weight_rotated(q.codes()) + dequantize_qjl_rotated(q.qjl(), q.sketch()),
        q.rotation(),
    )
    for tokens in (1, 40):
        x = mx.random.normal((tokens, 1, 1, 64))
        idx = mx.random.randint(0, 8, (tokens, 2))
        assert_close(q(x, idx), mx.gather_mm(x, full.swapaxes(-1, -2), rhs_indices=idx))


def test_embedding_with_qjl_lookup_and_tied_head(assert_close):
    q = TurboQuantEmbedding.from_embedding(nn.Embedding(50, 128), 3, 64, use_qjl=True)
    table = unrotate(
        dequantize_weight_rotated(q.codes()) + dequantize_qjl_rotated(q.qjl(), q.sketch()),
        q.rotation(),
    )
    ids = mx.array([[1, 7, 49]])
    assert_close(q(ids), table[ids])
    x = mx.random.normal((2, 128))
    assert_close(q.as_linear(x), x @ table.T)


def test_recipe_use_qjl_plans_and_rebuilds_layers(assert_close):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    source = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    source.update(model.parameters())
    plan = quantize_model(model, QuantRecipe(bits=3, group_size=32, use_qjl=True))
    assert all(spec["qjl"] is True for spec in plan.values())
    fresh = apply_plan(source, plan, scale_method=None)
    fresh.load_weights(tree_flatten(model.parameters()), strict=True)
    x = mx.random.normal((2, 64))
    assert_close(fresh(x), model(x))
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert {"layers.0.qjl_signs", "layers.0.qjl_scales", "layers.0.qjl_flips"} <= names


def test_recipe_rejects_non_bool_use_qjl():
    with pytest.raises(TypeError, match="use_qjl"):
        QuantRecipe(use_qjl="yes")
