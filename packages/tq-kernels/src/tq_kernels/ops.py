"""tq-core's dispatch ops (``weight_matmul``, ``weight_gather_matmul``) on the fused kernels.

Each op returns ``None`` (tq-core then runs its reference path) where no kernel applies: no
GPU backend or a CPU default device, a dtype other than float16/bfloat16/float32, bit widths
other than 2/3/4/8, or a QJL residual whose group size differs from the codes'.
Decode (at most 8 rows) runs the matvec kernel; a few more rows run it in chunks of 8; more
rows (prefill) dequantize with a kernel, then ``matmul``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache

import mlx.core as mx
from tq_core import QJLResidual, QuantizedWeight
from tq_core.weights import qjl_sketch_values

from .backend import kernel_backend
from .launch import MAX_ROWS
from .matvec import (
    ROTATE_MAX_ROWS,
    ROTATE_SPANS,
    dequantize,
    gather_matvec,
    matvec,
    pack_sign_bits,
    rotating_matvec_plan,
)
from .sources import MAX_SEGMENTS

__all__ = [
    "weight_matmul",
    "rotating_matmul_plan",
    "rotating_weight_matmul",
    "weight_gather_matmul",
    "KERNEL_BITS",
    "CHUNKED_ROWS",
]

KERNEL_BITS = (2, 3, 4, 8)
_FLOATS = (mx.float16, mx.bfloat16, mx.float32)
#: Up to this many rows the matvec runs in chunks of 8 (re-reading the packed weight per
#: chunk); past it, one dequantized weight and ``matmul`` win (docs/kernels.md, prefill).
CHUNKED_ROWS = 16
#: MoE: the gather matvec reads one expert per entry; past this many entries per expert,
#: dequantizing every expert once and ``gather_mm`` read less.
_GATHER_ENTRIES_PER_EXPERT = 2


@cache
def _backend() -> str | None:
    return kernel_backend()


def _applies(x: mx.array, codes: QuantizedWeight, qjl: QJLResidual | None, x_sketch) -> bool:
    if _backend() is None or mx.default_device() != mx.gpu:
        return False
    if x.dtype not in _FLOATS or codes.bits not in KERNEL_BITS:
        return False
    if x.shape[-1] != codes.in_features or x.size == 0:
        return False  # the reference path raises its own shape error
    if qjl is not None and (qjl.group_size != codes.group_size or x_sketch is None):
        return False
    return True


def weight_matmul(
    x_rot: mx.array,
    codes: QuantizedWeight,
    qjl: QJLResidual | None = None,
    x_sketch: mx.array | None = None,
) -> mx.array | None:
    """``x_rot @ W.T`` (+ QJL) of shape (..., N) in ``x_rot.dtype``, or ``None``."""
    if codes.indices.ndim != 2 or not _applies(x_rot, codes, qjl, x_sketch):
        return None
    lead, k = x_rot.shape[:-1], x_rot.shape[-1]
    rows = math.prod(lead)
    n = codes.scales.shape[0]
    x = x_rot.reshape(rows, k)
    xs = None if qjl is None else x_sketch.astype(x.dtype).reshape(rows, k)
    if rows <= MAX_ROWS:
        y = matvec(x, codes, qjl, xs)
    elif rows <= CHUNKED_ROWS:
        parts = [
            matvec(x[i : i + MAX_ROWS], codes, qjl, None if xs is None else xs[i : i + MAX_ROWS])
            for i in range(0, rows, MAX_ROWS)
        ]
        y = mx.concatenate(parts, axis=0)
    else:
        y = x @ dequantize(codes, x.dtype).T
        if qjl is not None:
            y = y + xs @ qjl_sketch_values(qjl, dtype=x.dtype).T
    return y.reshape(*lead, n)


class _SignBits:
    """Packed sign bits per rotation signs array (keyed by identity, the array pinned so the
    identity stays unique): a layer's signs are packed once, not on every token."""

    def __init__(self):
        self.entries: dict[int, tuple[mx.array, mx.array]] = {}

    def get(self, signs: mx.array) -> mx.array:
        hit = self.entries.get(id(signs))
        if hit is None or hit[0] is not signs:
            bits = pack_sign_bits(signs)
            mx.eval(bits)
            hit = self.entries[id(signs)] = (signs, bits)
        return hit[1]


_sign_bits = _SignBits()


def rotating_matmul_plan(
    x: mx.array, codes: Sequence[QuantizedWeight], rotation, residual: bool = False
) -> Callable[..., list[mx.array]] | None:
    """A plan computing ``[rotate(x, rotation) @ W_i.T for each codes]`` in one launch, the
    kernel rotating the activation itself (decode: at most 2 rows, a power-of-two rotation
    block of 32 to 128, 1 to 3 weights of one input size, bits and group size), or ``None``.
    The plan serves every later input of x's shape and dtype (tq_core.decode_plan). With
    ``residual`` (one weight) the plan is ``plan(x2, r) -> [r + rotate(x2) @ W.T]``."""
    if rotation.block not in ROTATE_SPANS or not 1 <= len(codes) <= MAX_SEGMENTS:
        return None
    if residual and len(codes) != 1:
        return None
    first = codes[0]
    for c in codes:
        if c.indices.ndim != 2 or (c.bits, c.group_size) != (first.bits, first.group_size):
            return None
        if c.in_features != first.in_features:
            return None
    if x.size > ROTATE_MAX_ROWS * rotation.dim or not _applies(x, first, None, None):
        return None
    sign_bits = _sign_bits.get(rotation.signs)
    return rotating_matvec_plan(x, codes, sign_bits, rotation.block, residual)


def rotating_matmul_residual_plan(x: mx.array, codes: Sequence[QuantizedWeight], rotation):
    """:func:`rotating_matmul_plan` of one weight with a residual added in the kernel:
    ``plan(x2, r) -> [r + rotate(x2) @ W.T]``, or ``None``."""
    return rotating_matmul_plan(x, codes, rotation, residual=True)


def rotating_weight_matmul(x: mx.array, codes: QuantizedWeight, rotation) -> mx.array | None:
    """``rotate(x, rotation) @ W.T`` through a one-off plan (see :func:`rotating_matmul_plan`),
    or ``None``. Layers keep their plans instead; this is for tests and benchmarks."""
    plan = rotating_matmul_plan(x, [codes], rotation)
    return None if plan is None else plan(x)[0]


def weight_gather_matmul(
    x_rot: mx.array,
    codes: QuantizedWeight,
    expert_indices: mx.array,
    sorted_indices: bool = False,
    qjl: QJLResidual | None = None,
    x_sketch: mx.array | None = None,
) -> mx.array | None:
    """``mx.gather_mm(x_rot, W.swapaxes(-1, -2), rhs_indices=expert_indices)`` (+ QJL), or
    ``None``. ``x_rot`` is (..., R, K); the result (broadcast(..., indices), R, N)."""
    if codes.indices.ndim != 3 or x_rot.ndim < 2:
        return None
    if not _applies(x_rot, codes, qjl, x_sketch):
        return None
    num_experts, n = codes.scales.shape[:2]
    rows, k = x_rot.shape[-2:]
    xb = tuple(x_rot.shape[:-2])
    try:
        batch = tuple(mx.broadcast_shapes(xb, tuple(expert_indices.shape)))
    except ValueError:
        return None
    entries = math.prod(batch)
    if rows > MAX_ROWS or entries > _GATHER_ENTRIES_PER_EXPERT * num_experts:
        return _gather_dequantized(x_rot, codes, expert_indices, sorted_indices, qjl, x_sketch)
    x = x_rot if xb == batch else mx.broadcast_to(x_rot, (*batch, rows, k))
    x = x.reshape(entries, rows, k)
    xs = None
    if qjl is not None:
        xs = x_sketch.astype(x.dtype)
        xs = (xs if xb == batch else mx.broadcast_to(xs, (*batch, rows, k))).reshape(x.shape)
    idx = expert_indices
    if idx.dtype not in (mx.int32, mx.uint32):
        idx = idx.astype(mx.uint32)
    if tuple(idx.shape) != batch:
        idx = mx.broadcast_to(idx, batch)
    y = gather_matvec(x, codes, idx.reshape(entries), qjl, xs)
    return y.reshape(*batch, rows, n)


def _gather_dequantized(x_rot, codes, expert_indices, sorted_indices, qjl, x_sketch):
    """Many entries per expert (prefill): every expert dequantized once, then gather_mm."""
    w = dequantize(codes, x_rot.dtype).swapaxes(-1, -2)
    y = mx.gather_mm(x_rot, w, rhs_indices=expert_indices, sorted_indices=sorted_indices)
    if qjl is not None:
        z = qjl_sketch_values(qjl, dtype=x_rot.dtype).swapaxes(-1, -2)
        xs = x_sketch.astype(x_rot.dtype)
        y = y + mx.gather_mm(xs, z, rhs_indices=expert_indices, sorted_indices=sorted_indices)
    return y
