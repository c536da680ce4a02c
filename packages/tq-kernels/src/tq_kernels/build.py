"""Turn :mod:`tq_kernels.sources` into callable MLX custom kernels, once per process."""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from .backend import kernel_backend
from .minify import minify
from .sources import kernel_source

__all__ = ["get_kernel"]


@cache
def get_kernel(
    op: str,
    qjl: bool = False,
    backend: str | None = None,
    rotate: bool = False,
    segments: int = 1,
):
    """The compiled-on-first-call kernel object of ``op`` for ``backend`` (default: the
    current one). Raises RuntimeError where no GPU backend is available."""
    backend = backend or kernel_backend()
    if backend is None:
        raise RuntimeError("tq-kernels: no GPU backend (Metal or CUDA) is available")
    src = kernel_source(op, backend, qjl, rotate, segments)
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    return make(
        name=src.name,
        input_names=list(src.input_names),
        output_names=list(src.output_names),
        source=minify(src.body),
        header=minify(src.header),
        ensure_row_contiguous=True,
    )
