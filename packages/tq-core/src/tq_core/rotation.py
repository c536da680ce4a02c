"""Seeded randomized Hadamard rotation ``R = H_blocks · diag(signs)``, and its inverse.

TurboQuant (arXiv 2504.19874, Sec. 3.1) rotates every vector by a random orthogonal matrix so
that each coordinate follows a known law regardless of the input. A dense random rotation
costs O(d^2); a randomized Hadamard transform (random ±1 signs, then a Walsh-Hadamard
transform) costs O(d log d) and gives the same coordinate law for random inputs. Dimensions
that are not a supported Hadamard size are rotated blockwise (block = the largest supported
size dividing the dimension), with signs drawn over the whole dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ._checks import check_float_array, check_last_dim, check_positive_int
from .hadamard import hadamard, inverse_hadamard, is_hadamard_size, largest_hadamard_block


@dataclass(frozen=True)
class Rotation:
    """A randomized blockwise Hadamard rotation of vectors of length ``dim``."""

    dim: int
    block: int
    seed: int
    signs: mx.array  # (dim,) float32, entries ±1

    @property
    def num_blocks(self) -> int:
        return self.dim // self.block


def random_signs(dim: int, seed: int, stream: int = 0x5107) -> mx.array:
    """±1 signs from numpy's PCG64, so a seed means the same rotation on every backend and
    MLX version (checkpoints store the seed and the signs). ``stream`` separates independent
    draws from one seed (the weight rotation and its QJL sketch)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))
    return mx.array(rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=dim))


def make_rotation(dim: int, seed: int = 0, block: int | None = None) -> Rotation:
    """Build the rotation for vectors of length ``dim``.

    ``block`` defaults to the largest supported Hadamard size dividing ``dim``; an explicit
    block must divide ``dim`` and be a supported size (m * 2**k, m in 1, 12, 20, 28).
    """
    check_positive_int("dim", dim)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if block is None:
        block = largest_hadamard_block(dim)
    else:
        check_positive_int("block", block)
        if dim % block or not is_hadamard_size(block):
            raise ValueError(
                f"block must divide dim={dim} and be a supported Hadamard size "
                f"(m * 2**k, m in 1, 12, 20, 28), got {block}"
            )
    return Rotation(dim=dim, block=block, seed=seed, signs=random_signs(dim, seed))


def _blocks(x: mx.array, rotation: Rotation) -> mx.array:
    return x.reshape(*x.shape[:-1], rotation.num_blocks, rotation.block)


def rotate(x: mx.array, rotation: Rotation) -> mx.array:
    """``R x`` along the last axis; keeps x's dtype (float32 math for float32 input)."""
    check_float_array("x", x)
    check_last_dim("x", x, rotation.dim)
    y = x * rotation.signs.astype(x.dtype)
    return hadamard(_blocks(y, rotation)).reshape(x.shape)


def unrotate(y: mx.array, rotation: Rotation) -> mx.array:
    """``R^T y``, the inverse of :func:`rotate`."""
    check_float_array("y", y)
    check_last_dim("y", y, rotation.dim)
    x = inverse_hadamard(_blocks(y, rotation)).reshape(y.shape)
    return x * rotation.signs.astype(y.dtype)
