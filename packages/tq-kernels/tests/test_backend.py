"""Tests for tq_kernels.backend: the reported backend agrees with what MLX says it has."""

import mlx.core as mx
from tq_kernels import kernel_backend


def test_backend_matches_mlx():
    got = kernel_backend()
    assert got in (None, "metal", "cuda")
    if got == "metal":
        assert mx.metal.is_available()
    elif got == "cuda":
        assert mx.cuda.is_available()
    else:
        assert not mx.metal.is_available()
        assert not (hasattr(mx, "cuda") and mx.cuda.is_available())
