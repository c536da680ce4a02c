"""Tests for tq_core.hadamard: safe sizes, orthonormality, and the inverse of each family."""

import mlx.core as mx
import numpy as np
import pytest
from tq_core import (
    hadamard,
    hadamard_factor,
    inverse_hadamard,
    is_hadamard_size,
    largest_hadamard_block,
)

SYMMETRIC = [64, 768, 1536, 4096, 12288]  # m = 1 or 12
NON_SYMMETRIC = [896, 3584, 5120, 14336]  # m = 20 or 28


def _matrix(n: int) -> np.ndarray:
    return np.array(hadamard(mx.eye(n, dtype=mx.float32)))


@pytest.mark.parametrize("n", SYMMETRIC + NON_SYMMETRIC)
def test_orthonormal_and_inverse(n, needs_hadamard):
    needs_hadamard(n)
    x = mx.random.normal((3, n), key=mx.random.key(n))
    y = hadamard(x)
    assert np.allclose(
        np.linalg.norm(np.array(y), axis=-1), np.linalg.norm(np.array(x), axis=-1), rtol=1e-5
    )
    back = inverse_hadamard(y)
    assert mx.abs(back - x).max().item() < 1e-4


@pytest.mark.parametrize("n", [64, 768, 896, 1792])
def test_orthogonal_to_1e5(n, needs_hadamard):
    needs_hadamard(n)
    h = _matrix(n).astype(np.float64)
    assert np.abs(h @ h.T - np.eye(n)).max() < 1e-5


def test_symmetry_by_family(needs_hadamard):
    needs_hadamard(896)
    assert np.allclose(_matrix(768), _matrix(768).T, atol=1e-6)
    h = _matrix(896)
    assert not np.allclose(h, h.T, atol=1e-3)  # so its inverse must be the transpose
    x = mx.random.normal((2, 896), key=mx.random.key(0))
    assert mx.abs(hadamard(hadamard(x)) - x).max().item() > 0.1
    assert mx.abs(inverse_hadamard(hadamard(x)) - x).max().item() < 1e-4


@pytest.mark.parametrize("m, p", [(20, 4), (28, 8), (20, 64)])
def test_kron_structure_the_inverse_relies_on(m, p, needs_hadamard):
    needs_hadamard(m * p)
    # MLX's transform is kron(H_m, H_p) on the CPU; other backends may use kron(H_p, H_m).
    from tq_core.hadamard import _base_matrix, _m_outer

    # H_m is read off the CPU: mlx 0.32.4's CUDA backend cannot build a size-m transform.
    h, hm, hp = _matrix(m * p), np.array(_base_matrix(m)), _matrix(p)
    outer, inner = np.kron(hm, hp), np.kron(hp, hm)
    assert np.allclose(h, outer, atol=1e-5) or np.allclose(h, inner, atol=1e-5)
    assert _m_outer(m, p) == np.allclose(h, outer, atol=1e-5)
    if mx.default_device() == mx.cpu:
        assert np.allclose(h, outer, atol=1e-6)


@pytest.mark.parametrize("n", [576, 2880, 9, 3, 0, -4, 96 * 3, 1 << 16])
def test_unsupported_sizes_are_refused_before_mlx(n):
    # 576 and 2880 corrupt the heap inside mx.hadamard_transform: they must never reach it.
    assert not is_hadamard_size(n)
    if n > 0:
        with pytest.raises(ValueError, match="not a supported Hadamard size"):
            hadamard(mx.zeros((1, n)))


def test_factor_and_largest_block():
    assert hadamard_factor(896) == (28, 32)
    assert hadamard_factor(1536) == (12, 128)
    assert largest_hadamard_block(576) == 192
    assert largest_hadamard_block(2880) == 192  # self-inverse bases (1, 12) by default
    assert largest_hadamard_block(2880, bases=(1, 12, 20, 28)) == 320  # 9 x 320, 20 * 16
    assert largest_hadamard_block(896) == 128
    assert largest_hadamard_block(4096) == 4096
    assert largest_hadamard_block(14336) == 2048
    assert largest_hadamard_block(14336, bases=(1, 12, 20, 28)) == 14336
    assert largest_hadamard_block(7) == 1


def test_bad_input_types():
    with pytest.raises(TypeError, match="floating dtype"):
        hadamard(mx.zeros((2, 64), dtype=mx.int32))
    with pytest.raises(TypeError, match="mlx.core.array"):
        hadamard(np.zeros((2, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        largest_hadamard_block(0)
