"""Quantized Johnson-Lindenstrauss (QJL) 1-bit sketch (arXiv 2504.19874, Definition 1).

``Q(r) = sign(S r)`` with S a d x d matrix of i.i.d. N(0, 1) entries; the dequantization
``sqrt(pi/2) / d * ||r|| * S^T Q(r)`` is an unbiased estimate of r (Lemma 4), with
inner-product variance at most pi / (2 d) * ||y||^2 ||r||^2.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ._checks import check_positive_int


def make_sketch(dim: int, seed: int = 0) -> mx.array:
    """The seeded Gaussian sketch matrix S (dim x dim, float32), from numpy's PCG64."""
    check_positive_int("dim", dim)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9E3779B9]))
    return mx.array(rng.standard_normal((dim, dim), dtype=np.float32))


def qjl_signs(r: mx.array, sketch: mx.array) -> mx.array:
    """``sign(S r)`` as {0, 1} bits (1 for >= 0), for the rows of ``r`` (..., d)."""
    return (r.astype(mx.float32) @ sketch.T >= 0).astype(mx.uint32)


def qjl_scale(dim: int) -> float:
    return math.sqrt(math.pi / 2) / dim


def qjl_dequantize(bits: mx.array, norms: mx.array, sketch: mx.array) -> mx.array:
    """``sqrt(pi/2)/d * ||r|| * S^T z`` with z = 2 * bits - 1 in {-1, +1}."""
    z = 2.0 * bits.astype(mx.float32) - 1.0
    return qjl_scale(sketch.shape[0]) * norms[..., None] * (z @ sketch)
