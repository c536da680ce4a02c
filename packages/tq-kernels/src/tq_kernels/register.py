"""Entry point of the ``tq_core.kernels`` group: registers the fused ops into tq-core."""

from __future__ import annotations

from tq_core import dispatch

from .ops import (
    rotating_matmul_plan,
    rotating_matmul_residual_plan,
    weight_gather_matmul,
    weight_matmul,
)

__all__ = ["register_all"]


def register_all() -> None:
    """Register ``weight_matmul``, ``rotating_matmul_plan``, ``rotating_matmul_residual_plan``
    and ``weight_gather_matmul``.
    Safe on every backend: the ops return ``None`` (reference path) where no GPU kernel
    applies."""
    dispatch.register_kernel("weight_matmul", weight_matmul)
    dispatch.register_kernel("weight_gather_matmul", weight_gather_matmul)
    dispatch.register_kernel("rotating_matmul_plan", rotating_matmul_plan)
    dispatch.register_kernel("rotating_matmul_residual_plan", rotating_matmul_residual_plan)
