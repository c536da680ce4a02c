"""Safe, orthonormal Walsh-Hadamard transforms on top of ``mx.hadamard_transform``.

``mx.hadamard_transform`` has kernels for sizes n = m * 2**k with m in {1, 12, 20, 28}.
Measured with mlx 0.32.4: other sizes (576, 2880) do not raise but corrupt the heap, so every
size is validated here before MLX sees it. For m = 1 and 12 the orthonormal transform is
symmetric (its own inverse); for m = 20 and 28 it is not, and its inverse is its transpose.
MLX computes ``y = x @ kron(H_m, H_{2^k})`` (checked in the tests), so the transpose is
``Y -> H_m^T``-mix of the m blocks after the (symmetric) power-of-two transform.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from ._checks import check_float_array, check_positive_int

HADAMARD_BASES = (1, 12, 20, 28)
#: Largest transform size accepted; MLX's GPU kernels have size limits well above rotation
#: blocks used in practice, and larger transforms buy no extra mixing.
MAX_HADAMARD_SIZE = 1 << 15


def hadamard_factor(n: int) -> tuple[int, int] | None:
    """Return (m, 2**k) with n = m * 2**k and m in HADAMARD_BASES, or None if unsupported."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0 or n > MAX_HADAMARD_SIZE:
        return None
    for m in HADAMARD_BASES:
        if n % m == 0:
            p = n // m
            if p & (p - 1) == 0:
                return m, p
    return None


def is_hadamard_size(n: int) -> bool:
    """True when ``n`` is a size ``mx.hadamard_transform`` supports safely."""
    return hadamard_factor(n) is not None


def largest_hadamard_block(dim: int, max_block: int = MAX_HADAMARD_SIZE) -> int:
    """Largest supported Hadamard size that divides ``dim`` (at most ``max_block``).

    576 = 3 * 192 gives 192 (= 12 * 16); 2880 = 9 * 320 gives 320 (= 20 * 16); 4096 gives 4096.
    """
    check_positive_int("dim", dim)
    best = 1
    for m in HADAMARD_BASES:
        p = 1
        while m * p <= min(dim, max_block):
            if dim % (m * p) == 0:
                best = max(best, m * p)
            p *= 2
    return best


def _check_size(x: mx.array) -> int:
    check_float_array("x", x)
    n = x.shape[-1]
    if not is_hadamard_size(n):
        raise ValueError(
            f"x.shape[-1] = {n} is not a supported Hadamard size: use m * 2**k with m in "
            f"{HADAMARD_BASES} and at most {MAX_HADAMARD_SIZE}, or a blockwise rotation"
        )
    return n


def hadamard(x: mx.array) -> mx.array:
    """Orthonormal Walsh-Hadamard transform along the last axis: ``x @ H`` with H H^T = I."""
    n = _check_size(x)
    return mx.hadamard_transform(x, scale=n**-0.5)


@lru_cache(maxsize=None)
def _base_matrix(m: int) -> mx.array:
    """The orthonormal m x m base block MLX uses (so the inverse matches it exactly)."""
    return mx.hadamard_transform(mx.eye(m, dtype=mx.float32), scale=m**-0.5)


def inverse_hadamard(y: mx.array) -> mx.array:
    """Inverse of :func:`hadamard` (its transpose), for every supported size."""
    n = _check_size(y)
    m, p = hadamard_factor(n)
    if m in (1, 12):
        return mx.hadamard_transform(y, scale=n**-0.5)
    # y @ kron(A, B)^T = vec(A Y B) for Y = y reshaped (m, p), B symmetric (power of two).
    lead = y.shape[:-1]
    blocks = y.reshape(*lead, m, p)
    if p > 1:
        blocks = mx.hadamard_transform(blocks, scale=p**-0.5)
    base = _base_matrix(m).astype(y.dtype)
    return (base @ blocks).reshape(*lead, n)
