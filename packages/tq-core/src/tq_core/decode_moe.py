"""MoE blocks of TurboQuant experts replayed from one ``mx.compile`` trace per decode shape.

A decode step through a mixture-of-experts block records many small ops: the router, top-k,
softmax, the activation's rotation, three expert gathers and their biases, the weighting and
the sum. On MLX-CUDA each costs host time, and on a GPT-OSS-shaped model (H100, docs/kernels.md)
TurboQuant 3-bit decoded at 0.63x affine 3-bit's tok/s although its gather kernel takes about
half the time of ``gather_qmm``. Once its weights are fixed the block is a pure function of its
input, so after one plain call at a decode shape it is traced once and later calls replay the
recorded kernels from C++.

Taken: mlx-lm's ``gpt_oss.MLPBlock`` and ``qwen3_moe.Qwen3MoeSparseMoeBlock`` (their code read:
no state, shape-only control flow), unsharded (``sharding_group`` None), whose experts are
mlx-lm's ``SwitchGLU`` of :class:`TurboQuantSwitchLinear` layers (streamed experts, tq-stream's,
load from disk and are left alone). Only on a GPU with tq-kernels' gather kernel registered
(the CPU's decode is not bound by host time), at most ``MAX_ROWS`` rows. A trace holds while
the dispatch generation, the device and every module and array of the block are those it was
recorded with (identity checks). ``TQ_COMPILE_MOE=0`` turns it off.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from . import dispatch
from .held_arrays import held, still_held
from .replaying_class import note_seen, replaying_class
from .switch_linear import TurboQuantSwitchLinear

__all__ = ["MOE_BLOCKS", "REPLAY", "compile_decode_moe"]

REPLAY = os.environ.get("TQ_COMPILE_MOE", "1") != "0"
#: ``(module, class, experts attribute)`` of the mlx-lm MoE blocks taken.
MOE_BLOCKS = (
    ("mlx_lm.models.gpt_oss", "MLPBlock", "experts"),
    ("mlx_lm.models.qwen3_moe", "Qwen3MoeSparseMoeBlock", "switch_mlp"),
)
MAX_ROWS = 8
MAX_SHAPES = 8
#: Tests replay on the CPU with a fake gather kernel; otherwise a GPU is required.
ON_CPU = False


def _experts_attribute(cls: type) -> str | None:
    for module, name, experts in MOE_BLOCKS:
        if cls.__module__ == module and cls.__name__ == name:
            return experts
    return None


def _takes(block, cls: type) -> bool:
    experts_name = _experts_attribute(cls)
    if experts_name is None or block.__dict__.get("sharding_group") is not None:
        return False
    experts = block.get(experts_name)
    if experts is None or type(experts).__name__ != "SwitchGLU":
        return False
    if type(experts).__module__ != "mlx_lm.models.switch_layers":
        return False
    projections = [experts.get(n) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(type(p) is TurboQuantSwitchLinear for p in projections)


class _ReplayedMoE:
    """Mixin put in front of a MoE block's class by :func:`compile_decode_moe`."""

    def __call__(self, x: mx.array) -> mx.array:
        fn = _replay(self, x) if REPLAY else None
        if fn is not None:
            return fn(x)
        return super().__call__(x)


def _replay(block, x: mx.array):
    """The compiled call for ``x``'s shape, or ``None`` (the plain call runs)."""
    if x.ndim < 2 or x.size > MAX_ROWS * x.shape[-1]:
        return None
    if dispatch.registered_kernel("weight_gather_matmul") is None:
        return None
    if mx.default_device() == mx.cpu and not ON_CPU:
        return None
    entries: dict = block.__dict__["_tq_moe_replay"]
    key = (x.shape, x.dtype)
    now = (dispatch.generation(), mx.default_device())
    entry = entries.get(key)
    if entry is not None and entry[1] == now:
        kind, _, traced = entry
        if kind == "replay":
            snapshot, fn = traced
            if still_held(snapshot) and block.__dict__.get("sharding_group") is None:
                return fn
        elif kind == "plain":
            return None
        elif not _takes(block, type(block).__mro__[2]):  # sharded or experts replaced since
            entries[key] = ("plain", now, None)
            return None
        else:
            fn = mx.compile(super(_ReplayedMoE, block).__call__)
            entries[key] = ("replay", now, (held(block), fn))
            return fn
    # New here, or the conditions or weights changed: one plain call first, then a trace.
    note_seen(entries, key, now, MAX_SHAPES)
    return None


def compile_decode_moe(model: nn.Module) -> int:
    """Give every MoE block of TurboQuant experts in ``model`` its replayed decode call (see
    the module docstring); returns how many blocks were taken. Idempotent."""
    taken = 0
    for module in model.modules():
        if isinstance(module, _ReplayedMoE) or not _takes(module, type(module)):
            continue
        module.__class__ = replaying_class(_ReplayedMoE, type(module))
        module.__dict__["_tq_moe_replay"] = {}
        taken += 1
    return taken
