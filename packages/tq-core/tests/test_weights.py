"""Tests for tq_core.weights: group-wise TurboQuant weight codes against direct math."""

import mlx.core as mx
import numpy as np
import pytest
from tq_core import (
    dequantize_weight,
    dequantize_weight_rotated,
    gaussian_codebook,
    quantize_weight,
    rotate,
    weight_rotation,
)


def _w(shape, seed=0):
    return 0.02 * mx.random.normal(shape, key=mx.random.key(seed))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_matches_direct_reference(bits, group_size):
    # Recompute the codes in numpy: rotate, rms scale, nearest centroid (scale_method="rms").
    w = _w((24, 256), bits)
    rot = weight_rotation(256, group_size, seed=3)
    q = quantize_weight(w, bits, group_size, rot, scale_method="rms")
    wr = np.array(rotate(w, rot)).reshape(24, -1, group_size)
    s = np.sqrt((wr**2).mean(-1, keepdims=True))
    cb = gaussian_codebook(bits)
    idx = np.argmin(np.abs((wr / s)[..., None] - cb.centroids), axis=-1)
    want = (cb.centroids[idx] * s.astype(np.float16).astype(np.float64)).reshape(24, 256)
    got = np.array(dequantize_weight_rotated(q))
    assert np.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("bits, bound", [(2, 0.125), (3, 0.037), (4, 0.0105)])
def test_error_near_gaussian_optimum(bits, bound):
    w = _w((256, 512), 1)
    rot = weight_rotation(512, 64, seed=0)
    for method in ("rms", "lsq"):
        q = quantize_weight(w, bits, 64, rot, scale_method=method)
        rel = (mx.sum((w - dequantize_weight(q, rot)) ** 2) / mx.sum(w * w)).item()
        assert rel < bound, (method, rel)  # Lloyd-Max N(0,1): 0.1175, 0.0345, 0.0095


def test_lsq_never_worse_than_rms():
    w = _w((64, 256), 2) * mx.linspace(0.1, 3, 256)  # uneven column scales
    rot = weight_rotation(256, 64, seed=0)
    err = {}
    for method in ("rms", "lsq"):
        q = quantize_weight(w, 3, 64, rot, scale_method=method)
        err[method] = mx.sum((w - dequantize_weight(q, rot)) ** 2).item()
    assert err["lsq"] <= err["rms"] * 1.0001


def test_matvec_identity_rotated_activation(assert_close):
    w = _w((40, 192), 4)
    rot = weight_rotation(192, 64, seed=1)
    q = quantize_weight(w, 4, 64, rot)
    x = mx.random.normal((3, 192))
    full = x @ dequantize_weight(q, rot).T
    fast = rotate(x, rot) @ dequantize_weight_rotated(q).T
    assert_close(fast, full)


def test_zero_groups_and_expert_batches():
    w = _w((4, 8, 128), 5).at[1, 2, :64].multiply(0.0)  # (experts, out, in), a zero group
    rot = weight_rotation(128, 64, seed=0)
    q = quantize_weight(w, 3, 64, rot)
    assert q.indices.shape == (4, 8, 12) and q.scales.shape == (4, 8, 2)
    deq = dequantize_weight_rotated(q)
    assert mx.all(deq[1, 2, :64] == 0).item() and mx.all(mx.isfinite(deq)).item()
    assert q.bits_per_weight == 3 + 16 / 64


def test_bad_input():
    rot = weight_rotation(128, 64, 0)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_weight(_w((4, 128)), 5, 64, rot)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_weight(_w((4, 128)), 4, 48, rot)
    with pytest.raises(ValueError, match="must divide the input dimension"):
        quantize_weight(_w((4, 96)), 4, 64, weight_rotation(96, 32, 0))
    with pytest.raises(ValueError, match="rotation.dim"):
        quantize_weight(_w((4, 256)), 4, 64, rot)
    with pytest.raises(TypeError, match="floating dtype"):
        quantize_weight(mx.zeros((4, 128), dtype=mx.int32), 4, 64, rot)
    with pytest.raises(ValueError, match="at least 2 dimension"):
        quantize_weight(_w((128,)), 4, 64, rot)
    with pytest.raises(ValueError, match="scale_method"):
        quantize_weight(_w((4, 128)), 4, 64, rot, scale_method="max")
