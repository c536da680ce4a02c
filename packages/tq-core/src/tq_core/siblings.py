"""Sibling projections (q/k/v, gate/up) that read the same input, run as one fused launch.

mlx-lm's attention calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` one after another on
the very same array, and its MLP ``gate_proj(x)``, ``up_proj(x)``. A decode step is
dominated by per-launch cost on small matrices (docs/kernels.md), so the first sibling
called computes all of them in one kernel launch and keeps the others' outputs until they
are asked for, keyed on the identity of ``x``: no model code is edited, and a model that
calls its projections in another order, or on different inputs, still gets exact results.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .decode_plan import PlanCache
from .linear import TurboQuantLinear
from .weight_layer import compute_dtype

__all__ = ["SIBLING_SETS", "SiblingGroup", "group_siblings"]

#: Attribute names of projections that read the same input in mlx-lm's models (attention
#: q/k/v; MLP gate/up, and Mixtral-style w1/w3).
SIBLING_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


class SiblingGroup:
    """Layers that share input size, bits, group size and rotation, computed together."""

    def __init__(self, layers):
        self.layers = tuple(layers)
        self.plans = PlanCache(self.layers)
        self._position = {id(m): i for i, m in enumerate(self.layers)}  # held: ids stay
        self._ids = tuple(id(m) for m in self.layers)
        # (x, {id(layer): output}) of the last launch, replaced in one assignment: threads
        # sharing a model may overwrite it, but never pair one input with another's outputs.
        self._memo: tuple = (None, {})

    def call(self, layer, x: mx.array, dtype=None) -> mx.array | None:
        """``layer``'s product for ``x``: a sibling's launch kept it for this very ``x`` (each
        is handed out once), or the group's launch runs now in ``dtype`` (default: the
        compute dtype); ``None`` where no fused plan applies or ``layer`` left the group (its
        own path runs). The decode hot path of every grouped projection, hence one frame."""
        memo_x, outputs = self._memo
        if memo_x is x:
            y = outputs.pop(id(layer), None)
            if y is not None:
                if not outputs:
                    self._memo = (None, {})  # every sibling served: drop the input
                return y
        position = self._position.get(id(layer))
        if position is None:
            return None
        dtype = dtype or compute_dtype(x)
        outs = self.plans.run(x if x.dtype == dtype else x.astype(dtype))
        if outs is None:
            return None
        kept = dict(zip(self._ids, outs))
        del kept[id(layer)]
        self._memo = (x, kept)
        return outs[position]


def _compatible(layers) -> bool:
    first = layers[0]
    if any(type(layer) is not TurboQuantLinear or layer.use_qjl for layer in layers):
        return False  # sharded subclasses rotate slices of the input; QJL needs a sketch
    keys = {(la.input_dims, la.bits, la.group_size, la.span, la.seed) for la in layers}
    if len(keys) != 1:
        return False
    return all(mx.array_equal(la.signs, first.signs).item() for la in layers[1:])


def group_siblings(model: nn.Module) -> int:
    """Join every set of sibling TurboQuant projections of ``model`` (see ``SIBLING_SETS``)
    whose layers agree on input size, bits, group size and rotation; returns how many
    groups were made. Layers keep their own weights; the group only shares the launch."""
    groups = 0
    for module in model.modules():
        for names in SIBLING_SETS:
            layers = [module.get(name) for name in names]
            if any(layer is None for layer in layers) or not _compatible(layers):
                continue
            group = SiblingGroup(layers)
            for layer in layers:
                object.__setattr__(layer, "_siblings", group)
            groups += 1
    return groups
