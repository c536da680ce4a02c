"""Decode steps of llama-style transformer blocks replayed as two ``mx.compile`` traces.

On MLX-CUDA, decode of 1B- to 8B-class models is bound by the host time it takes to record
each step's ops (docs/kernels.md): a TurboQuant decoder layer took 56.9 us to record on the
H100 host against 38.6 us for MLX's affine one, although it launches fewer kernels. Around
its KV cache a decoder block is two pure functions of its inputs once its weights are fixed:

- before the cache: ``input_layernorm``, the q/k/v projections, their head reshapes and
  RoPE at the cache's offset (passed as an array, so one trace serves every position);
- after the attention: the output reshape, ``o_proj``, the residual, ``post_attention_layernorm``,
  the MLP and its residual.

After the first call at a decode shape (which builds the projections' plans) each is traced
once and later steps replay the recorded kernels from C++; only ``cache.update_and_fetch``
and the model module's own ``scaled_dot_product_attention`` (so tq-kvcache's hook still
routes TurboQuant caches to packed attention) run in Python. The arithmetic is the block's
own, op for op: the traces call the block's modules.

Taken: the blocks of mlx-lm's ``llama``, ``qwen2`` and ``qwen3`` modules (llama, Mistral,
SmolLM, Qwen2, Qwen3 checkpoints), whose attention is mlx-lm's llama attention (Qwen3's with
its per-head q/k norms) with ``nn.RoPE`` or
``Llama3RoPE`` (an offset array is exact for both: ``mx.fast.rope``), and whose seven
projections are all TurboQuant ones without QJL or in-place sharding. A trace holds while the
dispatch generation, the default device and every module and array of the block are the
ones it was recorded with (checked by identity at each call: a weight load, a replaced
projection or :func:`tq_core.dispatch.reference_only` runs the plain call and traces again).
``TQ_COMPILE_BLOCK=0`` turns it off.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from . import dispatch
from .decode_mlp import _plan
from .held_arrays import held, still_held
from .linear import TurboQuantLinear
from .replaying_class import note_seen, replaying_class, settle
from .weight_layer import compute_dtype

__all__ = ["BLOCK_MODULES", "MAX_ROWS", "REPLAY", "compile_decode_blocks"]

#: Decode shapes only (batch x query tokens): prefill runs the plain call.
MAX_ROWS = 8
#: Traces kept per block (decode uses one or two input shapes).
MAX_SHAPES = 8
REPLAY = os.environ.get("TQ_COMPILE_BLOCK", "1") != "0"
#: Replayed blocks add their residuals in ``o_proj``'s and ``down_proj``'s launches, where
#: tq-kernels provides ``rotating_matmul_residual_plan`` (``TQ_FUSE_RESIDUAL=0``: they add
#: as mlx-lm does).
RESIDUAL = os.environ.get("TQ_FUSE_RESIDUAL", "1") != "0"


class _Style(NamedTuple):
    """How one mlx-lm model module writes its block (its code read; the tests check each
    against the plain call)."""

    attention: str  # the attention class's name
    mlp: str  # the MLP class's name
    qk_norm: bool = False  # Qwen3: per-head RMS norms of queries and keys before RoPE
    moe: bool = False  # GPT-OSS: the MLP is a MoE block (called as it is, decode_moe.py)
    scale: str = "scale"  # the attention's softmax scale attribute
    sinks: bool = False  # GPT-OSS: attention sinks passed to the SDPA


#: mlx-lm model modules whose ``TransformerBlock`` this module reproduces op for op.
BLOCK_MODULES = {
    "mlx_lm.models.llama": _Style("Attention", "MLP"),
    "mlx_lm.models.qwen2": _Style("Attention", "MLP"),
    "mlx_lm.models.qwen3": _Style("Attention", "MLP", qk_norm=True),
    "mlx_lm.models.gpt_oss": _Style(
        "AttentionBlock", "MLPBlock", moe=True, scale="sm_scale", sinks=True
    ),
}
_ROPES = (
    ("mlx.nn.layers.positional_encoding", "RoPE"),
    ("mlx_lm.models.rope_utils", "Llama3RoPE"),
    ("mlx_lm.models.rope_utils", "YarnRoPE"),
)
_ATTENTION = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
              ("self_attn", "o_proj"))  # fmt: skip
_MLP = (("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def _projections(style: _Style) -> tuple:
    """The dense TurboQuant projections a block of ``style`` must have (MoE experts are not)."""
    return _ATTENTION if style.moe else _ATTENTION + _MLP


def _named(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__name__


def _takes(block, cls: type) -> bool:
    """Whether ``block``, made by mlx-lm as a ``cls``, is a block of TurboQuant projections
    this module reproduces (module docstring)."""
    style = BLOCK_MODULES.get(cls.__module__)
    if style is None or cls.__name__ != "TransformerBlock":
        return False
    attn, mlp = block.get("self_attn"), block.get("mlp")
    if attn is None or _named(type(attn)) != (cls.__module__, style.attention):
        return False
    if mlp is None or _named(type(mlp)) != (cls.__module__, style.mlp):  # written out in _tail
        return False
    if _named(type(attn.get("rope"))) not in _ROPES:
        return False
    norms = [(block, "input_layernorm"), (block, "post_attention_layernorm")]
    if style.qk_norm:
        norms += [(attn, "q_norm"), (attn, "k_norm")]
    if any(type(m.get(name)) is not nn.RMSNorm for m, name in norms):
        return False
    for parent, name in _projections(style):
        layer = block[parent].get(name)
        if (
            type(layer) is not TurboQuantLinear
            or layer.use_qjl
            or layer.__dict__.get("input_slice") is not None
        ):
            return False
    return True


def _pre(block, x: mx.array, offset: mx.array):
    """The block up to its cache: what mlx-lm's llama ``Attention`` does before
    ``cache.update_and_fetch``."""
    attn = block.self_attn
    h = block.input_layernorm(x)
    B, L, _ = h.shape
    queries, keys, values = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    if "sinks" in attn:  # GPT-OSS: heads of head_dim, however many
        D = attn.head_dim
        q, k = queries.reshape(B, L, -1, D).swapaxes(1, 2), keys.reshape(B, L, -1, D).swapaxes(1, 2)
        v = values.reshape(B, L, -1, D).swapaxes(1, 2)
        return attn.rope(q, offset=offset), attn.rope(k, offset=offset), v
    queries = queries.reshape(B, L, attn.n_heads, -1)
    keys = keys.reshape(B, L, attn.n_kv_heads, -1)
    if "q_norm" in attn:  # Qwen3: per-head RMS norms before RoPE
        queries, keys = attn.q_norm(queries), attn.k_norm(keys)
    queries = queries.transpose(0, 2, 1, 3)
    keys = keys.transpose(0, 2, 1, 3)
    values = values.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    return attn.rope(queries, offset=offset), attn.rope(keys, offset=offset), values


def _tail(block, output: mx.array, x: mx.array) -> mx.array:
    """The block after its attention: the rest of ``Attention`` and of ``TransformerBlock``
    (with ``RESIDUAL``, the MLP's ``down_proj(swiglu(gate_proj(n), up_proj(n)))`` written
    out, so its residual add goes into the down projection's launch)."""
    attn, mlp = block.self_attn, block.mlp
    B, _, L, _ = output.shape
    h = _plus_projected(x, attn.o_proj, output.transpose(0, 2, 1, 3).reshape(B, L, -1))
    n = block.post_attention_layernorm(h)
    if not RESIDUAL or "sinks" in attn:  # GPT-OSS: a MoE block, called as it is
        return h + mlp(n)
    swiglu = sys.modules[type(mlp).__module__].swiglu
    return _plus_projected(h, mlp.down_proj, swiglu(mlp.gate_proj(n), mlp.up_proj(n)))


def _plus_projected(residual: mx.array, layer, x: mx.array) -> mx.array:
    """``residual + layer(x)``: one launch where the layer's residual plan applies."""
    if RESIDUAL:
        y = layer.fused_residual_matmul(x, residual)
        if y is not None:
            return y
    return residual + layer(x)


def _build_residual_plans(block, x: mx.array) -> None:
    """Build ``o_proj``'s and ``down_proj``'s residual plans for a block input like ``x``
    before tracing: a kernel configuration's first launch is evaluated when its plan is
    built, which a trace cannot do."""
    lead, dtype = x.shape[:-1], x.dtype
    layers = [block.self_attn.o_proj]
    if "down_proj" in block.mlp:
        layers.append(block.mlp.down_proj)
    for layer in layers:
        inp = mx.zeros((*lead, layer.input_dims), dtype)
        layer.fused_residual_matmul(inp, mx.zeros((*lead, layer.output_dims), dtype))


class _Replay:
    """One block's traces: per input (shape, dtype) an entry ``(kind, (generation, device),
    traced)``: ``seen`` (one plain call ran, building any plans), ``plain`` (a projection
    runs without a fused plan: stay plain) or ``replay`` with ``traced`` = (the block's
    held items, the compiled pre and tail calls)."""

    __slots__ = ("entries",)

    def __init__(self):
        self.entries: dict[tuple, tuple] = {}


#: ``(offset, array)`` of the last step: the layers of one step share one offset array.
#: Replaced in one assignment, so threads never pair one offset with another's array.
_offset: tuple = (None, None)


def _offset_array(offset: int) -> mx.array:
    global _offset
    last = _offset
    if last[0] == offset:
        return last[1]
    array = mx.array(offset, dtype=mx.int32)
    _offset = (offset, array)
    return array


class _ReplayedBlock:
    """Mixin put in front of a block's class by :func:`compile_decode_blocks`."""

    def __call__(self, x: mx.array, mask=None, cache=None):
        fns = _replay(self, x, cache) if REPLAY else None
        if fns is None:
            return super().__call__(x, mask, cache)
        pre, tail = fns
        queries, keys, values = pre(x, _offset_array(cache.offset))
        keys, values = cache.update_and_fetch(keys, values)
        attn = self.self_attn
        sdpa = sys.modules[type(attn).__module__].scaled_dot_product_attention
        if "sinks" in attn:  # GPT-OSS
            output = sdpa(queries, keys, values, cache, attn.sm_scale, mask=mask, sinks=attn.sinks)
        else:
            output = sdpa(queries, keys, values, cache=cache, scale=attn.scale, mask=mask)
        return tail(output, x)


def _trace(block, x: mx.array) -> tuple:
    """(the block's identity snapshot, its compiled (pre, tail)) for inputs like ``x``."""
    if RESIDUAL:
        _build_residual_plans(block, x)
    fns = (
        mx.compile(lambda x, offset: _pre(block, x, offset)),
        mx.compile(lambda output, x: _tail(block, output, x)),
    )
    return held(block), fns


def _replay(block, x: mx.array, cache):
    """``(pre, tail)`` for this call, or ``None`` (the plain call runs)."""
    if (
        cache is None
        or type(cache.offset) is not int
        or x.ndim != 3
        or x.shape[0] * x.shape[1] > MAX_ROWS
    ):
        return None
    state: _Replay = block.__dict__["_tq_replay"]
    key = (x.shape, x.dtype)
    now = (dispatch.generation(), mx.default_device())
    entry = state.entries.get(key)
    if entry is not None and entry[1] == now:
        kind, _, traced = entry
        if kind == "plain":
            return None
        if kind == "replay":
            snapshot, fns = traced
            if still_held(snapshot):
                return fns
        elif not _takes(block, type(block).__mro__[2]):  # a projection replaced since?
            state.entries[key] = ("plain", now, None)
            return None
        else:
            lead, dtype = x.shape[:-1], compute_dtype(x)
            style = BLOCK_MODULES[type(block).__module__]
            plans = {_plan(block[p][n], lead, dtype) for p, n in _projections(style)}
            return settle(state.entries, key, now, plans, lambda: _trace(block, x))
    # New here, or the conditions or weights changed: one plain call first (it builds the
    # projections' plans), then a trace.
    note_seen(state.entries, key, now, MAX_SHAPES)
    return None


def compile_decode_blocks(model: nn.Module) -> int:
    """Give every llama-style block of TurboQuant projections in ``model`` its replayed
    decode step (see the module docstring); returns how many blocks were taken. Idempotent."""
    taken = 0
    for module in model.modules():
        if isinstance(module, _ReplayedBlock) or not _takes(module, type(module)):
            continue
        module.__class__ = replaying_class(_ReplayedBlock, type(module))
        module.__dict__["_tq_replay"] = _Replay()
        taken += 1
    return taken
