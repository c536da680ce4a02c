"""TurboQuant weight quantization: rotate each row along the input dimension, then one scale
per group and Lloyd-Max N(0, 1) indices (DESIGN.md, "Weights").

For a row w and its rotation R (blockwise randomized Hadamard along the input dimension),
``w^ = R^T (s ⊙ C[idx])``, so ``<w^, x> = <s ⊙ C[idx], R x>``: rotate the activation once and
the matvec is a table lookup, with no per-weight inverse rotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import mlx.core as mx

from ._checks import check_choice, check_float_array
from .codebook import gaussian_codebook
from .pack import _pack, _unpack
from .quant_mse import nearest_index
from .rotation import Rotation, make_rotation, random_signs, rotate, unrotate

WEIGHT_BITS = (1, 2, 3, 4, 8)
#: Seed stream of the QJL sketch's signs, independent of the weight rotation's.
QJL_SIGN_STREAM = 0x51A7
GROUP_SIZES = (32, 64, 128)
SCALE_METHODS = ("rms", "lsq")


@dataclass(frozen=True)
class QuantizedWeight:
    """Packed TurboQuant codes of a (..., out, in) weight matrix (``...`` = experts)."""

    indices: mx.array  # (..., out, packed_words(in, bits)) uint32
    scales: mx.array  # (..., out, in // group_size) float16
    bits: int
    group_size: int

    @property
    def in_features(self) -> int:
        return self.scales.shape[-1] * self.group_size

    @property
    def bits_per_weight(self) -> float:
        """Indices plus one fp16 scale per group (the rotation is shared, not counted)."""
        return self.bits + 16 / self.group_size


def weight_rotation(in_features: int, group_size: int, seed: int, span: int | None = None):
    """The rotation applied along a weight's input dimension: blocks of ``span`` (default:
    the group size, so each group is rotated on its own)."""
    return make_rotation(in_features, seed=seed, block=span or group_size)


def _group_scales(groups: mx.array, idx: mx.array, centroids: mx.array) -> mx.array:
    """Least-squares scale for fixed indices: argmin_s ||g - s C[idx]||^2."""
    c = centroids[idx]
    num = mx.sum(groups * c, axis=-1)
    den = mx.maximum(mx.sum(c * c, axis=-1), 1e-30)
    return num / den


def quantize_weight(
    w: mx.array,
    bits: int,
    group_size: int,
    rotation: Rotation,
    scale_method: str = "lsq",
    iterations: int = 3,
) -> QuantizedWeight:
    """Quantize ``w`` (..., out, in) with TurboQuant at ``bits`` bits, groups of ``group_size``.

    ``scale_method``: ``"rms"`` sets each group's scale to its RMS (the N(0, 1) codebook's
    natural scale); ``"lsq"`` starts there and alternates nearest-index assignment with the
    least-squares scale ``iterations`` times, which can only lower the group's squared error.
    """
    check_choice("bits", bits, WEIGHT_BITS)
    check_choice("group_size", group_size, GROUP_SIZES)
    check_choice("scale_method", scale_method, SCALE_METHODS)
    check_float_array("w", w, min_ndim=2)
    in_features = w.shape[-1]
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size} must divide the input dimension {in_features} "
            f"(weight shape {w.shape})"
        )
    if rotation.dim != in_features:
        raise ValueError(
            f"rotation.dim={rotation.dim} must equal the input dimension {in_features}"
        )
    codebook = gaussian_codebook(bits)
    centroids, bounds = codebook.centroids_mx(), codebook.boundaries_mx()
    groups = rotate(w.astype(mx.float32), rotation)
    groups = groups.reshape(*w.shape[:-1], in_features // group_size, group_size)
    # A rotated group is ~N(0, rms^2): dividing by its RMS meets the N(0, 1) codebook.
    scales = mx.sqrt(mx.mean(groups * groups, axis=-1))
    safe = mx.where(scales > 0, scales, mx.ones_like(scales))
    idx = nearest_index(groups / safe[..., None], bounds, bits)
    if scale_method == "lsq":
        for _ in range(iterations):
            scales = _group_scales(groups, idx, centroids)
            safe = mx.where(scales > 0, scales, mx.ones_like(scales))
            idx = nearest_index(groups / safe[..., None], bounds, bits)
        scales = _group_scales(groups, idx, centroids)
    scales = scales.astype(mx.float16)
    packed = _pack(idx.reshape(*w.shape[:-1], in_features), bits)
    return QuantizedWeight(packed, scales, bits, group_size)


@cache
def _weight_centroids(bits: int) -> mx.array:
    """The weight codebook's centroids as one evaluated float32 array per bit width: an
    embedding lookup dequantizes rows every decode step, and making the array from the
    codebook's numpy values each time cost more host time than the lookup's ops."""
    return gaussian_codebook(bits).centroids_mx()  # made from numpy: holds its data now


def dequantize_weight_rotated(q: QuantizedWeight, dtype=mx.float32) -> mx.array:
    """``s ⊙ C[idx]``: the weight in the rotated basis, (..., out, in)."""
    idx = _unpack(q.indices, q.bits, q.in_features)
    lead = idx.shape[:-1]
    c = _weight_centroids(q.bits)[idx]
    c = c.reshape(*lead, -1, q.group_size) * q.scales.astype(mx.float32)[..., None]
    return c.reshape(*lead, q.in_features).astype(dtype)


def dequantize_weight(q: QuantizedWeight, rotation: Rotation, dtype=mx.float32) -> mx.array:
    """The weight in the original basis, ``R^T (s ⊙ C[idx])`` row by row."""
    return unrotate(dequantize_weight_rotated(q), rotation).astype(dtype)


@dataclass(frozen=True)
class QJLResidual:
    """1-bit QJL sketch of the residual ``r = R w - s ⊙ C[idx]`` (rotated basis), per row:
    ``z = sign(S r)`` and one fp16 scale per group, so that ``r^ = S^T (gamma ⊙ z)``."""

    signs: mx.array  # (..., out, in // 32) uint32, bit = 1 where (S r) >= 0
    scales: mx.array  # (..., out, in // group_size) float16
    group_size: int

    @property
    def bits_per_weight(self) -> float:
        return 1 + 16 / self.group_size


def qjl_sketch(in_features: int, group_size: int, seed: int) -> Rotation:
    """The sketch S of the weight QJL residual: a randomized Hadamard per group, signs drawn
    from ``seed`` on their own stream. A structured S (SRHT) instead of the paper's dense
    Gaussian (arXiv 2504.19874, Definition 1) keeps ``S (R x)`` at O(d log d) per token."""
    signs = random_signs(in_features, seed, stream=QJL_SIGN_STREAM)
    return Rotation(in_features, group_size, seed, signs)


def quantize_qjl_residual(
    w: mx.array, q: QuantizedWeight, rotation: Rotation, sketch: Rotation
) -> QJLResidual:
    """Sketch the residual of ``q`` (the codes of ``w``) with one sign bit per weight.

    The scale per group is least squares for the fixed signs, ``gamma = mean |S r|``: it
    minimizes the weight's squared error, which is what a weight's output error follows.
    The paper's unbiased scale (``sqrt(pi/2) ||r|| / sqrt(g)`` for an orthonormal S) removes
    ~43% of ``||r||^2`` against ~64% for least squares (1 - 2/pi), so it is not used here.
    """
    lead = w.shape[:-1]
    r = rotate(w.astype(mx.float32), rotation) - dequantize_weight_rotated(q)
    u = rotate(r, sketch)
    groups = u.reshape(*lead, -1, q.group_size)
    gamma = mx.mean(mx.abs(groups), axis=-1).astype(mx.float16)
    signs = _pack((u >= 0).astype(mx.uint32), 1)
    return QJLResidual(signs, gamma, q.group_size)


def dequantize_qjl_rotated(res: QJLResidual, sketch: Rotation, dtype=mx.float32) -> mx.array:
    """``S^T (gamma ⊙ z)`` per row: the residual in the weight's rotated basis."""
    return unrotate(qjl_sketch_values(res), sketch).astype(dtype)


def qjl_sketch_values(res: QJLResidual, dtype=mx.float32) -> mx.array:
    """``gamma ⊙ z`` (z = ±1) per row in the sketch basis:
    ``<r^, x_rot> = <gamma ⊙ z, S x_rot>``."""
    in_features = res.scales.shape[-1] * res.group_size
    lead = res.scales.shape[:-1]
    z = 2.0 * _unpack(res.signs, 1, in_features).astype(mx.float32) - 1.0
    z = z.reshape(*lead, -1, res.group_size) * res.scales.astype(mx.float32)[..., None]
    return z.reshape(*lead, in_features).astype(dtype)
