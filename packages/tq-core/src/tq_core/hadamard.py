"""Safe, orthonormal Walsh-Hadamard transforms on top of ``mx.hadamard_transform``.

``mx.hadamard_transform`` has kernels for sizes n = m * 2**k with m in {1, 12, 20, 28}.
Measured with mlx 0.32.4: other sizes (576, 2880) do not raise but corrupt the heap, so every
size is validated here before MLX sees it. For m = 1 and 12 the orthonormal transform is
symmetric (its own inverse); for m = 20 and 28 it is not, and its inverse is its transpose.
MLX's transform is a Kronecker product of H_m and H_{2^k}; the CPU computes
``x @ kron(H_m, H_2^k)``, and since nothing documents the order for other backends it is
probed once per device and size, and the transpose applied to match.
"""

from __future__ import annotations

from functools import cache

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


#: Bases whose transform is symmetric, hence its own inverse on every backend.
SELF_INVERSE_BASES = (1, 12)


def largest_hadamard_block(
    dim: int, max_block: int = MAX_HADAMARD_SIZE, bases: tuple[int, ...] = SELF_INVERSE_BASES
) -> int:
    """Largest Hadamard size m * 2**k (m in ``bases``) that divides ``dim``, at most
    ``max_block``. With the default self-inverse bases: 576 -> 192 (12 * 16), 2880 -> 192,
    896 -> 128, 4096 -> 4096; with all of HADAMARD_BASES, 2880 -> 320 (20 * 16).
    """
    check_positive_int("dim", dim)
    best = 1
    for m in bases:
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


def _transform(x: mx.array, n: int) -> mx.array:
    try:
        return mx.hadamard_transform(x, scale=n**-0.5)
    except RuntimeError as e:
        # A backend without a kernel for this size (seen: CUDA, size m = 20 or 28 alone).
        raise ValueError(
            f"Hadamard size {n} (m = {hadamard_factor(n)[0]}) is not available on "
            f"{mx.default_device()}: {str(e).splitlines()[0]}; use a rotation block with "
            "m = 1 or 12 (the default)"
        ) from None


def hadamard(x: mx.array) -> mx.array:
    """Orthonormal Walsh-Hadamard transform along the last axis: ``x @ H`` with H H^T = I."""
    n = _check_size(x)
    return _transform(x, n)


def _base_matrix(m: int) -> mx.array:
    """The orthonormal m x m base block (H_m) of MLX's transform. It is read off the CPU
    backend, whose size-m kernel always builds (mlx 0.32.4's CUDA backend cannot compile a
    transform of size m alone); the per-device probe in :func:`_m_outer` then checks that
    this device's larger transforms are built from the same H_m."""
    return _base_matrix_cpu(m)


@cache
def _base_matrix_cpu(m: int) -> mx.array:
    base = mx.hadamard_transform(mx.eye(m, dtype=mx.float32), scale=m**-0.5, stream=mx.cpu)
    mx.eval(base)
    return base


def _mix(a: mx.array, blocks: mx.array) -> mx.array:
    """``a @ blocks`` over the second-to-last axis, as an exact float32 sum (a GPU matmul
    may round through TF32)."""
    return mx.sum(a[:, :, None] * blocks[..., None, :, :], axis=-2)


def _apply_kron(y: mx.array, m: int, p: int, base: mx.array, m_outer: bool) -> mx.array:
    """``y @ kron(base, H_p)`` (m_outer) or ``y @ kron(H_p, base)``, H_p orthonormal."""
    lead = y.shape[:-1]
    if m_outer:  # (y @ kron(A, B)) as (m, p) = A^T Y B
        blocks = y.reshape(*lead, m, p)
        if p > 1:
            blocks = mx.hadamard_transform(blocks, scale=p**-0.5)
        out = _mix(base.T, blocks)
    else:  # (y @ kron(B, A)) as (p, m) = B Y A
        blocks = y.reshape(*lead, p, m).swapaxes(-1, -2)
        if p > 1:
            blocks = mx.hadamard_transform(blocks, scale=p**-0.5)
        out = _mix(base.T, blocks).swapaxes(-1, -2)
    return out.reshape(*lead, m * p)


_ORDER: dict[tuple[str, int, int], bool] = {}


def _m_outer(m: int, p: int) -> bool:
    """Whether this device's transform of size m * p is ``x @ kron(H_m, H_p)`` (True) or
    ``x @ kron(H_p, H_m)`` (False); probed once per device and size on one random vector."""
    key = (str(mx.default_device()), m, p)
    if key not in _ORDER:
        x = mx.random.normal((1, m * p), key=mx.random.key(m * p))
        y = _transform(x, m * p)
        base = _base_matrix(m)
        errors = [
            mx.abs(_apply_kron(x, m, p, base, outer) - y).max().item() for outer in (True, False)
        ]
        if min(errors) > 1e-3:
            raise RuntimeError(
                f"mx.hadamard_transform of size {m * p} on {key[0]} matches neither Kronecker "
                "order; tq-core cannot invert it. Use a rotation block with m = 1 or 12."
            )
        _ORDER[key] = errors[0] <= errors[1]
    return _ORDER[key]


def inverse_hadamard(y: mx.array) -> mx.array:
    """Inverse of :func:`hadamard` (its transpose), for every supported size."""
    n = _check_size(y)
    m, p = hadamard_factor(n)
    if m in SELF_INVERSE_BASES:
        return mx.hadamard_transform(y, scale=n**-0.5)
    # The transpose of kron(A, B) is kron(A^T, B) (B is symmetric): the same structure with
    # the base matrix transposed.
    base_t = _base_matrix(m).T
    return _apply_kron(y.astype(mx.float32), m, p, base_t, _m_outer(m, p)).astype(y.dtype)
