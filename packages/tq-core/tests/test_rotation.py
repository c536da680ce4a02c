"""Tests for tq_core.rotation: seeded randomized Hadamard rotations, blockwise when needed."""

import mlx.core as mx
import numpy as np
import pytest
from tq_core import make_rotation, rotate, unrotate


@pytest.mark.parametrize(
    "dim, block",
    [
        (64, None),
        (128, None),
        (576, None),
        (1536, None),
        (2880, None),
        (2880, 320),
        (896, 896),
        (96, None),
        (14336, 14336),
    ],
)
def test_round_trip_and_orthogonal(dim, block, needs_hadamard):
    needs_hadamard(block or 64)
    rot = make_rotation(dim, seed=7, block=block)
    if dim <= 4096:
        eye = mx.eye(dim, dtype=mx.float32)
        r = np.array(rotate(eye, rot), dtype=np.float64)
        assert np.abs(r @ r.T - np.eye(dim)).max() < 1e-5
    x = mx.random.normal((4, 3, dim), key=mx.random.key(1))
    assert mx.abs(unrotate(rotate(x, rot), rot) - x).max().item() < 1e-4


def test_blockwise_dims():
    assert make_rotation(576).block == 192
    assert make_rotation(2880).block == 192
    assert make_rotation(2880, block=320).num_blocks == 9  # non-symmetric family, explicit
    assert make_rotation(4096).block == 4096
    assert make_rotation(576, block=64).num_blocks == 9


def test_seeded_and_stored():
    a, b, c = make_rotation(128, seed=3), make_rotation(128, seed=3), make_rotation(128, seed=4)
    assert mx.array_equal(a.signs, b.signs).item()
    assert not mx.array_equal(a.signs, c.signs).item()
    assert set(np.unique(np.array(a.signs)).tolist()) == {-1.0, 1.0}


def test_gaussianizes_a_spike():
    # A basis vector rotates to coordinates of equal magnitude 1/sqrt(d): the energy spreads.
    rot = make_rotation(256, seed=0)
    e = mx.zeros((256,)).at[5].add(1.0)
    y = np.abs(np.array(rotate(e, rot)))
    assert np.allclose(y, 1 / 16, atol=1e-6)


def test_float16_keeps_dtype():
    rot = make_rotation(64)
    x = mx.random.normal((2, 64)).astype(mx.float16)
    y = rotate(x, rot)
    assert y.dtype == mx.float16
    assert mx.abs(unrotate(y, rot).astype(mx.float32) - x.astype(mx.float32)).max().item() < 1e-2


def test_bad_arguments():
    with pytest.raises(ValueError, match="block must divide"):
        make_rotation(576, block=128)
    with pytest.raises(ValueError, match="block must divide"):
        make_rotation(576, block=9)
    with pytest.raises(ValueError, match="seed"):
        make_rotation(64, seed=-1)
    with pytest.raises(ValueError, match="dim"):
        make_rotation(0)
    rot = make_rotation(64)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must be 64"):
        rotate(mx.zeros((2, 32)), rot)
    with pytest.raises(TypeError, match="floating dtype"):
        rotate(mx.zeros((2, 64), dtype=mx.int32), rot)
    with pytest.raises(TypeError, match="floating dtype"):
        rotate(mx.zeros((2, 64), dtype=mx.complex64), rot)
