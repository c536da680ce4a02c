"""Shared test helpers for tq-core: device-aware closeness for float32 matmul results."""

import mlx.core as mx
import pytest


def _relative_error(a: mx.array, b: mx.array) -> float:
    scale = max(mx.abs(b).max().item(), 1e-12)
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item() / scale


@pytest.fixture
def assert_close():
    """``assert_close(got, want)``: max error relative to want's largest entry. A CPU computes
    float32 matmuls exactly enough for 1e-5; a GPU may round them through TF32 (~1e-3)."""
    limit = 1e-5 if mx.default_device() == mx.cpu else 5e-3

    def check(got, want, rel=None):
        assert got.shape == want.shape, (got.shape, want.shape)
        err = _relative_error(got, want)
        assert err <= (rel or limit), f"relative error {err:.2e} > {rel or limit:.0e}"

    return check


@pytest.fixture
def needs_hadamard():
    """``needs_hadamard(n)``: skip when this backend has no kernel for size n (mlx 0.32.4's
    CUDA backend cannot build m = 20 or 28), after checking the error is the clear one."""
    from tq_core import hadamard

    def check(n: int) -> None:
        try:
            mx.eval(hadamard(mx.zeros((1, n))))
        except ValueError as e:
            assert "is not available on" in str(e)
            pytest.skip(str(e))

    return check
