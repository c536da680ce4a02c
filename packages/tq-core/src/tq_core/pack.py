"""Dense bit packing of b-bit unsigned values into uint32 words (b in 1, 2, 3, 4, 8).

Every 32 consecutive values become exactly b words: value j of a block occupies bits
[j*b, j*b + b) of the block's 32*b-bit little-endian stream. For b dividing 32 that is the
usual layout (8 nibbles per word at 4 bits); at 3 bits, 32 values fill 3 words and values 10
and 21 straddle a word boundary. A kernel reads one block of 32 values from b whole words.
The last axis is zero-padded to a multiple of 32 values; :func:`unpack` takes the length.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import numpy as np

from ._checks import check_array, check_choice, check_positive_int

PACK_BITS = (1, 2, 3, 4, 8)
_INT_DTYPES = (mx.uint8, mx.uint16, mx.uint32, mx.int8, mx.int16, mx.int32, mx.int64, mx.uint64)


def packed_words(length: int, bits: int) -> int:
    """Number of uint32 words that hold ``length`` values of ``bits`` bits."""
    check_choice("bits", bits, PACK_BITS)
    return -(-length // 32) * bits


@cache
def _layout(bits: int):
    """Per-value word index, shift, and (for straddling values) the high part's shift."""
    start = np.arange(32) * bits
    word = start // 32
    shift = start % 32
    straddle = shift + bits > 32
    # Where a value spills into the next word, its high part lands at bit 0 of that word.
    high_word = np.where(straddle, word + 1, word)
    high_shift = np.where(straddle, 32 - shift, 0)
    low_onehot = (word[None, :] == np.arange(bits)[:, None]).astype(np.uint32)
    high_onehot = ((high_word[None, :] == np.arange(bits)[:, None]) & straddle[None, :]).astype(
        np.uint32
    )
    as_mx = {
        "word": mx.array(word.astype(np.int32)),
        "shift": mx.array(shift.astype(np.uint32)),
        "high_word": mx.array(high_word.astype(np.int32)),
        "high_shift": mx.array(high_shift.astype(np.uint32)),
        "straddle": mx.array(straddle.astype(np.uint32)),
        "low_onehot": mx.array(low_onehot),
        "high_onehot": mx.array(high_onehot),
    }
    return as_mx


def _pack(values: mx.array, bits: int) -> mx.array:
    """Pack without checks (internal hot path): values must already be in range."""
    length = values.shape[-1]
    pad = (-length) % 32
    v = values.astype(mx.uint32)
    if pad:
        v = mx.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
    lead = v.shape[:-1]
    v = v.reshape(*lead, -1, 1, 32)  # blocks of 32 values
    lay = _layout(bits)
    low = v << lay["shift"]
    # The high part of a straddling value: shift right by (32 - shift); 0 elsewhere.
    high = mx.where(lay["straddle"] > 0, v >> lay["high_shift"], mx.zeros_like(v))
    words = (low * lay["low_onehot"]).sum(-1) + (high * lay["high_onehot"]).sum(-1)
    return words.astype(mx.uint32).reshape(*lead, -1)


def _unpack(packed: mx.array, bits: int, length: int) -> mx.array:
    lead = packed.shape[:-1]
    if 32 % bits == 0:
        # No value straddles a word: shift every word by each slot (3x faster than gathers).
        shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
        v = (packed[..., None] >> shifts) & mx.array((1 << bits) - 1, mx.uint32)
        return v.reshape(*lead, -1)[..., :length]
    w = packed.reshape(*lead, -1, bits)
    lay = _layout(bits)
    low = mx.take(w, lay["word"], axis=-1) >> lay["shift"]
    nxt = mx.take(w, lay["high_word"], axis=-1) << lay["high_shift"]
    v = mx.where(lay["straddle"] > 0, low | nxt, low) & mx.array((1 << bits) - 1, mx.uint32)
    return v.reshape(*lead, -1)[..., :length]


def pack(values: mx.array, bits: int) -> mx.array:
    """Pack integer ``values`` (each in [0, 2**bits)) along the last axis into uint32 words.

    Returns shape ``(..., packed_words(n, bits))``. Values out of range raise ValueError.
    """
    check_choice("bits", bits, PACK_BITS)
    check_array("values", values)
    if values.dtype not in _INT_DTYPES:
        raise TypeError(f"values must have an integer dtype, got {values.dtype}")
    if values.ndim < 1 or values.shape[-1] == 0:
        raise ValueError(f"values must have a non-empty last axis, got shape {values.shape}")
    lo, hi = mx.min(values).item(), mx.max(values).item()
    if lo < 0 or hi >= (1 << bits):
        raise ValueError(
            f"values must lie in [0, {(1 << bits) - 1}] for bits={bits}, got range [{lo}, {hi}]"
        )
    return _pack(values, bits)


def unpack(packed: mx.array, bits: int, length: int) -> mx.array:
    """Inverse of :func:`pack`: the first ``length`` values of the last axis, as uint32."""
    check_choice("bits", bits, PACK_BITS)
    check_array("packed", packed)
    check_positive_int("length", length)
    if packed.dtype != mx.uint32:
        raise TypeError(f"packed must be uint32, got {packed.dtype}")
    if packed.ndim < 1 or packed.shape[-1] != packed_words(length, bits):
        raise ValueError(
            f"packed.shape[-1] must be {packed_words(length, bits)} for length={length} at "
            f"bits={bits}, got shape {packed.shape}"
        )
    return _unpack(packed, bits, length)
