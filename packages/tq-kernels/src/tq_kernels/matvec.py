"""Fused TurboQuant weight products on the GPU: dense matvec, MoE gather matvec, dequantize.

These are the low-level calls (inputs already validated by :mod:`tq_kernels.ops`): ``x`` is
the activation in the weight's rotated basis, ``codes`` a :class:`tq_core.QuantizedWeight`.
"""

from __future__ import annotations

import math
from functools import cache

import mlx.core as mx
from tq_core import QJLResidual, QuantizedWeight, gaussian_codebook

from .build import get_kernel
from .launch import LaunchConfig, launch_config, row_bucket

__all__ = ["matvec", "gather_matvec", "dequantize"]

_DEQUANT_THREADS = 256


@cache
def _codebook(bits: int) -> mx.array:
    c = gaussian_codebook(bits).centroids_mx()
    mx.eval(c)
    return c


def _template(x_dtype, codes: QuantizedWeight, rows: int, cfg: LaunchConfig, qjl: bool):
    return [
        ("T", x_dtype),
        ("BITS", codes.bits),
        ("GS", codes.group_size),
        ("M", row_bucket(rows)),
        *cfg.template(),
        ("QJL", qjl),
    ]


def matvec(
    x: mx.array,
    codes: QuantizedWeight,
    qjl: QJLResidual | None = None,
    x_sketch: mx.array | None = None,
    config: LaunchConfig | None = None,
) -> mx.array:
    """``x (rows <= 8, K) @ W.T`` (+ the QJL term) for a 2-D ``codes`` of shape (N, K)."""
    rows, k = x.shape
    n = codes.scales.shape[0]
    cfg = config or launch_config(n, k, rows)
    inputs = [x, codes.indices, codes.scales, _codebook(codes.bits)]
    if qjl is not None:
        inputs += [x_sketch, qjl.signs, qjl.scales]
    groups = -(-n // cfg.rows_per_group)
    (out,) = get_kernel("matvec", qjl is not None)(
        inputs=inputs,
        template=_template(x.dtype, codes, rows, cfg, qjl is not None),
        grid=(groups * cfg.threads, 1, 1),
        threadgroup=(cfg.threads, 1, 1),
        output_shapes=[(rows, n)],
        output_dtypes=[x.dtype],
    )
    return out


def gather_matvec(
    x: mx.array,
    codes: QuantizedWeight,
    experts: mx.array,
    qjl: QJLResidual | None = None,
    x_sketch: mx.array | None = None,
    config: LaunchConfig | None = None,
) -> mx.array:
    """Entry ``b`` of ``x (B, R <= 8, K)`` times expert ``experts[b]`` of ``codes`` (E, N, K):
    returns (B, R, N)."""
    nb, rows, k = x.shape
    n = codes.scales.shape[1]
    cfg = config or launch_config(n, k, rows, nb)
    inputs = [x, codes.indices, codes.scales, _codebook(codes.bits), experts]
    if qjl is not None:
        inputs += [x_sketch, qjl.signs, qjl.scales]
    groups = -(-n // cfg.rows_per_group)
    (out,) = get_kernel("gather_matvec", qjl is not None)(
        inputs=inputs,
        template=_template(x.dtype, codes, rows, cfg, qjl is not None),
        grid=(groups * cfg.threads, nb, 1),
        threadgroup=(cfg.threads, 1, 1),
        output_shapes=[(nb, rows, n)],
        output_dtypes=[x.dtype],
    )
    return out


def dequantize(codes: QuantizedWeight, dtype=mx.float16) -> mx.array:
    """``s ⊙ C[idx]``: the rotated weight (..., N, K) as a dense ``dtype`` array."""
    lead = codes.scales.shape[:-1]
    rows = math.prod(lead)
    groups = codes.scales.shape[-1]
    k = groups * codes.group_size
    total = rows * k
    if total >= 2**31 - _DEQUANT_THREADS:
        raise ValueError(f"dequantize: {total} values exceed one 1-D launch (2**31)")
    (out,) = get_kernel("dequantize")(
        inputs=[
            codes.indices.reshape(rows, -1),
            codes.scales.reshape(rows, groups),
            _codebook(codes.bits),
        ],
        template=[
            ("T", dtype),
            ("BITS", codes.bits),
            ("GS", codes.group_size),
            ("NTHREADS", _DEQUANT_THREADS),
        ],
        grid=(-(-total // _DEQUANT_THREADS) * _DEQUANT_THREADS, 1, 1),
        threadgroup=(_DEQUANT_THREADS, 1, 1),
        output_shapes=[(rows, k)],
        output_dtypes=[dtype],
    )
    return out.reshape(*lead, k)
