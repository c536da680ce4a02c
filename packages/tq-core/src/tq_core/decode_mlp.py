"""Decode MLPs of TurboQuant projections replayed from one ``mx.compile`` trace per shape.

On MLX-CUDA, decode of 1B-class models is bound by the host time it takes to record each
step's ops, and a TurboQuant projection costs more of it than MLX's affine one (each call
goes through its plan lookup, docs/kernels.md): on the H100 host, recording a 1B MLP took
17.7 us with TurboQuant against 7.1 us affine (benchmarks/device/probe_projection_cost.py).
A dense MLP is a pure function of its input once its weights are fixed, so after the first
call at a decode shape (which builds the projections' plans) the MLP is traced once by
``mx.compile`` and later calls replay the recorded kernels from C++, without the Python.

Only MLPs made of exactly three TurboQuant projections (gate/up/down or w1/w3/w2) and no
other parameters are taken, at decode shapes (at most ``MAX_ROWS`` rows) and only where all
three ran as fused plans; a projection replaced by another object (sharding) has the MLP
examined afresh. A trace holds while the dispatch generation, the default device
and every projection's arrays are the ones it was recorded with, like the plans themselves
(decode_plan.py); loading weights or :func:`tq_core.dispatch.reference_only` falls back to
the plain call and retraces later. The module's class becomes a subclass of its own that
adds this (same name and module), so its parameters and its place in the model stay as
they are.
"""

from __future__ import annotations

import os
from operator import is_

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import dispatch
from .decode_plan import bound_arrays
from .linear import TurboQuantLinear
from .replaying_class import note_seen, replaying_class, settle
from .weight_layer import compute_dtype

__all__ = ["MAX_ROWS", "compile_decode_mlps", "REPLAY"]

#: Decode shapes only: prefill runs the plain call (its shapes change from call to call).
MAX_ROWS = 8
#: Traces kept per MLP (decode uses one or two input shapes).
MAX_SHAPES = 8
#: On by default (``TQ_COMPILE_MLP=0`` turns it off): replayed outputs match the reference
#: path on the H100 (tq-kernels' ``test_replayed_decode_mlp_matches_reference_path``).
REPLAY = os.environ.get("TQ_COMPILE_MLP", "1") != "0"
#: Projection names of a dense MLP, in mlx-lm's models: llama-style and Mixtral-style.
MLP_SETS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_LEAVES = {"indices", "scales", "signs", "bias"}


def _projections(module: nn.Module) -> tuple[tuple, tuple] | None:
    """``(names, layers)``: the MLP's three projections when it is made of them and nothing
    else."""
    if not isinstance(module, nn.Module):
        return None
    for names in MLP_SETS:
        layers = tuple(module.get(n) for n in names)
        if any(
            type(la) is not TurboQuantLinear
            or la.use_qjl
            or la.__dict__.get("input_slice") is not None  # sharded in place: the model sums
            for la in layers
        ):
            continue
        for path, _ in tree_flatten(module.parameters()):
            head, _, leaf = path.partition(".")
            if head not in names or leaf not in _LEAVES:
                return None  # another parameter: its identity would go unchecked
        return names, layers
    return None


def _arrays(layers) -> tuple:
    """What a trace holds of the projections: the arrays their plans bind, and any bias."""
    return bound_arrays(layers) + tuple(la.get("bias") for la in layers)


def _plan(layer: TurboQuantLinear, lead: tuple, dtype) -> str:
    """``"valid"`` where ``layer`` holds a fused plan for inputs of leading shape ``lead``
    that still holds, ``"stale"`` where it holds one built for other arrays or conditions,
    ``"none"`` where no kernel applied."""
    group = layer.__dict__.get("_siblings")
    plans = group.plans if group is not None else layer.__dict__.get("_plans")
    found = "none"
    for key, entry in ({} if plans is None else plans.entries).items():
        if key[0][:-1] == lead and key[1] == dtype and entry.plan is not None:
            if entry.valid(plans.layers):
                return "valid"
            found = "stale"
    return found


class _Replay:
    """One MLP's traces: per input (shape, dtype) an entry ``(kind, (generation, device),
    held)``: ``seen`` (the plain call ran once under these conditions, building any plans),
    ``plain`` (not every projection ran a plan: stay plain), or ``replay`` with ``held`` =
    (the projections' arrays it was traced with, the compiled call)."""

    __slots__ = ("names", "layers", "entries")

    def __init__(self, names, layers):
        self.names, self.layers = names, layers  # layers None: no longer an MLP to take
        self.entries: dict[tuple, tuple] = {}


class _ReplayedDecode:
    """Mixin put in front of an MLP's class by :func:`compile_decode_mlps`."""

    def __call__(self, x: mx.array) -> mx.array:
        fn = _replay(self, x) if REPLAY else None
        if fn is not None:
            return fn(x)
        return super().__call__(x)


def _replay(module, x: mx.array):
    """The compiled call for ``x``'s shape, or ``None`` (the plain call runs)."""
    if x.ndim < 2 or x.size > MAX_ROWS * x.shape[-1]:
        return None
    state: _Replay = module.__dict__["_tq_replay"]
    if state.layers is None:
        return None
    if any(module.get(n) is not la for n, la in zip(state.names, state.layers)):
        # A projection was replaced (sharding, a new layer): take the MLP afresh.
        found = _projections(module)
        state.names, state.layers = found or ((), None)
        state.entries.clear()
        if found is None:
            return None
    key = (x.shape, x.dtype)
    now = (dispatch.generation(), mx.default_device())
    entry = state.entries.get(key)
    if entry is not None and entry[1] == now:
        kind, _, held = entry
        if kind == "plain":
            return None
        if kind == "replay":
            arrays, fn = held
            if all(map(is_, arrays, _arrays(state.layers))):
                return fn
        else:
            found = _projections(module)  # once per trace: sharded in place since?
            if found is None or any(a is not b for a, b in zip(found[1], state.layers)):
                state.layers = None
                return None
            plans = {_plan(la, x.shape[:-1], compute_dtype(x)) for la in state.layers}
            return settle(
                state.entries,
                key,
                now,
                plans,
                lambda: (
                    _arrays(state.layers),
                    mx.compile(super(_ReplayedDecode, module).__call__),
                ),
            )
    # New here, or the conditions or weights changed: one plain call first (it builds the
    # projections' plans), then a trace.
    note_seen(state.entries, key, now, MAX_SHAPES)
    return None


def compile_decode_mlps(model: nn.Module) -> int:
    """Give every dense MLP of TurboQuant projections in ``model`` its compiled decode call
    (see the module docstring); returns how many MLPs were taken. Idempotent."""
    taken = 0
    for module in model.modules():
        if isinstance(module, _ReplayedDecode):
            continue
        found = _projections(module)
        if found is None:
            continue
        module.__class__ = replaying_class(_ReplayedDecode, type(module))
        module.__dict__["_tq_replay"] = _Replay(*found)
        taken += 1
    return taken
