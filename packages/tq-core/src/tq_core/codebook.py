"""Lloyd-Max scalar codebooks for TurboQuant, computed by the algorithm (never pasted).

Two source laws (arXiv 2504.19874, Sec. 3.1, Lemma 1):
- ``gaussian``: N(0, 1), the law of a rotated coordinate of a large group of weights after
  dividing by its RMS; used for weights.
- ``sphere``: one coordinate of a uniformly random unit vector in R^d, density proportional
  to (1 - x^2)^((d - 3) / 2) on [-1, 1]; used for KV vectors of dimension d = head_dim.

Lloyd-Max (Lloyd 1982; Max 1960) alternates the two optimality conditions of a scalar
quantizer: boundaries halfway between centroids, centroids at the conditional mean of their
cell. Integrals are taken by cumulative quadrature on a fine grid in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import mlx.core as mx
import numpy as np

from ._checks import check_choice, check_positive_int

CODEBOOK_BITS = (1, 2, 3, 4, 8)
_GRID = (1 << 19) + 1
_TOL = 1e-13
_MAX_ITERS = 20000


@dataclass(frozen=True)
class Codebook:
    """A symmetric scalar codebook: ``2**bits`` sorted centroids and their cell boundaries."""

    law: str  # "gaussian" or "sphere"
    bits: int
    dim: int | None  # the d of the sphere law; None for gaussian
    centroids: np.ndarray  # (2**bits,) float64, ascending
    boundaries: np.ndarray  # (2**bits - 1,) float64, midpoints between centroids
    mse: float  # E[(X - q(X))^2] for one coordinate under the law

    @property
    def distortion(self) -> float:
        """Expected squared error relative to the signal energy of one vector.

        For ``sphere`` this is E||x - x^||^2 for a unit vector x in R^d (d * mse), the
        quantity the paper's Theorem 1 bounds; for ``gaussian`` it is mse / E[X^2] = mse.
        """
        return self.mse * self.dim if self.law == "sphere" else self.mse

    def centroids_mx(self, dtype=mx.float32) -> mx.array:
        return mx.array(self.centroids.astype(np.float32)).astype(dtype)

    def boundaries_mx(self, dtype=mx.float32) -> mx.array:
        return mx.array(self.boundaries.astype(np.float32)).astype(dtype)


def _grid_law(law: str, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Grid points and normalized density values of the law (float64)."""
    if law == "gaussian":
        x = np.linspace(-13.0, 13.0, _GRID)
        logp = -0.5 * x * x
    else:
        # The law concentrates like N(0, 1/d); 15 standard deviations hold all of its mass
        # that float64 can see.
        half = min(1.0, 15.0 / np.sqrt(dim))
        x = np.linspace(-half, half, _GRID)
        with np.errstate(divide="ignore"):
            logp = 0.5 * (dim - 3) * np.log1p(-x * x)
        logp[~np.isfinite(logp)] = -np.inf
    p = np.exp(logp - logp[np.isfinite(logp)].max())
    return x, p


def _cumulative(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Cumulative trapezoid integral of f over x, starting at 0."""
    out = np.zeros_like(x)
    out[1:] = np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(x))
    return out


def _lloyd_max(
    x: np.ndarray, p: np.ndarray, levels: int, float16_exact: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    mass = _cumulative(x, p)
    p = p / mass[-1]
    m0, m1, m2 = _cumulative(x, p), _cumulative(x, x * p), _cumulative(x, x * x * p)
    m0 /= m0[-1]
    # Start from the high-resolution optimum: equal-mass cells of the density p^(1/3)
    # (Panter-Dite), which Lloyd's iteration then refines.
    comp = _cumulative(x, np.cbrt(p))
    comp /= comp[-1]
    edges = np.interp((np.arange(1, levels)) / levels, comp, x)
    for _ in range(_MAX_ITERS):
        lo = np.concatenate([[x[0]], edges])
        hi = np.concatenate([edges, [x[-1]]])
        w = np.interp(hi, x, m0) - np.interp(lo, x, m0)
        s = np.interp(hi, x, m1) - np.interp(lo, x, m1)
        centroids = s / np.maximum(w, 1e-300)
        new_edges = 0.5 * (centroids[1:] + centroids[:-1])
        moved = np.max(np.abs(new_edges - edges)) if levels > 1 else 0.0
        edges = new_edges
        if moved < _TOL:
            break
    # Symmetric law: enforce exact symmetry against quadrature round-off.
    centroids = 0.5 * (centroids - centroids[::-1])
    if float16_exact:
        # Rounding is symmetric, so the codebook stays symmetric; boundaries and mse below
        # are those of the rounded centroids (an mse change of order 1e-8 relative).
        centroids = centroids.astype(np.float16).astype(np.float64)
    edges = 0.5 * (centroids[1:] + centroids[:-1])
    lo = np.concatenate([[x[0]], edges])
    hi = np.concatenate([edges, [x[-1]]])
    w = np.interp(hi, x, m0) - np.interp(lo, x, m0)
    s1 = np.interp(hi, x, m1) - np.interp(lo, x, m1)
    s2 = np.interp(hi, x, m2) - np.interp(lo, x, m2)
    mse = float(np.sum(s2 - 2 * centroids * s1 + centroids**2 * w))
    return centroids, edges, mse


@cache
def gaussian_codebook(bits: int) -> Codebook:
    """Lloyd-Max codebook of ``2**bits`` levels for N(0, 1)."""
    check_choice("bits", bits, CODEBOOK_BITS)
    x, p = _grid_law("gaussian", None)
    c, b, mse = _lloyd_max(x, p, 1 << bits)
    return Codebook("gaussian", bits, None, c, b, mse)


@cache
def sphere_codebook(bits: int, dim: int) -> Codebook:
    """Lloyd-Max codebook for one coordinate of a uniform random unit vector in R^dim.

    The centroids are rounded to float16-representable values (boundaries and mse are those
    of the rounded centroids), so a kernel may dequantize KV codes to float16 without error:
    the tensor-core attention of tq-kernels feeds them to fp16 matrix units."""
    check_choice("bits", bits, CODEBOOK_BITS)
    check_positive_int("dim", dim)
    if dim < 3:
        raise ValueError(f"dim must be at least 3 for the sphere coordinate law, got {dim}")
    x, p = _grid_law("sphere", dim)
    c, b, mse = _lloyd_max(x, p, 1 << bits, float16_exact=True)
    return Codebook("sphere", bits, dim, c, b, mse)
