"""Fused-kernel plans for decode projections, built once per input shape and reused per token.

A decode step calls every projection with the same few activation shapes. Asking the kernel
package on every call (dispatch checks, launch geometry, kernel lookup) costs more host time
than the GPU spends on a small matvec; a plan does that work once: the kernel package returns
a callable with the launch and the weights bound (``"rotating_matmul_plan"``, dispatch.py),
and this cache hands it back while nothing it depends on has changed. The hit path is a
handful of identity checks: it runs once per projection per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from . import dispatch
from .weights import QuantizedWeight

#: Plans kept per layer (or sibling group): decode uses one or two shapes; prefill shapes,
#: for which no plan applies, must not pile up.
MAX_PLANS = 8


class _Entry:
    """A plan (or ``None``: no kernel applies) and what it was built from."""

    __slots__ = ("generation", "device", "arrays", "plan")

    def __init__(self, layers, plan):
        self.generation = dispatch.generation()
        self.device = mx.default_device()
        self.arrays = bound_arrays(layers)
        self.plan = plan

    def valid(self, layers) -> bool:
        if self.generation != dispatch.generation() or self.device != mx.default_device():
            return False
        arrays = self.arrays
        i = 0
        for layer in layers:
            if (
                layer["indices"] is not arrays[i]
                or layer["scales"] is not arrays[i + 1]
                or layer["signs"] is not arrays[i + 2]
            ):
                return False
            i += 3
        return True


def bound_arrays(layers) -> tuple:
    """The arrays a plan binds: each layer's packed indices and scales, and the signs."""
    out = []
    for layer in layers:
        out += (layer["indices"], layer["scales"], layer["signs"])
    return tuple(out)


class PlanCache:
    """The plans of one layer, or of sibling layers that read the same input (siblings.py),
    keyed by the activation's shape and dtype. An entry holds while the dispatch generation,
    the default device and the layers' arrays are the same (loading weights, a kernel
    failure or :func:`~tq_core.dispatch.reference_only` rebuilds it)."""

    def __init__(self, layers: Sequence, op: str = "rotating_matmul_plan"):
        self.layers = tuple(layers)
        self.op = op  # or "rotating_matmul_residual_plan": plan(x, r) -> [r + rotate(x) @ W.T]
        self.entries: dict[tuple, _Entry] = {}

    def run(self, x: mx.array, *residual: mx.array) -> list[mx.array] | None:
        """``[rotate(x) @ W_i.T for each layer]`` through a fused kernel (plus ``residual``
        for a residual plan), or ``None`` where none applies (the caller then runs its own
        path)."""
        key = (x.shape, x.dtype)
        entry = self.entries.get(key)
        if entry is None or not entry.valid(self.layers):
            self.entries.pop(key, None)
            while len(self.entries) >= MAX_PLANS:
                self.entries.pop(next(iter(self.entries)))
            entry = self.entries[key] = _Entry(self.layers, self._build(x))
        plan = entry.plan
        return None if plan is None else plan(x, *residual)

    def _build(self, x: mx.array):
        first = self.layers[0]
        for layer in self.layers[1:]:  # siblings share one rotation: refuse if loading broke it
            if not mx.array_equal(layer["signs"], first["signs"]).item():
                return None
        codes = [
            QuantizedWeight(layer["indices"], layer["scales"], layer.bits, layer.group_size)
            for layer in self.layers
        ]
        return dispatch.call_kernel(self.op, x, codes, first._rotation_as(x.dtype))
