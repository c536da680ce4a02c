"""Tests for tq_core.codebook: Lloyd-Max codebooks against independent known values."""

import math

import numpy as np
import pytest
from tq_core import gaussian_codebook, sphere_codebook

# Max (1960) / standard Lloyd-Max tables for N(0, 1).
GAUSSIAN_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03455, 4: 0.009497}
GAUSSIAN_2BIT = [0.4528, 1.5104]
# The exact optimum for the coordinate law at d = 128 (DESIGN.md, computed independently).
SPHERE_128 = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.0093}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_mse(bits):
    assert gaussian_codebook(bits).mse == pytest.approx(GAUSSIAN_MSE[bits], rel=2e-3)


def test_gaussian_centroids():
    assert gaussian_codebook(1).centroids[1] == pytest.approx(math.sqrt(2 / math.pi), rel=1e-6)
    assert gaussian_codebook(2).centroids[2:] == pytest.approx(GAUSSIAN_2BIT, abs=1e-4)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_sphere_distortion_d128(bits):
    assert sphere_codebook(bits, 128).distortion == pytest.approx(SPHERE_128[bits], abs=6e-5)


def test_sphere_one_bit_closed_form():
    # 1 bit: centroids +-E|X| with E|X| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)).
    for d in (16, 64, 128):
        e_abs = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
        cb = sphere_codebook(1, d)
        # The centroid is E|X| rounded to float16 (the codebook is float16-exact), and the
        # distortion is that of the rounded centroid: E X^2 - 2 c E|X| + c^2 per coordinate.
        c = cb.centroids[1]
        assert c == float(np.float16(e_abs)) and c == pytest.approx(e_abs, rel=2**-11)
        assert cb.distortion == pytest.approx(1 - d * (2 * c * e_abs - c * c), rel=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_sphere_centroids_are_float16_exact(bits):
    cb = sphere_codebook(bits, 128)
    assert np.array_equal(cb.centroids, cb.centroids.astype(np.float16).astype(np.float64))
    assert np.array_equal(cb.boundaries, 0.5 * (cb.centroids[1:] + cb.centroids[:-1]))
    assert len(np.unique(cb.centroids)) == 1 << bits


def test_sphere_tends_to_gaussian():
    d = 4096
    for bits in (2, 4):
        scaled = sphere_codebook(bits, d).centroids * math.sqrt(d)
        assert np.allclose(scaled, gaussian_codebook(bits).centroids, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("make", [lambda b: gaussian_codebook(b), lambda b: sphere_codebook(b, 64)])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_structure(make, bits):
    cb = make(bits)
    assert len(cb.centroids) == 2**bits and len(cb.boundaries) == 2**bits - 1
    assert np.all(np.diff(cb.centroids) > 0)
    assert np.allclose(cb.centroids, -cb.centroids[::-1])
    assert np.allclose(cb.boundaries, 0.5 * (cb.centroids[1:] + cb.centroids[:-1]))
    # Theorem 1's upper bound and Shannon's lower bound bracket the optimum.
    assert 4.0**-bits <= cb.distortion <= math.sqrt(3) * math.pi / 2 * 4.0**-bits


def test_centroid_condition_by_monte_carlo():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(2_000_000)
    cb = gaussian_codebook(3)
    cell = np.searchsorted(cb.boundaries, x)
    means = np.array([x[cell == j].mean() for j in range(8)])
    assert np.allclose(means, cb.centroids, atol=5e-3)
    assert np.mean((x - cb.centroids[cell]) ** 2) == pytest.approx(cb.mse, rel=1e-2)


def test_bad_arguments():
    for bad in (0, 5, 16, -1, 2.0, True):
        with pytest.raises(ValueError, match="bits must be one of"):
            gaussian_codebook(bad)
    with pytest.raises(ValueError, match="at least 3"):
        sphere_codebook(2, 2)
    with pytest.raises(ValueError, match="dim"):
        sphere_codebook(2, 0)
