"""Which fused-kernel backend (Metal, CUDA, or none) the current MLX build can run."""

from __future__ import annotations

from functools import cache

import mlx.core as mx


@cache  # asked on every decode step and layer; a process's MLX build does not change
def kernel_backend() -> str | None:
    """``"metal"`` or ``"cuda"`` when MLX has that GPU backend available, else ``None``
    (CPU-only builds run tq-core's reference path)."""
    metal = getattr(mx, "metal", None)
    if metal is not None and metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None
