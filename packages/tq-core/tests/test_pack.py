"""Tests for tq_core.pack: exact round trips and the documented bit layout."""

import mlx.core as mx
import numpy as np
import pytest
from tq_core import pack, packed_words, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("length", [1, 7, 32, 64, 96, 100, 576])
def test_round_trip_random(bits, length):
    rng = np.random.default_rng(bits * 1000 + length)
    v = mx.array(rng.integers(0, 2**bits, size=(2, 3, length)).astype(np.uint8))
    p = pack(v, bits)
    assert p.dtype == mx.uint32 and p.shape == (2, 3, packed_words(length, bits))
    assert mx.array_equal(unpack(p, bits, length), v.astype(mx.uint32)).item()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_every_value_in_every_position(bits):
    # Each value 0..2^b-1 at each of the 32 slots of a block (covers straddling slots).
    n = 2**bits
    v = (np.arange(n)[:, None] + np.arange(32)[None, :]) % n
    got = unpack(pack(mx.array(v.astype(np.int32)), bits), bits, 32)
    assert np.array_equal(np.array(got), v)


def test_three_bit_layout():
    v = np.arange(32) % 8
    words = np.array(pack(mx.array(v.astype(np.uint32)), 3))
    assert words.shape == (3,)
    stream = "".join(format(int(w), "032b")[::-1] for w in words)  # little-endian bit stream
    assert [int(stream[3 * j : 3 * j + 3][::-1], 2) for j in range(32)] == v.tolist()


def test_four_bit_is_nibbles():
    v = mx.array([1, 2, 3, 4, 5, 6, 7, 8] * 4, dtype=mx.uint32)
    assert int(pack(v, 4)[0].item()) == 0x87654321


def test_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(mx.zeros((32,), dtype=mx.uint32), 5)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack(mx.array([0, 8], dtype=mx.uint32), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack(mx.array([-1, 2], dtype=mx.int32), 2)
    with pytest.raises(TypeError, match="integer dtype"):
        pack(mx.zeros((32,)), 2)
    with pytest.raises(ValueError, match="must be 3"):
        unpack(mx.zeros((4,), dtype=mx.uint32), 3, 32)
    with pytest.raises(TypeError, match="uint32"):
        unpack(mx.zeros((3,), dtype=mx.int32), 3, 32)
