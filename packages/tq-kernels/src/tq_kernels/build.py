"""Turn :mod:`tq_kernels.sources` into callable MLX custom kernels, once per process."""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from .backend import kernel_backend
from .kernel_file import by_file
from .minify import minify
from .sources import kernel_source

__all__ = ["get_kernel", "make_kernel"]


def make_kernel(
    backend: str,
    name: str,
    header: str,
    body: str,
    input_names,
    output_names,
    row_contiguous: bool,
):
    """An MLX custom kernel of this text for ``backend``: minified, and on CUDA handed over
    as files (:mod:`tq_kernels.kernel_file`)."""
    header, body = minify(header), minify(body)
    make = mx.fast.metal_kernel
    if backend == "cuda":
        header, body = by_file(header, body, input_names)
        make = mx.fast.cuda_kernel
    return make(
        name=name,
        input_names=list(input_names),
        output_names=list(output_names),
        source=body,
        header=header,
        ensure_row_contiguous=row_contiguous,
    )


@cache
def get_kernel(
    op: str,
    qjl: bool = False,
    backend: str | None = None,
    rotate: bool = False,
    segments: int = 1,
    residual: bool = False,
):
    """The compiled-on-first-call kernel object of ``op`` for ``backend`` (default: the
    current one). Raises RuntimeError where no GPU backend is available."""
    backend = backend or kernel_backend()
    if backend is None:
        raise RuntimeError("tq-kernels: no GPU backend (Metal or CUDA) is available")
    src = kernel_source(op, backend, qjl, rotate, segments, residual)
    return make_kernel(
        backend, src.name, src.header, src.body, src.input_names, src.output_names, True
    )
