"""The synthetic TurboQuant checkpoint of `tq bench stream`: its shape, its bytes, writing it.

The checkpoint is a qwen3_moe model with a small hidden size, many experts and a tiny
vocabulary, as many layers as it takes to reach ``--gb`` on disk. Its codes are random
(uint32 words: every bit pattern is a valid code) and its scales random positive fp16 of
about 0.02 (1.0 for the embedding, see EMBED_SCALE), so activations stay finite without
quantizing anything: building it costs the time to write the bytes. No tokenizer: the
model is driven with token ids.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: (hidden, moe_intermediate, experts, top_k, heads, kv_heads), largest first: the largest
#: shape that reaches the size with at least MIN_LAYERS layers is used.
SHAPES = (
    (1024, 512, 128, 8, 16, 4),
    (512, 256, 64, 8, 8, 2),
    (256, 128, 32, 4, 4, 2),
    (128, 64, 16, 2, 2, 1),
)
MIN_LAYERS = 4
HEAD_DIM = 64
VOCAB = 1024
BITS = 4
GROUP = 64
SCALE = 0.02  # typical fp16 group scale: weights of RMS ~ 0.02
#: Embedding scales: at 0.02 the token's own signal drowns in the residual stream of a
#: random model, greedy decoding loops on a few ids and every token routes alike (a cache
#: hit rate of ~95% that measures nothing). At 1.0 the token carries through the layers:
#: greedy output does not repeat and routing is close to uniform, the hardest case for an
#: LRU (hit rate ~ the budget fraction); trained models route with more skew.
EMBED_SCALE = 1.0
PROMPT_LEN = 8  # prompt token ids (no tokenizer), drawn from [2, VOCAB)
SHARD_BYTES = 1 << 30


def model_config(shape: tuple, layers: int) -> dict:
    hidden, inter, experts, top_k, heads, kv_heads = shape
    return {
        "model_type": "qwen3_moe",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": HEAD_DIM,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": inter,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


def _recipe():
    from tq_core import QuantRecipe

    return QuantRecipe(bits=BITS, group_size=GROUP)


def _quantized_model(config: dict):
    """The model with its TurboQuant layers in place (empty codes): ``(model, plan)``.
    Nothing is evaluated, so the float weights mlx-lm initialises never take memory."""
    from tq_core.lm.load import build_model
    from tq_core.quantize_model import apply_plan, plan_layers

    model = build_model(dict(config))
    plan = plan_layers(model, _recipe())
    apply_plan(model, plan, scale_method=None)
    return model, plan


def _stored_nbytes(value) -> int:
    """Bytes of a tensor as written: float parameters are stored as fp16."""
    import mlx.core as mx

    if mx.issubdtype(value.dtype, mx.floating):
        return value.size * 2
    return value.nbytes


def layer_bytes(shape: tuple) -> tuple[int, int, int]:
    """``(per layer, fixed, per expert)`` bytes on disk for a model of ``shape``."""
    from mlx.utils import tree_flatten

    model, _ = _quantized_model(model_config(shape, 1))
    per_layer = fixed = expert = 0
    for name, value in tree_flatten(model.parameters()):
        n = _stored_nbytes(value)
        if name.startswith("model.layers.0."):
            per_layer += n
            if ".switch_mlp." in name and not name.endswith(".signs"):
                expert += n
        else:
            fixed += n
    return per_layer, fixed, expert // shape[2]


def synthetic_config(target_bytes: float) -> tuple[dict, int]:
    """``(config, estimated bytes)`` of the model to build: the largest shape reaching
    ``target_bytes`` with at least MIN_LAYERS layers (the smallest shape otherwise)."""
    for shape in SHAPES:
        per_layer, fixed, _ = layer_bytes(shape)
        layers = max(2, math.ceil((target_bytes - fixed) / per_layer))
        if layers >= MIN_LAYERS or shape is SHAPES[-1]:
            return model_config(shape, layers), fixed + layers * per_layer
    raise AssertionError("unreachable")


def _fill(name: str, value, rng):
    """Random codes / scales for a TurboQuant tensor; fp16 for the other float tensors
    (routers, norms, rotation signs keep their values)."""
    import mlx.core as mx
    import numpy as np

    if value.dtype == mx.uint32:
        return mx.array(rng.integers(0, 2**32, size=value.shape, dtype=np.uint32))
    if name.endswith("scales"):
        scale = EMBED_SCALE if "embed_tokens" in name else SCALE
        s = scale * rng.uniform(0.5, 1.5, size=value.shape).astype(np.float32)
        return mx.array(s.astype(np.float16))
    return value.astype(mx.float16)


def build_checkpoint(out: Path, config: dict, seed: int = 0, progress: bool = True) -> Path:
    """Write the synthetic TurboQuant checkpoint to ``out`` layer by layer (memory stays
    near one shard)."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten
    from tq_core.checkpoint import quantization_block
    from tq_core.checkpoint_writer import CheckpointWriter

    mx.random.seed(seed)  # the routers keep mlx-lm's random initialisation
    rng = np.random.default_rng(seed)
    model, plan = _quantized_model(config)
    config = dict(config)
    config["quantization"] = quantization_block(plan, _recipe().to_dict())
    layers = model.model.layers
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(layers) + 1, desc="building checkpoint", unit="layer")
    try:
        with CheckpointWriter(out, max_shard_bytes=SHARD_BYTES) as writer:
            for i in range(len(layers)):
                tensors = {
                    f"model.layers.{i}.{k}": _fill(k, v, rng)
                    for k, v in tree_flatten(layers[i].parameters())
                }
                mx.eval(list(tensors.values()))
                writer.add(tensors)
                layers[i] = nn.Module()  # drop the layer: the writer holds what it needs
                del tensors
                if bar is not None:
                    bar.update(1)
            rest = {k: _fill(k, v, rng) for k, v in tree_flatten(model.parameters())}
            mx.eval(list(rest.values()))
            writer.add(rest)
            path = writer.finish(config)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    for f in shards(path):  # on disk before anything is timed (dirty pages cannot drop)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def shards(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def checkpoint_sizes(path: Path) -> dict:
    """Bytes on disk: files, tensors, expert tensors (streamed) and the rest."""
    from tq_stream import index_checkpoint

    slots = index_checkpoint(path)
    expert = sum(
        s.nbytes
        for name, s in slots.items()
        if ".switch_mlp." in name and not name.endswith((".signs", ".qjl_flips"))
    )
    tensors = sum(s.nbytes for s in slots.values())
    return {
        "file_bytes": sum(f.stat().st_size for f in shards(path)),
        "tensor_bytes": tensors,
        "expert_bytes": expert,
        "non_expert_bytes": tensors - expert,
        "shards": len(shards(path)),
    }
