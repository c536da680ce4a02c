"""Hugging Face checkpoint layouts for the tiny test models: the inverse of each
architecture's ``sanitize`` (per-expert MoE tensors, fused ``kv_b_proj``, torch conv layout,
Qwen3-Next "norm - 1" weights, GPT-OSS MXFP4 blocks). Loaded by tiny_models.py."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


def _unstack_experts(pattern: str, names: dict[str, str]):
    """Stacked ``<prefix>.switch_mlp.<proj>.weight`` (E, out, in) -> per-expert
    ``<prefix>.experts.{e}.<name>.weight`` (the Hugging Face layout)."""

    def to_hf(weights, config):
        out = {}
        for k, v in weights.items():
            m = re.match(pattern, k)
            if m is None:
                out[k] = v
                continue
            prefix, proj, leaf = m.group(1), m.group(2), m.group(3)
            for e in range(v.shape[0]):
                out[f"{prefix}.experts.{e}.{names.get(proj, proj)}.{leaf}"] = v[e]
        return out

    return to_hf


_switch_glu_unstack = _unstack_experts(
    r"^(.*\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.(weight)$", {}
)


def _deepseek_v3_to_hf(weights, config):
    """Stacked experts -> per-expert tensors; embed_q/unembed_out -> one kv_b_proj."""
    weights = _switch_glu_unstack(weights, config)
    nope, vdim = config["qk_nope_head_dim"], config["v_head_dim"]
    heads = config["num_attention_heads"]
    out = {}
    for k, v in weights.items():
        if k.endswith(".self_attn.embed_q.weight"):
            prefix = k[: -len(".embed_q.weight")]
            wk = v.swapaxes(-1, -2)  # (H, nope, kv_lora_rank)
            wv = weights[f"{prefix}.unembed_out.weight"]  # (H, v_head_dim, kv_lora_rank)
            kv_b = mx.concatenate([wk, wv], axis=1).reshape(heads * (nope + vdim), -1)
            out[f"{prefix}.kv_b_proj.weight"] = kv_b
        elif not k.endswith(".self_attn.unembed_out.weight"):
            out[k] = v
    return out


def _conv_to_torch(weights):
    """MLX depthwise conv1d weight (C, K, 1) -> the torch layout (C, 1, K)."""
    return {k: (v.moveaxis(2, 1) if k.endswith("conv1d.weight") else v) for k, v in weights.items()}


def _nemotron_h_to_hf(weights, config):
    weights = _unstack_experts(
        r"^(.*\.mixer)\.switch_mlp\.(fc1|fc2)\.(weight)$", {"fc1": "up_proj", "fc2": "down_proj"}
    )(weights, config)
    return _conv_to_torch(weights)


_QWEN_NEXT_NORMS = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)


def _minus_one_norms(weights):
    """Qwen3-Next / Qwen3.5 checkpoints store these RMSNorm weights as ``w - 1``."""
    return {
        k: (v - 1.0 if v.ndim == 1 and k.endswith(_QWEN_NEXT_NORMS) else v)
        for k, v in weights.items()
    }


def _qwen3_next_to_hf(weights, config):
    return _conv_to_torch(_minus_one_norms(_switch_glu_unstack(weights, config)))


def _qwen3_5_to_hf(weights, config):
    weights = _conv_to_torch(_minus_one_norms(weights))
    return {
        k.replace("language_model.model.", "model.language_model.", 1): v
        for k, v in weights.items()
    }


def _gpt_oss_mxfp4_to_hf(weights, config):
    """GPT-OSS as released: experts' gate/up fused and interleaved along the output rows,
    stored as MXFP4 ``*_blocks`` (uint8, (E, out, in/32, 16)) and ``*_scales``."""
    out = {}
    for k, v in weights.items():
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(weight|bias)$", k)
        if m is None:
            out[k] = v
            continue
        prefix, proj, leaf = m.groups()
        if proj == "up_proj":
            continue  # folded into gate_up_proj below
        if proj == "gate_proj":  # rows interleaved: gate_up[..., ::2, :] is gate_proj
            up = weights[f"{prefix}.up_proj.{leaf}"]
            if leaf == "weight":
                e, rows, cols = v.shape
                v = mx.stack([v, up], axis=2).reshape(e, 2 * rows, cols)
            else:
                v = mx.stack([v, up], axis=-1).reshape(v.shape[0], -1)
            proj = "gate_up_proj"
        if leaf == "bias":
            out[f"{prefix}.{proj}_bias"] = v
            continue
        wq, scales = mx.quantize(v, group_size=32, bits=4, mode="mxfp4")
        e, rows, words = wq.shape
        out[f"{prefix}.{proj}_blocks"] = wq.view(mx.uint8).reshape(e, rows, words * 4 // 16, 16)
        out[f"{prefix}.{proj}_scales"] = scales
    return out


def _mxfp4_round_trip_experts(model: nn.Module) -> None:
    """Replace the experts' float weights by their MXFP4 round trip, so the in-memory float
    model is exactly what mlx-lm reads back (and dequantizes) from the MXFP4 checkpoint."""
    from mlx_lm.models.switch_layers import SwitchLinear

    updates = []
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, SwitchLinear):
            wq, scales = mx.quantize(m.weight, group_size=32, bits=4, mode="mxfp4")
            w = mx.dequantize(wq, scales, group_size=32, bits=4, mode="mxfp4")
            updates.append((f"{path}.weight", w.astype(mx.float32)))
    model.update(tree_unflatten(updates))
