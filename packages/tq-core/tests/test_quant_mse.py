"""Tests for tq_core.quant_mse: TurboQuant_mse distortion, edge cases and bad input."""

import mlx.core as mx
import numpy as np
import pytest
from tq_core import (
    dequantize_mse,
    make_rotation,
    nearest_index,
    quantize_mse,
    sphere_codebook,
)

OPTIMUM_128 = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.0093}


def _unit(n, d, seed):
    x = mx.random.normal((n, d), key=mx.random.key(seed))
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_distortion_matches_optimum_d128(bits):
    errs = []
    for draw in range(8):  # expectation over rotations, as in the paper
        rot = make_rotation(128, seed=draw)
        x = _unit(1000, 128, draw)
        errs.append(mx.mean(mx.sum((x - dequantize_mse(quantize_mse(x, bits, rot), rot)) ** 2, -1)))
    assert mx.mean(mx.stack(errs)).item() == pytest.approx(OPTIMUM_128[bits], rel=0.03)


def test_eight_bits_and_scale_invariance():
    rot = make_rotation(64, seed=1)
    x = 37.0 * mx.random.normal((200, 64), key=mx.random.key(2))
    q = quantize_mse(x, 8, rot)
    rel = mx.sum((x - dequantize_mse(q, rot)) ** 2) / mx.sum(x * x)
    assert rel.item() < 1e-3
    assert mx.allclose(q.norms, mx.linalg.norm(x, axis=-1), rtol=1e-5).item()


def test_nearest_index_is_argmin():
    cb = sphere_codebook(3, 64)
    y = mx.random.normal((5000,), key=mx.random.key(3)) * 0.2
    got = np.array(nearest_index(y, cb.boundaries_mx(), 3))
    want = np.argmin(np.abs(np.array(y)[:, None] - cb.centroids[None, :]), axis=1)
    assert np.array_equal(got, want)


def test_zero_vector_and_batch_shapes():
    rot = make_rotation(128)
    x = mx.random.normal((2, 3, 128)).at[1, 2].multiply(0.0)
    q = quantize_mse(x.astype(mx.float16), 4, rot)
    assert q.indices.shape == (2, 3, 16) and q.norms.shape == (2, 3)
    out = dequantize_mse(q, rot, dtype=mx.float16)
    assert out.dtype == mx.float16 and out.shape == x.shape
    assert mx.all(out[1, 2] == 0).item()


def test_bad_input():
    rot = make_rotation(64)
    for bad in (0, 5, 7, 1.5):
        with pytest.raises(ValueError, match="bits must be one of"):
            quantize_mse(mx.zeros((1, 64)), bad, rot)
    with pytest.raises(TypeError, match="floating dtype"):
        quantize_mse(mx.zeros((1, 64), dtype=mx.int32), 2, rot)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must be 64"):
        quantize_mse(mx.zeros((1, 128)), 2, rot)
    with pytest.raises(ValueError, match="codebook has 3 bits"):
        quantize_mse(mx.zeros((1, 64)), 2, rot, codebook=sphere_codebook(3, 64))
    q = quantize_mse(mx.ones((1, 64)), 2, rot)
    with pytest.raises(ValueError, match="does not match"):
        dequantize_mse(q, make_rotation(128))
