"""Fused TurboQuant weight products on the GPU: dense matvec, MoE gather matvec, dequantize.

These are the low-level calls (inputs already validated by :mod:`tq_kernels.ops`): ``x`` is
the activation in the weight's rotated basis, ``codes`` a :class:`tq_core.QuantizedWeight`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from functools import cache

import mlx.core as mx
from tq_core import QJLResidual, QuantizedWeight, gaussian_codebook

from .backend import kernel_backend
from .build import get_kernel
from .launch import LaunchConfig, launch_config, row_bucket
from .sources import MAX_SEGMENTS

__all__ = [
    "matvec",
    "rotating_matvec",
    "rotating_matvec_plan",
    "gather_matvec",
    "dequantize",
    "pack_sign_bits",
]

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


#: Rotation blocks the matvec can apply itself (one to four lanes of 32 values).
ROTATE_SPANS = (32, 64, 128)
#: Activation rows up to which the matvec rotates in registers (32 floats per row per lane).
ROTATE_MAX_ROWS = 2
#: Threadgroup memory a rotating launch may give its copy of R x: CUDA allows 48 KB of
#: static shared memory, Metal 32 KB; the codebook and the K-split sums take under 1 KB.
ROTATED_BYTES = {"cuda": 40 * 1024, "metal": 28 * 1024}
#: ``TQ_ROTATE_SHARED=0``: every warp rotates in registers (the launch geometry of before).
ROTATE_SHARED = os.environ.get("TQ_ROTATE_SHARED", "1") != "0"


def rotated_elements(dtype, k: int, rows: int, cfg: LaunchConfig, backend: str | None) -> int:
    """The XSH template value of a rotating launch: ``M * k`` where the threadgroup's copy
    of R x (in the activation's dtype) fits its share of threadgroup memory, else 0 (every
    warp rotates the blocks it reads in registers)."""
    n = row_bucket(rows) * k
    fits = n * dtype.size <= ROTATED_BYTES.get(backend or "", 0)
    return n if ROTATE_SHARED and cfg.rotate_shared and fits else 0


@cache
def _matvec_plan(
    dtype, ns: tuple, k, rows, bits, gs, qjl: bool, cfg, span: int = 0, lead=None, res=False
):
    """Everything of a matvec launch but its inputs, built once per shape: decode calls the
    same few shapes every token, so this keeps the per-call Python work to one lookup.
    ``ns``: the output rows of each weight (several: siblings in one launch). ``span`` > 0:
    the kernel rotates the activation itself, in blocks of ``span``. ``res``: the kernel adds
    a last input of the output's shape (a residual)."""
    xsh = rotated_elements(dtype, k, rows, cfg or LaunchConfig(), kernel_backend()) if span else 0
    cfg = cfg or launch_config(sum(ns), k, rows, rotated_shared=xsh > 0)
    template = [("T", dtype), ("BITS", bits), ("GS", gs), ("M", row_bucket(rows))]
    template += [*cfg.template(), ("QJL", qjl), ("ROT", span > 0), ("SPAN", span or 32)]
    if span > 0:
        template.append(("XSH", xsh))
    groups = sum(-(-n // cfg.rows_per_group) for n in ns)
    return (
        get_kernel("matvec", qjl, rotate=span > 0, segments=len(ns), residual=res),
        _codebook(bits),
        {
            "template": template,
            "grid": (groups * cfg.threads, 1, 1),
            "threadgroup": (cfg.threads, 1, 1),
            "output_shapes": [(*(lead or (rows,)), n) for n in ns],
            "output_dtypes": [dtype] * len(ns),
        },
    )


def matvec(
    x: mx.array,
    codes: QuantizedWeight,
    qjl: QJLResidual | None = None,
    x_sketch: mx.array | None = None,
    config: LaunchConfig | None = None,
) -> mx.array:
    """``x (rows <= 8, K) @ W.T`` (+ the QJL term) for a 2-D ``codes`` of shape (N, K)."""
    rows, k = x.shape
    kernel, codebook, launch = _matvec_plan(
        x.dtype,
        (codes.scales.shape[0],),
        k,
        rows,
        codes.bits,
        codes.group_size,
        qjl is not None,
        config,
    )
    inputs = [x, codes.indices, codes.scales, codebook]
    if qjl is not None:
        inputs += [x_sketch, qjl.signs, qjl.scales]
    return kernel(inputs=inputs, **launch)[0]


def _rotating_plan(x, codes: Sequence[QuantizedWeight], span: int, config, res: bool = False):
    *lead, k = x.shape
    rows = math.prod(lead)
    if span not in ROTATE_SPANS or rows > ROTATE_MAX_ROWS:
        raise ValueError(f"rotating_matvec: span {span} / {rows} rows not supported")
    if not 1 <= len(codes) <= MAX_SEGMENTS:
        raise ValueError(f"rotating_matvec: 1 to {MAX_SEGMENTS} weights, got {len(codes)}")
    ns = tuple(c.scales.shape[0] for c in codes)
    bits, gs = codes[0].bits, codes[0].group_size
    return _matvec_plan(x.dtype, ns, k, rows, bits, gs, False, config, span, tuple(lead), res)


def _flat_weights(codes: Sequence[QuantizedWeight]) -> list[mx.array]:
    out = []
    for c in codes:
        out += [c.indices, c.scales]
    return out


def _rotating_inputs(x, codebook, sign_bits, weights: Sequence[mx.array]) -> list:
    """In the kernel's argument order (``weights`` = w, scales, w1, scales1, ...):
    x, w, scales, codebook, rsigns, w1, scales1, ..."""
    return [x, weights[0], weights[1], codebook, sign_bits, *weights[2:]]


def rotating_matvec(
    x: mx.array,
    codes: QuantizedWeight | Sequence[QuantizedWeight],
    sign_bits: mx.array,
    span: int,
    config: LaunchConfig | None = None,
    residual: mx.array | None = None,
) -> mx.array | list[mx.array]:
    """``(R x) @ W.T`` for ``x (..., K)`` of at most 2 rows, not yet rotated: the kernel
    applies the signs (``sign_bits``: uint32, bit j of word b set where sign b*32+j is -1)
    and the Hadamard blocks of ``span`` (32, 64 or 128) in registers, so no rotated copy of
    x is made. Returns (..., N): the kernel reads the rows off x's shape, so no reshapes.
    With a sequence of up to 3 weights of the same K, bits and group size (siblings), one
    launch returns the list of their products. ``residual`` (one weight; the output's shape
    and x's dtype) is added to the product in the kernel."""
    several = not isinstance(codes, QuantizedWeight)
    seq = tuple(codes) if several else (codes,)
    if residual is not None:
        if len(seq) != 1:
            raise ValueError(f"rotating_matvec: a residual takes one weight, got {len(seq)}")
        _check_residual(residual, (*x.shape[:-1], seq[0].scales.shape[0]), x.dtype)
    kernel, codebook, launch = _rotating_plan(x, seq, span, config, residual is not None)
    inputs = _rotating_inputs(x, codebook, sign_bits, _flat_weights(seq))
    if residual is not None:
        inputs.append(residual)
    outs = kernel(inputs=inputs, **launch)
    return list(outs) if several else outs[0]


def _check_residual(residual: mx.array, shape: tuple, dtype) -> None:
    """The kernel reads the residual as the output's rows: anything else would read past it."""
    if tuple(residual.shape) != tuple(shape) or residual.dtype != dtype:
        raise ValueError(
            f"residual must be {tuple(shape)} {dtype} (the product's shape, x's dtype), "
            f"got {tuple(residual.shape)} {residual.dtype}"
        )


#: Compiled launches whose kernel has been evaluated once (NVRTC/Metal compile errors are
#: lazy: a plan's first launch is evaluated when it is built, where a failure can fall back).
_verified: set[tuple] = set()


@cache
def _compiled_launch(
    dtype, ns: tuple, k: int, rows: int, bits: int, gs: int, span: int, lead, res: bool = False
):
    """``mx.compile`` of one rotating launch: replaying the recorded kernel call skips MLX's
    per-call source assembly and our argument building (docs/kernels.md, host cost). With
    ``res`` the call is ``run(x, residual, sign_bits, w, scales)``."""
    kernel, codebook, launch = _matvec_plan(
        dtype, ns, k, rows, bits, gs, False, None, span, lead, res
    )

    def run(x, sign_bits, *weights):
        return kernel(inputs=_rotating_inputs(x, codebook, sign_bits, weights), **launch)

    def run_residual(x, residual, sign_bits, *weights):
        inputs = _rotating_inputs(x, codebook, sign_bits, weights) + [residual]
        return kernel(inputs=inputs, **launch)

    return mx.compile(run_residual if res else run)


def rotating_matvec_plan(
    x: mx.array,
    codes: Sequence[QuantizedWeight],
    sign_bits: mx.array,
    span: int,
    residual: bool = False,
) -> Callable[..., list[mx.array]]:
    """A callable ``plan(x2) -> [(R x2) @ W_i.T]`` for any ``x2`` of x's shape and dtype,
    with the weights and signs bound and the launch compiled (one kernel launch per call).
    With ``residual`` (one weight): ``plan(x2, r) -> [r + (R x2) @ W.T]``, ``r`` of the
    output's shape and x's dtype. Its first launch for a new kernel configuration is
    evaluated here, so a compile error raises now rather than at some later ``mx.eval``."""
    seq = tuple(codes)
    _rotating_plan(x, seq, span, None)  # validates rows, span and the number of weights
    if residual and len(seq) != 1:
        raise ValueError(f"rotating_matvec_plan: a residual takes one weight, got {len(seq)}")
    *lead, k = x.shape
    ns = tuple(c.scales.shape[0] for c in seq)
    key = (x.dtype, ns, k, math.prod(lead), seq[0].bits, seq[0].group_size, span, tuple(lead))
    key += (residual,)
    fn = _compiled_launch(*key)
    weights = _flat_weights(seq)

    if residual:
        out_shape = (*lead, ns[0])

        def plan(x2: mx.array, r: mx.array) -> list[mx.array]:
            _check_residual(r, out_shape, x.dtype)
            return fn(x2, r, sign_bits, *weights)

        probe = (x, mx.zeros(out_shape, x.dtype))
    else:

        def plan(x2: mx.array) -> list[mx.array]:
            return fn(x2, sign_bits, *weights)

        probe = (x,)
    if key not in _verified:
        mx.eval(plan(*probe))
        _verified.add(key)
    return plan


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


def pack_sign_bits(signs: mx.array) -> mx.array:
    """±1 signs (K,) as K/32 uint32 words, bit j of word b set where sign b*32+j is -1."""
    neg = (signs.astype(mx.float32) < 0).astype(mx.uint32).reshape(-1, 32)
    return mx.sum(neg << mx.arange(32, dtype=mx.uint32), axis=-1).astype(mx.uint32)


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
