"""Tests for tq_core.quant_prod and tq_core.qjl: unbiased inner products, fast vs reference."""

import math

import mlx.core as mx
import pytest
from tq_core import (
    dequantize_prod,
    inner_product_prod,
    make_rotation,
    make_sketch,
    quantize_prod,
)


def _unit(n, d, seed):
    x = mx.random.normal((n, d), key=mx.random.key(seed))
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_unbiased_over_sketches(bits):
    # Fixed x and y; the estimator is unbiased over the random rotation and sketch (Thm 2).
    d, draws = 64, 400
    x = _unit(1, d, 1)[0]
    y = 0.6 * x + 0.8 * _unit(1, d, 2)[0]
    truth = mx.sum(x * y).item()
    est = []
    for s in range(draws):
        rot, sk = make_rotation(d, seed=s), make_sketch(d, seed=s)
        est.append(inner_product_prod(quantize_prod(x, bits, rot, sk), y, rot, sk))
    est = mx.stack(est)
    se = mx.std(est).item() / math.sqrt(draws)
    assert abs(mx.mean(est).item() - truth) < 4 * se


def test_mse_part_alone_is_biased_where_prod_is_not():
    d = 64
    x = _unit(1, d, 5)[0]
    shrink = []
    for s in range(100):
        rot, sk = make_rotation(d, seed=s), make_sketch(d, seed=s)
        codes = quantize_prod(x, 2, rot, sk)  # its mse part is the 1-bit quantizer
        shrink.append(codes.mse.norms * 0 + inner_product_prod(codes, x, rot, sk))
    # 1-bit mse alone shrinks <x, x^> to about 1 - 0.36; prod restores ~1.
    assert mx.mean(mx.stack(shrink)).item() == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("bits", [1, 2, 4, 5])
def test_estimator_equals_reconstruction(bits, assert_close):
    d = 128
    rot, sk = make_rotation(d, seed=1), make_sketch(d, seed=2)
    x = mx.random.normal((3, 50, d), key=mx.random.key(3))
    y = mx.random.normal((3, 50, d), key=mx.random.key(4))
    codes = quantize_prod(x, bits, rot, sk)
    fast = inner_product_prod(codes, y, rot, sk)
    ref = mx.sum(y * dequantize_prod(codes, rot, sk), axis=-1)
    assert_close(fast, ref, rel=1e-4 if mx.default_device() == mx.cpu else None)
    assert codes.signs.shape == (3, 50, 4) and codes.residual_norms.shape == (3, 50)


def test_distortion_near_expectation():
    d, bits = 128, 3
    rot, sk = make_rotation(d, seed=3), make_sketch(d, seed=3)
    x, y = _unit(4000, d, 6), _unit(4000, d, 7)
    err = inner_product_prod(quantize_prod(x, bits, rot, sk), y, rot, sk) - mx.sum(x * y, -1)
    expected = (math.pi / 2) * 0.1160 / d  # (pi/2) D_mse(b-1) / d
    assert mx.mean(err * err).item() == pytest.approx(expected, rel=0.1)


def test_bad_input():
    rot, sk = make_rotation(64), make_sketch(64)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_prod(mx.zeros((1, 64)), 8, rot, sk)
    with pytest.raises(ValueError, match="sketch must have shape"):
        quantize_prod(mx.zeros((1, 64)), 2, rot, make_sketch(32))
    codes = quantize_prod(mx.ones((1, 64)), 2, rot, sk)
    with pytest.raises(ValueError, match=r"y.shape\[-1\] must be 64"):
        inner_product_prod(codes, mx.ones((1, 32)), rot, sk)
    with pytest.raises(TypeError, match="floating dtype"):
        inner_product_prod(codes, mx.ones((1, 64), dtype=mx.int32), rot, sk)
