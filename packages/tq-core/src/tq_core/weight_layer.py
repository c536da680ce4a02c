"""Shared state of TurboQuant weight layers: packed indices, fp16 group scales, rotation,
the optional QJL residual, and the rotated activation shared by sibling projections."""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn

from . import dispatch
from .decode_plan import PlanCache
from .hadamard import _transform
from .pack import packed_words
from .rotation import Rotation, random_signs, rotate
from .weights import (
    QJL_SIGN_STREAM,
    QJLResidual,
    QuantizedWeight,
    dequantize_weight_rotated,
    qjl_sketch_values,
    quantize_qjl_residual,
    quantize_weight,
    weight_rotation,
)

#: Weights quantized per evaluated chunk in ``set_weight`` (4 MB of float32 rows; the
#: nearest-index search and scale refinement hold ~40x that while a chunk evaluates).
QUANTIZE_CHUNK = 1 << 20


def compute_dtype(x: mx.array):
    """float32 on the CPU (its float16 matmul is ~60x slower), the input's dtype on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else x.dtype


class _RotationMemo(threading.local):
    """Per thread, per rotation key, the last ``(x, R x)``. q/k/v (and gate/up) receive the
    very same input array and share a rotation (same size, span and seed), so the activation
    is rotated once and reused by every projection that reads it. One entry per key keeps
    at most one activation alive per distinct rotation."""

    def __init__(self):
        self.entries: dict[tuple, tuple[mx.array, mx.array]] = {}


_rotation_memo = _RotationMemo()


def rotate_shared(x: mx.array, rotation: Rotation, key: tuple, dtype=None) -> mx.array:
    """``R x`` (computed in ``dtype``, default x's), reusing the previous result for ``key``
    (size, span, seed, dtype, sketch) when ``x`` is the same array object."""
    key = (*key, dtype)
    entry = _rotation_memo.entries.get(key)
    if entry is not None and entry[0] is x:
        return entry[1]
    value = rotate(x if dtype is None else x.astype(dtype), rotation)
    _rotation_memo.entries[key] = (x, value)
    return value


def _rotate_trusted(x: mx.array, rotation: Rotation) -> mx.array:
    """:func:`rotate` for a layer's own rotation, whose signs are already in x's dtype and
    whose sizes were validated when the layer was built: two MLX ops, no checks (decode
    calls this once per projection input per token, where Python overhead is the cost)."""
    blocks = (x * rotation.signs).reshape(*x.shape[:-1], rotation.num_blocks, rotation.block)
    return _transform(blocks, rotation.block).reshape(x.shape)


class _SignsCache:
    """A layer's rotation with its signs cast to each compute dtype, built once. Keyed on
    the identity of the stored signs array, so loading new weights invalidates it. (A plain
    object, not a dict: ``nn.Module`` would take a dict attribute for a parameter tree.)"""

    def __init__(self):
        self.entries: dict[tuple, Rotation] = {}


class TurboQuantWeights(nn.Module):
    """Base of the TurboQuant layers: codes of a (..., out, in) weight and its rotation.

    The rotation is along the input dimension, in blocks of ``span`` (default: group size),
    signs drawn from ``seed``; layers with the same input size and seed share it, so one
    rotated activation serves them all. The signs are stored with the layer. With
    ``use_qjl`` the layer also holds a 1-bit QJL sketch of the quantization residual
    (``qjl_signs``, ``qjl_scales``, and the sketch's own random signs ``qjl_flips``).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        bits: int,
        group_size: int,
        seed: int = 0,
        span: int | None = None,
        use_qjl: bool = False,
    ):
        super().__init__()
        *lead, out_dims, in_dims = shape
        if in_dims % group_size:
            raise ValueError(f"group_size={group_size} must divide the input dimension {in_dims}")
        self.bits, self.group_size, self.seed = bits, group_size, seed
        self.span = span or group_size
        self.use_qjl = bool(use_qjl)
        self.indices = mx.zeros((*lead, out_dims, packed_words(in_dims, bits)), dtype=mx.uint32)
        self.scales = mx.zeros((*lead, out_dims, in_dims // group_size), dtype=mx.float16)
        self.signs = random_signs(in_dims, seed).astype(mx.float16)
        if self.use_qjl:
            self.qjl_signs = mx.zeros((*lead, out_dims, in_dims // 32), dtype=mx.uint32)
            self.qjl_scales = mx.zeros_like(self.scales)
            self.qjl_flips = random_signs(in_dims, seed, QJL_SIGN_STREAM).astype(mx.float16)
        self.freeze()

    @property
    def input_dims(self) -> int:
        return self.signs.shape[0]

    def rotation(self) -> Rotation:
        return Rotation(self.input_dims, self.span, self.seed, self.signs.astype(mx.float32))

    def sketch(self) -> Rotation | None:
        """The QJL sketch S (per-group randomized Hadamard), or None without QJL."""
        if not self.use_qjl:
            return None
        return Rotation(
            self.input_dims, self.group_size, self.seed, self.qjl_flips.astype(mx.float32)
        )

    def codes(self) -> QuantizedWeight:
        return QuantizedWeight(self.indices, self.scales, self.bits, self.group_size)

    def qjl(self) -> QJLResidual | None:
        if not self.use_qjl:
            return None
        return QJLResidual(self.qjl_signs, self.qjl_scales, self.group_size)

    @property
    def bits_per_weight(self) -> float:
        extra = self.qjl().bits_per_weight if self.use_qjl else 0.0
        return self.codes().bits_per_weight + extra

    def set_weight(self, weight: mx.array, scale_method: str = "lsq") -> None:
        """Quantize ``weight`` into this layer's codes (and its QJL residual).

        Rows are quantized in chunks of about ``QUANTIZE_CHUNK`` weights, each evaluated
        before the next, so the float32 intermediates of a large matrix (an embedding, a
        stack of experts) never exceed a few chunks: conversion memory stays near one layer.
        """
        *lead, out_dims, in_dims = weight.shape
        rows = weight.reshape(-1, in_dims)
        step = max(1, QUANTIZE_CHUNK // in_dims)
        rot = weight_rotation(in_dims, self.group_size, self.seed, self.span)
        parts = []
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step]
            q = quantize_weight(chunk, self.bits, self.group_size, rot, scale_method)
            part = [q.indices, q.scales]
            if self.use_qjl:
                res = quantize_qjl_residual(chunk, q, self.rotation(), self.sketch())
                part += [res.signs, res.scales]
            mx.eval(part)
            parts.append(part)
        merged = [mx.concatenate(p, axis=0) if len(parts) > 1 else p[0] for p in zip(*parts)]
        shaped = [a.reshape(*lead, out_dims, a.shape[-1]) for a in merged]
        self.indices, self.scales = shaped[0], shaped[1]
        if self.use_qjl:
            self.qjl_signs, self.qjl_scales = shaped[2], shaped[3]

    def _rotation_as(self, dtype) -> Rotation:
        cache = self.__dict__.get("_signs_cache")
        if cache is None:
            cache = _SignsCache()
            object.__setattr__(self, "_signs_cache", cache)
        signs = self.signs
        key = (id(signs), dtype)
        rot = cache.entries.get(key)
        if rot is None or rot.signs.shape != signs.shape:
            cache.entries.clear()  # the signs changed (weights loaded): drop stale casts
            cast = signs.astype(dtype)
            mx.eval(cast)
            rot = Rotation(self.input_dims, self.span, self.seed, cast)
            cache.entries[key] = rot
            cache.entries[("keep", id(signs))] = signs  # pin: ids stay unique while cached
        return rot

    def fused_rotating_matmul(self, x: mx.array, dtype) -> mx.array | None:
        """``(R x) @ W_rot.T`` by a kernel that rotates x itself, or ``None`` (no such
        kernel registered or applicable, or the layer has a QJL residual). Sibling layers
        (siblings.py) share one launch; a plan per input shape keeps the per-call host work
        to a lookup (decode_plan.py)."""
        if self.use_qjl:
            return None
        state = self.__dict__
        group = state.get("_siblings")
        if group is not None:
            y = group.call(self, x, dtype)
            if y is not None:
                return y
        plans = state.get("_plans")
        if plans is None:
            plans = state["_plans"] = PlanCache((self,))
        out = plans.run(x if x.dtype == dtype else x.astype(dtype))
        return None if out is None else out[0]

    def fused_residual_matmul(self, x: mx.array, residual: mx.array) -> mx.array | None:
        """``residual + (R x) @ W_rot.T`` by one kernel launch (a decoder block's residual
        folded into its projection, decode_block.py), or ``None``: no such kernel applies,
        the layer has a bias or a QJL residual, or the dtypes are not the compute dtype."""
        if self.use_qjl or "bias" in self:
            return None
        dtype = compute_dtype(x)
        if x.dtype != dtype or residual.dtype != dtype:
            return None
        state = self.__dict__
        plans = state.get("_residual_plans")
        if plans is None:
            plans = state["_residual_plans"] = PlanCache((self,), "rotating_matmul_residual_plan")
        out = plans.run(x, residual)
        return None if out is None else out[0]

    def dense_product(self, x: mx.array, dtype) -> mx.array:
        """``W^ x`` in ``dtype`` for a 2-D weight, without any bias: a kernel that rotates x
        itself, else a kernel on the rotated input, else the reference (dequantize, then
        ``matmul``, plus the QJL term)."""
        y = self.fused_rotating_matmul(x, dtype)
        if y is None:
            x_rot, x_sketch = self.rotated_inputs(x, dtype)
            y = dispatch.call_kernel("weight_matmul", x_rot, self.codes(), self.qjl(), x_sketch)
        if y is None:
            y = x_rot @ dequantize_weight_rotated(self.codes(), dtype=dtype).T
            if self.use_qjl:
                y = y + x_sketch @ qjl_sketch_values(self.qjl(), dtype=dtype).T
        return y

    def rotated_inputs(self, x: mx.array, dtype) -> tuple[mx.array, mx.array | None]:
        """``(R x, S R x)`` in ``dtype``: the activation in the weights' rotated basis and,
        with QJL, in the sketch basis; shared with sibling layers that read the same ``x``."""
        # A row-parallel shard rotates a slice of the full signs (see sharded_linear.py):
        # its input slice joins the key so it never shares R x with an unsharded rotation.
        key = (self.input_dims, self.span, self.seed, dtype, self.__dict__.get("input_slice"))
        entry = _rotation_memo.entries.get(key)
        if entry is not None and entry[0] is x:
            x_rot = entry[1]
        else:
            xd = x if x.dtype == dtype else x.astype(dtype)
            x_rot = _rotate_trusted(xd, self._rotation_as(dtype))
            _rotation_memo.entries[key] = (x, x_rot)
        if not self.use_qjl:
            return x_rot, None
        sketch_key = (*key[:3], "qjl", key[4])
        return x_rot, rotate_shared(x_rot, self.sketch(), sketch_key)

    def _extra_repr(self) -> str:
        qjl = ", qjl" if self.use_qjl else ""
        return (
            f"bits={self.bits}, group_size={self.group_size}, span={self.span}, "
            f"seed={self.seed}{qjl}"
        )
