"""TurboQuant_prod (arXiv 2504.19874, Algorithm 2): unbiased inner products at b bits.

Quantize with TurboQuant_mse at b - 1 bits, then spend the last bit on a QJL sketch of the
residual r = x - x^_mse, storing ||r||. The mse part has a small bias in inner products; the
QJL part is unbiased for the residual, so <y, x^> is unbiased for <y, x> (Theorem 2), with
distortion about (pi / 2) * D_mse(b - 1) * ||y||^2 / d.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ._checks import check_choice, check_float_array, check_last_dim
from .pack import _pack, _unpack
from .qjl import qjl_dequantize, qjl_scale, qjl_signs
from .quant_mse import MSEQuantized, dequantize_mse, dequantize_mse_rotated, quantize_mse
from .rotation import Rotation, rotate

PROD_BITS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class ProdQuantized:
    """TurboQuant_prod codes: an mse part at bits - 1 (None at 1 bit) and the QJL residual."""

    mse: MSEQuantized | None
    signs: mx.array  # (..., packed_words(dim, 1)) uint32, sign(S r)
    residual_norms: mx.array  # (...,) float32, ||r||
    bits: int
    dim: int


def _check_sketch(sketch: mx.array, dim: int) -> None:
    if sketch.shape != (dim, dim):
        raise ValueError(f"sketch must have shape ({dim}, {dim}), got {sketch.shape}")


def quantize_prod(x: mx.array, bits: int, rotation: Rotation, sketch: mx.array) -> ProdQuantized:
    """Quantize the rows of ``x`` (..., d) with TurboQuant_prod at ``bits`` bits per coordinate."""
    check_choice("bits", bits, PROD_BITS)
    check_float_array("x", x)
    check_last_dim("x", x, rotation.dim)
    _check_sketch(sketch, rotation.dim)
    x = x.astype(mx.float32)
    if bits > 1:
        mse = quantize_mse(x, bits - 1, rotation)
        residual = x - dequantize_mse(mse, rotation)
    else:
        mse, residual = None, x
    norms = mx.sqrt(mx.sum(residual * residual, axis=-1))
    signs = _pack(qjl_signs(residual, sketch), 1)
    return ProdQuantized(mse, signs, norms, bits, rotation.dim)


def dequantize_prod(
    q: ProdQuantized, rotation: Rotation, sketch: mx.array, dtype=mx.float32
) -> mx.array:
    """Reconstruct ``x^ = x^_mse + sqrt(pi/2)/d ||r|| S^T sign(S r)``."""
    _check_sketch(sketch, q.dim)
    out = qjl_dequantize(_unpack(q.signs, 1, q.dim), q.residual_norms, sketch)
    if q.mse is not None:
        out = out + dequantize_mse(q.mse, rotation)
    return out.astype(dtype)


def inner_product_prod(
    q: ProdQuantized, y: mx.array, rotation: Rotation, sketch: mx.array
) -> mx.array:
    """Unbiased estimate of <y, x> for each coded x, without reconstructing x.

    ``<y, x^_mse> = <R y, ||x|| C[idx]>`` (rotate the query once) plus the QJL term
    ``sqrt(pi/2)/d ||r|| <S y, z>``. ``y`` (..., d) broadcasts against the codes' batch shape.
    """
    check_float_array("y", y)
    check_last_dim("y", y, q.dim)
    _check_sketch(sketch, q.dim)
    y = y.astype(mx.float32)
    z = 2.0 * _unpack(q.signs, 1, q.dim).astype(mx.float32) - 1.0
    est = qjl_scale(q.dim) * q.residual_norms * mx.sum((y @ sketch.T) * z, axis=-1)
    if q.mse is not None:
        est = est + mx.sum(rotate(y, rotation) * dequantize_mse_rotated(q.mse), axis=-1)
    return est
