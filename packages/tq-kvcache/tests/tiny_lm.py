"""Tiny random mlx-lm models with head_dim 64 (llama, qwen3, gpt_oss with a sliding window and
attention sinks), built in code for the cache tests; loaded by file (importlib mode)."""

from __future__ import annotations

import copy

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes

VOCAB = 128
_ATTN = dict(
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB,
    max_position_embeddings=4096,
)
CONFIGS = {
    "llama": dict(
        model_type="llama",
        num_hidden_layers=2,
        intermediate_size=128,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        **_ATTN,
    ),
    "qwen3": dict(
        model_type="qwen3",
        num_hidden_layers=2,
        intermediate_size=128,
        tie_word_embeddings=True,
        rope_theta=1e6,
        **_ATTN,
    ),
    "gpt_oss": dict(
        model_type="gpt_oss",
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=64,
        sliding_window=24,
        rope_theta=150000,
        layer_types=["sliding_attention", "full_attention"],
        **_ATTN,
    ),
}


def build(name: str, seed: int = 0):
    """The tiny float32 model ``name``, deterministic in ``seed``, with non-constant biases
    and attention sinks (mlx-lm initializes those to constants)."""
    config = copy.deepcopy(CONFIGS[name])
    model_class, args_class = _get_classes(copy.deepcopy(config))
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    key = mx.random.key(seed + 1)
    updates = []
    for pname, p in tree_flatten(model.parameters()):
        if "norm" in pname or p.size < 2 or not mx.issubdtype(p.dtype, mx.floating):
            continue
        if (p.max() == p.min()).item():
            key, sub = mx.random.split(key)
            updates.append((pname, mx.random.uniform(-0.5, 0.5, p.shape, key=sub)))
    model.update(tree_unflatten(updates))
    model.set_dtype(mx.float32)
    model.eval()
    mx.eval(model.parameters())
    return model
