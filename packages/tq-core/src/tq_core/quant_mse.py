"""TurboQuant_mse (arXiv 2504.19874, Algorithm 1): norm + b-bit codebook indices of R x/||x||.

The vector is split into its norm and direction; the direction is rotated so each coordinate
follows the sphere law of :mod:`tq_core.codebook`, then every coordinate is rounded to its
nearest Lloyd-Max centroid. For unit x the expected distortion E||x - x^||^2 is the
codebook's ``distortion`` (Theorem 1: at most sqrt(3) pi / 2 * 4^-b).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ._checks import check_choice, check_float_array, check_last_dim
from .codebook import CODEBOOK_BITS, Codebook, sphere_codebook
from .pack import _pack, _unpack
from .rotation import Rotation, rotate, unrotate

MSE_BITS = CODEBOOK_BITS


@dataclass(frozen=True)
class MSEQuantized:
    """Packed TurboQuant_mse codes of vectors of length ``dim``."""

    indices: mx.array  # (..., packed_words(dim, bits)) uint32
    norms: mx.array  # (...,) float32, ||x||
    bits: int
    dim: int


def nearest_index(y: mx.array, boundaries: mx.array, bits: int) -> mx.array:
    """Index of the nearest centroid for each entry of ``y`` by binary search over the sorted
    cell ``boundaries`` (2**bits - 1 of them): ``bits`` gathers, no (n, 2**bits) table."""
    idx = mx.zeros(y.shape, dtype=mx.int32)
    for level in range(bits - 1, -1, -1):
        candidate = idx + (1 << level)
        idx = mx.where(y > boundaries[candidate - 1], candidate, idx)
    return idx


def _unit_and_norm(x: mx.array) -> tuple[mx.array, mx.array]:
    x = x.astype(mx.float32)
    norms = mx.sqrt(mx.sum(x * x, axis=-1))
    safe = mx.where(norms > 0, norms, mx.ones_like(norms))
    return x / safe[..., None], norms


def quantize_mse(
    x: mx.array, bits: int, rotation: Rotation, codebook: Codebook | None = None
) -> MSEQuantized:
    """Quantize the rows of ``x`` (..., d) with TurboQuant_mse at ``bits`` bits per coordinate.

    ``codebook`` defaults to the Lloyd-Max codebook of the sphere law for d = rotation.dim.
    """
    check_choice("bits", bits, MSE_BITS)
    check_float_array("x", x)
    check_last_dim("x", x, rotation.dim)
    codebook = codebook or sphere_codebook(bits, rotation.dim)
    if codebook.bits != bits:
        raise ValueError(f"codebook has {codebook.bits} bits but bits={bits}")
    unit, norms = _unit_and_norm(x)
    idx = nearest_index(rotate(unit, rotation), codebook.boundaries_mx(), bits)
    return MSEQuantized(_pack(idx, bits), norms, bits, rotation.dim)


def dequantize_mse_rotated(q: MSEQuantized, codebook: Codebook | None = None) -> mx.array:
    """``||x|| * C[idx]``: the reconstruction still in the rotated basis (float32)."""
    codebook = codebook or sphere_codebook(q.bits, q.dim)
    idx = _unpack(q.indices, q.bits, q.dim)
    return codebook.centroids_mx()[idx] * q.norms[..., None]


def dequantize_mse(
    q: MSEQuantized, rotation: Rotation, codebook: Codebook | None = None, dtype=mx.float32
) -> mx.array:
    """Reconstruct ``x^ = ||x|| R^T C[idx]`` from TurboQuant_mse codes."""
    if rotation.dim != q.dim:
        raise ValueError(f"rotation.dim={rotation.dim} does not match the codes' dim={q.dim}")
    return unrotate(dequantize_mse_rotated(q, codebook), rotation).astype(dtype)
