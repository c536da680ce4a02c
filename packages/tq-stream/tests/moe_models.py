"""Tiny random MoE models from mlx-lm's own classes, saved as TurboQuant or float checkpoints."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from tq_core import QuantRecipe, quantize_model, save_checkpoint
from tq_core.checkpoint import quantization_block
from tq_core.lm.load import build_model

_ATTN = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=128,
    max_position_embeddings=512,
    num_hidden_layers=3,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)

CONFIGS = {
    "qwen2_moe": dict(
        _ATTN,
        model_type="qwen2_moe",
        intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
    ),
    "qwen3_moe": dict(
        _ATTN,
        model_type="qwen3_moe",
        head_dim=16,
        intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        moe_intermediate_size=64,
        norm_topk_prob=True,
    ),
    "gpt_oss": dict(
        _ATTN,
        model_type="gpt_oss",
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=64,
        head_dim=16,
        sliding_window=4,
        rope_theta=150000,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "deepseek_v2": dict(
        _ATTN,
        model_type="deepseek_v2",
        num_key_value_heads=4,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=1.0,
        kv_lora_rank=32,
        q_lora_rank=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        qk_nope_head_dim=32,
        num_experts_per_tok=2,
        moe_layer_freq=1,
        first_k_dense_replace=1,
        topk_method="greedy",
        rope_scaling={"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 512},
    ),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """A float32 model with every parameter random (routers included, so experts differ)."""
    config = copy.deepcopy(CONFIGS[name])
    mx.random.seed(seed)
    model = build_model(copy.deepcopy(config))
    key = mx.random.key(seed + 7)
    updates = []
    for path, p in tree_flatten(model.parameters()):
        if "norm" in path or not mx.issubdtype(p.dtype, mx.floating):
            continue
        key, sub = mx.random.split(key)
        scale = p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.5
        updates.append((path, mx.random.uniform(-scale, scale, p.shape, key=sub)))
    model.update(tree_unflatten(updates))
    model.set_dtype(mx.float32)
    model.eval()
    mx.eval(model.parameters())
    return model, config


def save_turboquant(name: str, out: Path, bits: int = 4, seed: int = 0) -> Path:
    model, config = build(name, seed)
    recipe = QuantRecipe(bits=bits, group_size=32)
    plan = quantize_model(model, recipe)
    config["quantization"] = quantization_block(plan, recipe.to_dict())
    return save_checkpoint(model, config, out)


def save_float(name: str, out: Path, dtype=mx.float16, seed: int = 0) -> Path:
    """An mlx-lm-layout float checkpoint (experts stacked), as mlx_lm.convert writes."""
    model, config = build(name, seed)
    out.mkdir(parents=True)
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    return out
