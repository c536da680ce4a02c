"""Tests for tq_core.recipe and tq_core.quantize_model: which layers get which bits."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from tq_core import (
    QuantRecipe,
    TurboQuantEmbedding,
    TurboQuantLinear,
    layer_kind,
    plan_layers,
    preset,
    quantize_model,
)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(64, 64)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(64, 128)
        self.mlp.gate = nn.Linear(64, 4)  # an MoE router
        self.norm = nn.RMSNorm(64)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 64)
        self.layers = [Block()]
        self.odd = nn.Linear(48, 8)  # 48 not divisible by 64
        self.lm_head = nn.Linear(64, 50)

    def __call__(self, ids):
        h = self.embed_tokens(ids)
        b = self.layers[0]
        h = b.norm(h + b.self_attn.q_proj(h) + b.mlp.up_proj(h)[..., :64])
        return self.lm_head(h)


def test_layer_kinds():
    m = Toy()
    assert layer_kind("embed_tokens", m.embed_tokens) == "embed"
    assert layer_kind("layers.0.self_attn.q_proj", m.layers[0].self_attn.q_proj) == "attn"
    assert layer_kind("layers.0.mlp.up_proj", m.layers[0].mlp.up_proj) == "mlp"
    assert layer_kind("lm_head", m.lm_head) == "head"
    assert layer_kind("layers.0.norm", m.layers[0].norm) is None


def test_mixed_plan():
    recipe = QuantRecipe(bits=3, attn_bits=4, embed_bits=0, head_bits=2)
    plan = plan_layers(Toy(), recipe)
    assert plan["layers.0.self_attn.q_proj"]["bits"] == 4
    assert plan["layers.0.mlp.up_proj"]["bits"] == 3
    assert plan["lm_head"]["bits"] == 2
    assert "embed_tokens" not in plan  # embed_bits=0 keeps it
    assert "layers.0.mlp.gate" not in plan  # routers are kept
    assert "odd" not in plan  # group size does not divide 48


def test_quantize_model_replaces_and_runs():
    m = Toy()
    mx.eval(m.parameters())
    ids = mx.array([[1, 2, 3]])
    ref = m(ids)
    plan = quantize_model(m, preset("tq4"))
    assert isinstance(m.layers[0].self_attn.q_proj, TurboQuantLinear)
    assert isinstance(m.embed_tokens, TurboQuantEmbedding)
    assert isinstance(m.layers[0].mlp.gate, nn.Linear)
    assert set(plan) == {
        "embed_tokens",
        "layers.0.self_attn.q_proj",
        "layers.0.mlp.up_proj",
        "lm_head",
    }
    out = m(ids)
    assert out.shape == ref.shape and mx.all(mx.isfinite(out)).item()


def test_presets_and_bad_values():
    assert preset("tq3a-tq2e").bits_for("expert") == 2
    assert preset("tq3a-tq2e").bits_for("attn") == 3
    assert preset("tq4", group_size=32).group_size == 32
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("tq5")
    with pytest.raises(ValueError, match="attn_bits must be one of"):
        QuantRecipe(attn_bits=7)
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantRecipe(group_size=16)


def test_kind_from_leaf_name_when_the_path_is_silent():
    lin = nn.Linear(64, 64)
    assert layer_kind("backbone.layers.1.mixer.q_proj", lin) == "attn"  # nemotron_h
    assert layer_kind("backbone.layers.2.mixer.down_proj", lin) == "mlp"
    assert layer_kind("backbone.layers.0.mixer.in_proj", lin) == "other"  # mamba


def test_overrides_by_path():
    recipe = QuantRecipe(bits=3, overrides=((r"self_attn\.q_proj$", 4), (r"up_proj$", 0)))
    plan = plan_layers(Toy(), recipe)
    assert plan["layers.0.self_attn.q_proj"]["bits"] == 4
    assert "layers.0.mlp.up_proj" not in plan
    assert plan["lm_head"]["bits"] == 3
    with pytest.raises(ValueError, match="not a valid regex"):
        QuantRecipe(overrides=(("(", 4),))
    with pytest.raises(ValueError, match="bits for"):
        QuantRecipe(overrides=(("x", 6),))


def test_low_bit_presets_keep_v_proj_at_4_bits():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=1,
                           intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                           rms_norm_eps=1e-5, vocab_size=64)  # fmt: skip
    plan = plan_layers(llama.Model(args), preset("tq3"))
    assert plan["model.layers.0.self_attn.v_proj"]["bits"] == 4
    assert plan["model.layers.0.self_attn.q_proj"]["bits"] == 3
