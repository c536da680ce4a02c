"""tq_core.lm.shard_model runs mlx-lm's own ``Model.shard`` on TurboQuant models: which layers
become which sharded layers, head counts, names restored afterwards, and refusals that name
the layer. Numerics over real ranks are in tests/test_distributed.py (mlx.launch, ring)."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.nn.layers import distributed as mlx_distributed

pytest.importorskip("mlx_lm")

from mlx_lm.utils import _get_classes  # noqa: E402
from tq_core import (  # noqa: E402
    QuantRecipe,
    TurboQuantAllToShardedLinear,
    TurboQuantShardedToAllLinear,
    TurboQuantSwitchLinear,
    quantize_model,
)
from tq_core.lm import pipeline_model, shard_model  # noqa: E402

ATTN = dict(
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    rms_norm_eps=1e-5,
    vocab_size=128,
    max_position_embeddings=256,
    rope_theta=10000.0,
    intermediate_size=256,
    num_hidden_layers=2,
    tie_word_embeddings=True,
)


class StandIn:
    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


RECIPE = QuantRecipe(bits=4, group_size=32)


def _tq_model(model_type: str, recipe=RECIPE, **extra) -> nn.Module:
    config = dict(ATTN, model_type=model_type, **extra)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    quantize_model(model, recipe)
    return model


def test_llama_shards_through_its_own_shard_method():
    model = _tq_model("llama")
    shard_model(model, StandIn(2, 1))
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
        assert type(proj) is TurboQuantAllToShardedLinear
    for proj in (attn.o_proj, mlp.down_proj):
        assert type(proj) is TurboQuantShardedToAllLinear
    assert (attn.n_heads, attn.n_kv_heads) == (2, 1)
    assert attn.q_proj.output_dims == 128 and attn.o_proj.input_dims == 128
    assert mlp.down_proj.input_slice == ((128, 256),)
    # mlx-lm's module and mlx's own functions are back as they were.
    llama = importlib.import_module("mlx_lm.models.llama")
    assert llama.shard_linear is mlx_distributed.shard_linear
    assert mlx_distributed.shard_linear.__module__ == "mlx.nn.layers.distributed"


def test_moe_experts_shard_in_place():
    model = _tq_model(
        "qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        moe_intermediate_size=128,
        norm_topk_prob=True,
    )
    shard_model(model, StandIn(2, 0))
    moe = model.layers[1].mlp
    assert type(moe.switch_mlp.up_proj) is TurboQuantSwitchLinear
    assert moe.switch_mlp.up_proj.output_dims == 64
    assert moe.switch_mlp.down_proj.input_dims == 64
    assert moe.sharding_group is not None
    assert type(moe.gate) is nn.Linear  # the router stays whole and unquantized


def test_refusals_name_the_layer():
    model = _tq_model("llama", QuantRecipe(bits=4, group_size=128))
    # 4 ranks: o_proj keeps 64 of 256 inputs, half a 128-wide group.
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj.*256 over 4"):
        shard_model(
            _tq_model("llama", QuantRecipe(bits=4, group_size=128), num_key_value_heads=4),
            StandIn(4, 0),
        )
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by 4"):
        shard_model(model, StandIn(4, 0))
    llama = importlib.import_module("mlx_lm.models.llama")
    assert llama.shard_linear is mlx_distributed.shard_linear  # restored after the error


def test_pipeline_keeps_a_run_of_layers():
    model = _tq_model("qwen2", num_hidden_layers=4)
    pipeline_model(model, StandIn(2, 0))
    assert model.model.start_idx == 2 and model.model.end_idx == 4
    with pytest.raises(ValueError, match="no pipeline parallelism"):
        pipeline_model(_tq_model("llama"), StandIn(2, 0))
    with pytest.raises(ValueError, match="5 pipeline ranks for 2 layers"):
        pipeline_model(_tq_model("qwen2"), StandIn(5, 0))


def test_one_rank_is_the_model():
    model = _tq_model("llama")
    x = mx.array([[3, 5, 7, 9]])
    want = model(x)
    shard_model(model, mx.distributed.init())
    assert mx.allclose(model(x), want, atol=1e-5).item()
